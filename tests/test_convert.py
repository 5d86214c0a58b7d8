"""`routerd convert`: a llama-swap config.yaml and a llama.cpp --models-preset INI file as routerd
TOML: what maps, what is listed as not converted, that the output passes check-config, and that a
converted config serves."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from routerd.ops import convert
from tests.conftest import FAKE_SERVER, ROOT, make_config

# Shaped like llama-swap's documented config.example.yaml (multi-line and nested macros, an env
# macro, model-level macros, aliases as names and as objects, env as NAME=value, filters, groups,
# hooks, peers), written for these tests. @DIR@ is the test's own directory.
LLAMA_SWAP = """\
healthCheckTimeout: 240
logLevel: debug
startPort: 7000
sendLoadingState: true
apiKeys:
  - "sk-do-not-copy-me"

macros:
  "fork-server": >
    @DIR@/llama/bin/llama-server
    --port ${PORT}
  "ctx": 8192
  "ctx_args": "--ctx-size ${ctx}"
  "gguf": "${env.TEST_GGUF_DIR}"

models:
  "qwen-chat":
    macros:
      "ctx": 16384
    cmd: |
      # the fork build, with the shared context macro
      ${fork-server}
      --model ${gguf}/qwen-chat.gguf
      ${ctx_args}
      -ngl 99 --jinja
      --host 127.0.0.1
    name: "Qwen chat"
    aliases:
      - "gpt-4o-mini"
      - id: "qwen"
        name: "Qwen"
    ttl: 300
    env:
      - "CUDA_VISIBLE_DEVICES=0"
      - "GGML_CUDA_FORCE_MMQ=1"
    filters:
      stripParams: "top_k, top_p"
      setParams:
        temperature: 0.6
        chat_template_kwargs:
          enable_thinking: false
    useModelName: "qwen2.5"

  "embed":
    cmd: llama-server --port ${PORT} -m ${gguf}/embed.gguf --embeddings --alias embedder
    unlisted: true
    ttl: 0

  "small":
    cmd: >
      llama-server --port ${PORT}
      -m ${gguf}/small.gguf
      -c 2048 --temp 0.2
    ttl: -1

  "coder":
    cmd: llama-server --port ${PORT} -hf ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF --api-key sk-inline-secret

  "docker-llama":
    proxy: "http://127.0.0.1:${PORT}"
    cmd: |
      docker run --name ${MODEL_ID}
      --init --rm -p ${PORT}:8080 -v /mnt/nvme/models:/models
      ghcr.io/ggml-org/llama.cpp:server
      --model '/models/tiny.gguf'
    cmdStop: docker stop ${MODEL_ID}

groups:
  "together":
    swap: false
    exclusive: true
    members: ["qwen-chat", "embed"]
  "solo":
    swap: true
    exclusive: true
    members: ["small"]

hooks:
  on_startup:
    preload: ["qwen-chat"]

peers:
  gpu-box:
    proxy: http://192.168.1.50:8080
    apiKey: ${env.GPU_BOX_KEY}
    models: ["llama-70b", "mistral-large"]
  openrouter:
    proxy: https://openrouter.ai/api
    apiKey: sk-or-plaintext-secret
    models: ["meta-llama/llama-3.1-8b-instruct"]
    filters:
      stripParams: "temperature"
"""
SECRETS = ("sk-do-not-copy-me", "sk-inline-secret", "sk-or-plaintext-secret")

# Shaped like the preset example in llama.cpp's server README: a version line, a global [*]
# section, short and long keys, an environment-variable key, switches, preset-only options.
PRESET = """\
version = 1

; applied to every model
[*]
c = 8192
n-gpu-layers = 99
jinja = true
LLAMA_ARG_CACHE_RAM = 0
stop-timeout = 5

[qwen3-8b]
model = @DIR@/qwen3-8b.gguf
ctx-size = 16384
temp = 0.6
chat-template-kwargs = {"enable_thinking": false}
load-on-startup = true

[gemma-small]
m = @DIR@/gemma-small.gguf
flash-attn = on
port = 9999

[ggml-org/gpt-oss-20b-GGUF]
hf-repo = ggml-org/gpt-oss-20b-GGUF
ctx-size = 0
"""


def setup_files(tmp_path: Path) -> Path:
    """The GGUF files and the fork's llama-server (the fake) the llama-swap config names."""
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    for name in ("qwen-chat", "embed", "small"):
        (gguf / f"{name}.gguf").write_bytes(b"not really a gguf")
    (tmp_path / "llama" / "bin").mkdir(parents=True)
    (tmp_path / "llama" / "bin" / "llama-server").symlink_to(FAKE_SERVER)
    return gguf


def run(tmp_path: Path, text: str, name: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    path = tmp_path / name
    path.write_text(text.replace("@DIR@", str(tmp_path)))
    out, err = io.StringIO(), io.StringIO()
    status = convert.main(str(path), environ if environ is not None else {}, out, err)
    return status, out.getvalue(), err.getvalue()


def convert_swap(tmp_path: Path) -> tuple[dict[str, Any], str, str]:
    gguf = setup_files(tmp_path)
    status, out, err = run(tmp_path, LLAMA_SWAP, "config.yaml", {"TEST_GGUF_DIR": str(gguf)})
    assert status == 0 and "check-config would refuse" not in err, err
    return tomllib.loads(out), out, err


def not_converted(out: str) -> list[str]:
    block = out[out.index("# Not converted:\n"):].splitlines()[1:]
    assert all(line.startswith("# - ") for line in block), block  # the block ends the output
    return [line[4:] for line in block]


def test_llama_swap_models_args_aliases_ttl_env_and_groups(tmp_path):
    data, out, _ = convert_swap(tmp_path)
    gguf = tmp_path / "gguf"
    assert data["models"] == {
        "qwen-chat": {"path": f"{gguf}/qwen-chat.gguf", "args": ["--ctx-size", "16384", "-ngl", "99", "--jinja"],
                      "binary": f"{tmp_path}/llama/bin/llama-server", "aliases": ["gpt-4o-mini", "qwen"],
                      "group": "together", "idle_ttl": 300.0,
                      "override": {"temperature": 0.6, "chat_template_kwargs": {"enable_thinking": False}},
                      "strip": ["top_k", "top_p"],
                      "env": {"CUDA_VISIBLE_DEVICES": "0", "GGML_CUDA_FORCE_MMQ": "1"}},
        "embed": {"path": f"{gguf}/embed.gguf", "args": ["--embeddings"], "group": "together", "idle_ttl": 0.0},
        "small": {"path": f"{gguf}/small.gguf", "args": ["-c", "2048", "--temp", "0.2"], "group": "solo"},
    }
    # llama-swap never unloads without a ttl (globalTTL 0); its startup hook and loading messages map
    assert data["backend"] == {"idle_ttl": 0.0, "ready_timeout": 240.0}
    assert data["scheduler"] == {"loading_feedback": True, "preload": ["qwen-chat"]}


def test_llama_swap_peers_become_remotes_without_their_keys(tmp_path):
    data, out, err = convert_swap(tmp_path)
    assert data["remotes"] == {
        "gpu-box": {"url": "http://192.168.1.50:8080", "api_key_env": "GPU_BOX_KEY",
                    "models": ["llama-70b", "mistral-large"]},
        "openrouter": {"url": "https://openrouter.ai/api", "api_key_env": "OPENROUTER_API_KEY",
                       "models": ["meta-llama/llama-3.1-8b-instruct"]},
    }
    assert [secret for secret in SECRETS if secret in out + err] == []
    assert any(line.startswith("peers.openrouter.apiKey: not copied: set OPENROUTER_API_KEY")
               for line in not_converted(out))


def test_llama_swap_not_converted_lines_end_the_toml_and_go_to_stderr(tmp_path):
    _, out, err = convert_swap(tmp_path)
    lines = not_converted(out)
    assert [line.split(":")[0] for line in lines] == [
        "logLevel", "startPort", "apiKeys", "groups.solo", "models.qwen-chat.name",
        "models.qwen-chat.useModelName", "models.embed.unlisted", "models.coder", "models.coder",
        "models.docker-llama", "peers.openrouter.apiKey", "peers.openrouter.filters"]
    text = "\n".join(lines)
    assert "`routerd serve --log-level DEBUG`" in text
    assert "models.coder: not converted: ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF is a download" in text
    assert "`routerctl pull ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF`" in text
    assert "its cmd runs docker, not llama-server" in text and "/models/tiny.gguf" in text
    assert "groups.solo: swap = true (one member at a time)" in text and "max_loaded_models = 1" in text
    assert "routerctl keys add NAME" in text
    assert err.splitlines()[1:] == [f"  - {line}" for line in lines]  # the same list, for people


def test_filters_become_request_rewriting(tmp_path):
    data, out, _ = convert_swap(tmp_path)
    model = data["models"]["qwen-chat"]
    assert model["override"] == {"temperature": 0.6, "chat_template_kwargs": {"enable_thinking": False}}
    assert model["strip"] == ["top_k", "top_p"]
    assert model["env"] == {"CUDA_VISIBLE_DEVICES": "0", "GGML_CUDA_FORCE_MMQ": "1"}  # still its own table
    assert "models.qwen-chat.filters" not in out.split("# Not converted:")[1]  # converted, not listed


def test_macros_expand_nested_and_from_the_environment_keeping_port():
    missing: set[str] = set()
    macros = {"bin": "${dir}/llama-server --port ${PORT}", "dir": "${env.HOME_X}/bin", "n": 4, "on": True}
    value = {"cmd": "${bin} -np ${n} --flag ${on} ${nope}", "list": ["${n}"]}
    assert convert.expand(value, macros, {"HOME_X": "/home/x"}, missing) == {
        "cmd": "/home/x/bin/llama-server --port ${PORT} -np 4 --flag true ${nope}", "list": ["4"]}
    assert missing == {"${nope}"}


def test_preset_ini_global_section_and_two_models(tmp_path):
    status, out, err = run(tmp_path, PRESET, "models.ini")
    assert status == 0, err
    data = tomllib.loads(out)
    assert data["backend"] == {"args": ["-c", "8192", "--n-gpu-layers", "99", "--jinja"],
                               "env": {"LLAMA_ARG_CACHE_RAM": "0"}, "stop_grace": 5.0}
    assert data["models"] == {
        "qwen3-8b": {"path": f"{tmp_path}/qwen3-8b.gguf",
                     "args": ["--ctx-size", "16384", "--temp", "0.6", "--chat-template-kwargs",
                              '{"enable_thinking": false}']},
        "gemma-small": {"path": f"{tmp_path}/gemma-small.gguf", "args": ["--flash-attn", "on"]},
    }
    assert data["scheduler"] == {"preload": ["qwen3-8b"]}
    lines = not_converted(out)
    assert [line.split(":")[0] for line in lines] == ["[gemma-small].port", "[ggml-org/gpt-oss-20b-GGUF]"]
    assert "`routerctl pull ggml-org/gpt-oss-20b-GGUF`" in lines[1]


def test_preset_false_cannot_turn_off_a_global_switch_for_one_model(tmp_path):
    status, out, _ = run(tmp_path, "[*]\njinja = true\n[m]\nmodel = /x/m.gguf\njinja = false\n", "p.ini")
    assert status == 0
    assert tomllib.loads(out)["models"] == {"m": {"path": "/x/m.gguf"}}
    assert not_converted(out) == ["[m].jinja = false: cannot turn off [*]'s flag for one model in routerd"]


def test_what_check_config_would_refuse_is_said_and_the_toml_still_printed(tmp_path):
    status, out, err = run(tmp_path, LLAMA_SWAP, "config.yaml", {"TEST_GGUF_DIR": "/srv/gguf"})  # no fork binary
    assert status == 0 and tomllib.loads(out)["models"]["qwen-chat"]["binary"] == f"{tmp_path}/llama/bin/llama-server"
    assert err.endswith("routerd convert: as it is, check-config would refuse it:\n"
                        f"  models.qwen-chat.binary: {tmp_path}/llama/bin/llama-server is not an executable file\n")


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "routerd", "check-config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_both_conversions_pass_check_config(tmp_path):
    _, swap_toml, _ = convert_swap(tmp_path)
    _, preset_toml, _ = run(tmp_path, PRESET, "models.ini")
    for name, text in (("swap.toml", swap_toml), ("preset.toml", preset_toml)):
        (tmp_path / name).write_text(text)
        result = check_config(tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count('"path"') == (3 if name == "swap.toml" else 2)


def test_the_cli_converts_and_refuses_what_it_cannot_read_with_exit_2(tmp_path):
    (tmp_path / "models.ini").write_text(PRESET.replace("@DIR@", str(tmp_path)))
    (tmp_path / "bad.yaml").write_text("models: [unclosed\n")
    (tmp_path / "other.yml").write_text("services:\n  web: {}\n")
    (tmp_path / "notes.txt").write_text("just some words\n")
    cases = {"models.ini": (0, "routerd convert: not converted"), "missing.yaml": (2, "cannot read it"),
             "bad.yaml": (2, "not valid YAML (line 2"), "other.yml": (2, "without a models: map"),
             "notes.txt": (2, "not a llama.cpp preset (INI) file: line 1: 'just some words'")}
    for name, (status, message) in cases.items():
        result = subprocess.run([sys.executable, "-m", "routerd", "convert", str(tmp_path / name)],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert (result.returncode, message in result.stderr) == (status, True), (name, result.stderr)
        assert bool(result.stdout) == (status == 0)
        if status == 2:
            assert "a llama-swap config.yaml (a models: map) or a llama.cpp --models-preset .ini" in result.stderr


async def test_a_converted_llama_swap_config_serves_its_models_and_aliases(start_routerd, tmp_path):
    data, _, _ = convert_swap(tmp_path)
    # The peers are addresses of the example, not servers; the rest is served as converted, with the
    # fake llama-server for the models that run the default one (qwen-chat runs its own: the fake too).
    data.pop("remotes")
    base = make_config(tmp_path, {})
    data.update(server=base["server"], control=base["control"])
    data["backend"].update(binary=FAKE_SERVER, stop_grace=2.0)
    r = await start_routerd(data, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for model in ("qwen-chat", "gpt-4o-mini", "qwen", "embed", "small"):
        response = await r.http.post("/v1/chat/completions",
                                     json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, (model, response.text)
    listed = (await r.http.get("/v1/models")).json()["data"]
    assert {"qwen-chat", "gpt-4o-mini", "qwen", "embed", "small"} <= {m["id"] for m in listed}


def test_an_env_value_taken_from_the_environment_is_not_printed(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    config = ("models:\n  m:\n    cmd: llama-server --port ${PORT} -m " + str(model) + "\n"
              "    env:\n      - HF_TOKEN=${env.SECRET_TOKEN}\n      - GGML_X=1\n")
    status, out, err = run(tmp_path, config, "config.yaml", {"SECRET_TOKEN": "hf_s3cr3t"})
    assert status == 0 and "hf_s3cr3t" not in out + err
    data = tomllib.loads(out)
    assert data["models"]["m"]["env"] == {"GGML_X": "1"}
    assert any("HF_TOKEN takes its value from the environment" in line for line in not_converted(out))
