#!/usr/bin/env python3
"""Saved KV slots (issue 29): the next turn of a long conversation after a swap away and back.

Measures time to first token (a streamed chat: from sending the request to the first chunk with
content) of turn 2 of a ~3,000-token conversation on SmolLM2 after a request for Gemma evicted
SmolLM2 (one model at a time) and turn 2 brought it back, in three setups run side by side and
measured interleaved (the machine is noisy):

- routerd with ``[slots] save = true``: SmolLM2's slot is saved when it is evicted and restored
  when it starts again, so turn 2 prefills only its new tokens;
- routerd with ``[slots] save = false``: turn 2 prefills the whole conversation;
- llama.cpp's router mode (the same llama-server, ``--models-dir`` over the two GGUFs,
  ``--models-max 1``): the same, by llama.cpp alone.

Each repeat is a fresh conversation (turn 1: a ~3,000-token user message, temperature 0, 8
tokens; swap: a short chat to Gemma; turn 2: the conversation, turn 1's answer and a short
question, streamed). Reports medians of TTFT and of llama-server's ``timings.cache_n`` /
``prompt_n`` (tokens reused from the cache / prefilled) of turn 2, the ratios, and issue 29's
target (restore <= 0.1x without). Figures never fail anything; errors do (non-zero exit).

    .venv/bin/python bench/slots.py [--repeat 3] [--base-port 18600]

`make bench` (bench/run.py) runs it as row 13.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import tomli_w
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo import demo_model_paths  # noqa: E402
from loadgen import router_mode, wait_http  # noqa: E402
from routerd import config as config_mod  # noqa: E402

SMALL, OTHER = "smollm2", "gemma3"
ARGS = ["--ctx-size", "4096", "--parallel", "1", "--threads", "2", "--fit", "off"]
RESTORE, WITHOUT, ROUTER = "routerd, slots restored", "routerd, slots.save = false", "llama.cpp router mode"
WORDS = ("amber river quiet market northern garden copper lantern winter harbor silver meadow patient "
         "engine distant valley orange bridge careful signal morning forest simple ladder hollow stone").split()


def conversation(seed: int, sentences: int = 160) -> str:
    """A deterministic ~3,000-token user message (numbered notes of common words)."""
    rng = random.Random(seed)
    notes = [f"Note {i}: the {' '.join(rng.choices(WORDS, k=6))} stays near the {rng.choice(WORDS)}."
             for i in range(sentences)]
    return "Read these notes carefully.\n" + "\n".join(notes)


def ports(base: int | None, count: int) -> list[int]:
    """``count`` free ports from ``base`` up (None: any free ones)."""
    found: list[int] = []
    for port in range(base, base + 100) if base else [0] * count:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            found.append(s.getsockname()[1])
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free ports from {base}")


@attrs.define
class Setup:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    ttft: list[float] = attrs.Factory(list)
    cache: list[tuple[int, int]] = attrs.Factory(list)  # (cache_n, prompt_n) of each turn 2

    def summary(self) -> str:
        cache, prompt = (statistics.median(c[i] for c in self.cache) for i in (0, 1))
        return f"{statistics.median(self.ttft):.2f} s (cache_n {cache:.0f}, prompt_n {prompt:.0f})"


def start(work: Path, binary: str, models: dict[str, Path], base_port: int | None) -> list[Setup]:
    work.mkdir(parents=True, exist_ok=True)
    restore_port, without_port, router_port = ports(base_port, 3)
    files = {SMALL: models["smollm2-135m"], OTHER: models["gemma3-270m"]}
    setups = []
    for name, port, save in ((RESTORE, restore_port, True), (WITHOUT, without_port, False)):
        folder = work / ("restore" if save else "without")
        folder.mkdir()
        config = {"server": {"port": port}, "control": {"socket": str(folder / "control.sock")},
                  "backend": {"binary": binary, "args": ARGS, "max_loaded_models": 1, "idle_ttl": 0},
                  "catalog": {"hf_cache": False}, "slots": {"save": save},
                  "models": {m: {"path": str(path)} for m, path in files.items()}}
        (folder / "routerd.toml").write_text(tomli_w.dumps(config))
        log = open(folder / "routerd.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "routerd"), "serve", "--config",
                                 str(folder / "routerd.toml"), "--log-level", "INFO"], cwd=ROOT,
                                env={**os.environ, "STATE_DIRECTORY": str(folder / "state")}, stdout=log, stderr=log)
        setups.append(Setup(name, f"http://127.0.0.1:{port}", proc))
    router = router_mode(binary, work, files, router_port, ARGS)
    setups.append(Setup(ROUTER, f"http://127.0.0.1:{router_port}", router))
    return setups


def stop(setups: list[Setup]) -> None:
    for s in setups:
        s.proc.terminate()
    for s in setups:
        try:
            s.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


async def chat(client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]],
               max_tokens: int) -> dict[str, Any]:
    response = await client.post(url + "/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


async def streamed(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]]) -> tuple[float, dict[str, Any]]:
    """Time to the first content chunk, and llama-server's ``timings`` (from its last chunk)."""
    body = {"model": SMALL, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first: float | None = None
    timings: dict[str, Any] = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            timings = chunk.get("timings") or timings
    if first is None or not timings:
        raise RuntimeError(f"{url}: turn 2 streamed no content or no timings")
    return first, timings


async def one_repeat(client: httpx.AsyncClient, setup: Setup, seed: int) -> None:
    messages = [{"role": "user", "content": conversation(seed)}]
    turn1 = await chat(client, setup.url, SMALL, messages, 8)
    prompt = turn1["usage"]["prompt_tokens"]
    if not 2800 <= prompt <= 3200:
        raise RuntimeError(f"{setup.name}: turn 1 had {prompt} prompt tokens, not ~3,000")
    await chat(client, setup.url, OTHER, [{"role": "user", "content": "Say hello."}], 4)  # SmolLM2 evicted
    messages += [{"role": "assistant", "content": turn1["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Which note mentions a copper lantern first?"}]
    ttft, timings = await streamed(client, setup.url, messages)
    setup.ttft.append(ttft)
    setup.cache.append((int(timings.get("cache_n", 0)), int(timings.get("prompt_n", 0))))
    print(f"  {setup.name}: TTFT {ttft:.2f} s, cache_n {setup.cache[-1][0]}, prompt_n {setup.cache[-1][1]}",
          flush=True)


def restored_slots(metrics: str) -> float:
    """SmolLM2's ``routerd_slots_total{direction="restored"}`` in a /metrics page."""
    return sum(float(m.group(2)) for m in re.finditer(r'^routerd_slots_total\{([^}]*)\} (\S+)$', metrics, re.MULTILINE)
               if 'direction="restored"' in m.group(1) and f'model="{SMALL}"' in m.group(1))


@attrs.frozen
class Result:
    setups: list[Setup]
    restored: float  # SmolLM2's routerd_slots_total{direction="restored"} in the restoring routerd
    log_lines: list[str]  # its log's lines about slots

    def setup(self, name: str) -> Setup:
        return next(s for s in self.setups if s.name == name)

    def table(self) -> str:
        lines = ["| setup | TTFT median (s) | each (s) | cache_n / prompt_n (median) |", "|---|---|---|---|"]
        for s in self.setups:
            cache, prompt = (statistics.median(c[i] for c in s.cache) for i in (0, 1))
            each = ", ".join(f"{v:.2f}" for v in s.ttft)
            lines.append(f"| {s.name} | {statistics.median(s.ttft):.2f} | {each} | {cache:.0f} / {prompt:.0f} |")
        return "\n".join(lines)

    def ratios(self) -> tuple[float, float]:
        ours, without, router = (statistics.median(self.setup(n).ttft) for n in (RESTORE, WITHOUT, ROUTER))
        return ours / without, ours / router

    def verdict(self) -> str:
        return "met" if self.ratios()[0] <= 0.1 else "not met"


async def measure(work: Path, repeat: int = 3, base_port: int | None = None) -> Result:
    models = demo_model_paths(ROOT / "demo")
    binary = config_mod.resolve_llama_server(config_mod.Config(), os.environ)
    setups = start(work, binary, models, base_port)
    try:
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            for s in setups:
                await wait_http(s.url, timeout=120)
            rng = random.Random(29)
            for r in range(repeat):
                print(f"repeat {r + 1} of {repeat}", flush=True)
                for s in rng.sample(setups, len(setups)):
                    await one_repeat(client, s, seed=r)
            metrics = (await client.get(setups[0].url + "/metrics")).text
    finally:
        stop(setups)
    log = (work / "restore" / "routerd.log").read_text(errors="replace").splitlines()
    ours = [line for line in log if ("routerd.slots" in line or "restor" in line.lower())
            and "routerd.backend: [" not in line]  # routerd's own lines, not llama-server's
    return Result(setups, restored_slots(metrics), ours)


async def bench_row(work: Path) -> tuple[str, dict[str, str]]:
    """Row 13 of `make bench` (bench/run.py): the figure and its cells."""
    result = await measure(work)
    vs_without, vs_router = result.ratios()
    return ("13. next turn after a swap: TTFT of turn 2 of a ~3,000-token SmolLM2 conversation after Gemma evicted "
            "it (median of 3)",
            {"llama.cpp router mode": result.setup(ROUTER).summary(),
             "routerd": f"restored: {result.setup(RESTORE).summary()}; slots.save = false: "
                        f"{result.setup(WITHOUT).summary()}; **{vs_without:.3f}x "
                        f"without restore** (target <= 0.1x: {result.verdict()}), {vs_router:.3f}x router mode; "
                        f"{result.restored:g} SmolLM2 slot(s) restored"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="conversations per setup (default 3)")
    parser.add_argument("--base-port", type=int, default=18600, help="first port to try (default 18600)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = trio.run(measure, Path(tmp), args.repeat, args.base_port)
    vs_without, vs_router = result.ratios()
    print("\n" + result.table())
    print(f"\nrestore / without restore: {vs_without:.3f}x; restore / router mode: {vs_router:.3f}x")
    print(f"target (issue 29): restore <= 0.1x without restore: {result.verdict()}")
    print(f'routerd_slots_total{{model="{SMALL}",direction="restored"}} of the restoring routerd: {result.restored:g}'
          f" ({args.repeat} swaps back)")
    print(f"its log's lines about saving or restoring ({len(result.log_lines)}):", *result.log_lines[-10:], sep="\n  ")


if __name__ == "__main__":
    main()
