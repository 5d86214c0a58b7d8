#!/usr/bin/env python3
"""`make bench`: routerd against llama.cpp's router mode and a directly started llama-server.

All three run side by side on the demo models and are measured interleaved (the machine is
noisy), so every figure is a ratio within one run. Prints a markdown table; with --write it
also writes docs/benchmarks.md. After the tables it prints issue 26's targets, each with this
run's figure and whether it was met (computed from the rows; printed, not written). Figures never
fail anything: this is not a test.

    .venv/bin/python bench/run.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import tomli_w
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

import cost  # noqa: E402
import slots  # noqa: E402
from demo import demo_model_paths  # noqa: E402
from loadgen import (  # noqa: E402
    evict_from_page_cache,
    free_port,
    process_cpu,
    resident_fraction,
    router_mode,
    wait_http,
    write_tiny_ggufs,
)
from routerd import config as config_mod  # noqa: E402
from routerd.models import discovery  # noqa: E402

SMALL, OTHER, COLD = "smollm2", "gemma3", "cold"
CHAT = [{"role": "user", "content": "Say hello."}]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class Target:
    """One server under test: a base URL and the model names it knows."""

    def __init__(self, name: str, url: str, proc: subprocess.Popen, models: dict[str, str]) -> None:
        self.name, self.url, self.proc, self.models = name, url, proc, models


def start_all(work: Path, binary: str, models: dict[str, Path], routerd_log: Path | None,
              extra_args: tuple[str, ...] = ()) -> list[Target]:
    """Direct llama-server (the small model), router mode and routerd (small, other and, when
    ``models`` has it, ``cold``: a private copy nobody else maps, for page-cache evictions)."""
    work.mkdir(exist_ok=True)
    common = ["--ctx-size", "2048", "--threads", "2", "--fit", "off", *extra_args]
    direct_port, router_port, routerd_port = free_port(), free_port(), free_port()
    direct = subprocess.Popen([binary, "-m", str(models["smollm2-135m"]), "--port", str(direct_port), "--alias", SMALL,
                               *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = {SMALL: models["smollm2-135m"], OTHER: models["gemma3-270m"]}
    if COLD in models:
        files[COLD] = models[COLD]
    router = router_mode(binary, work, files, router_port, common)
    config = {"server": {"port": routerd_port}, "control": {"socket": str(work / "control.sock")},
              "backend": {"binary": binary, "args": common, "max_loaded_models": 1, "idle_ttl": 0},
              "catalog": {"hf_cache": False},
              "models": {name: {"path": str(path)} for name, path in files.items()}}
    (work / "routerd.toml").write_text(tomli_w.dumps(config))
    env = {**os.environ, "STATE_DIRECTORY": str(work / "state")}
    log = open(routerd_log, "wb") if routerd_log else subprocess.DEVNULL  # noqa: SIM115 (lives with the process)
    routerd = subprocess.Popen([sys.executable, "-m", "routerd", "serve", "--config", str(work / "routerd.toml"),
                                "--log-level", "INFO" if routerd_log else "WARNING"], env=env, cwd=ROOT,
                               stdout=log, stderr=log)
    names = {name: name for name in files}
    return [Target("direct", f"http://127.0.0.1:{direct_port}", direct, {SMALL: SMALL}),
            Target("llama.cpp router", f"http://127.0.0.1:{router_port}", router, names),
            Target("routerd", f"http://127.0.0.1:{routerd_port}", routerd, names)]


def stop_all(targets: list[Target]) -> None:
    for t in targets:
        t.proc.terminate()
        t.proc.wait()


async def interleaved(targets: list[Target], rounds: int, measure: Callable[[Target], Awaitable[float | None]],
                      ) -> dict[str, list[float]]:
    """Run ``measure`` round-robin over the targets in a shuffled order each round."""
    results: dict[str, list[float]] = {t.name: [] for t in targets}
    rng = random.Random(1)
    for _ in range(rounds):
        order = list(targets)
        rng.shuffle(order)
        for target in order:
            value = await measure(target)
            if value is not None:
                results[target.name].append(value)
    return results


class Bench:
    def __init__(self, targets: list[Target], quick: bool) -> None:
        self.targets = targets
        self.quick = quick
        self.goals = cost.Goals()
        self.client = httpx.AsyncClient(timeout=120, trust_env=False, limits=httpx.Limits(max_connections=200))
        self.rows: list[tuple[str, str, str, str]] = []  # figure, direct, router, routerd
        #: Requests a server answered by closing a kept-alive connection; each is retried once.
        self.dropped = {t.name: 0 for t in targets}

    def row(self, figure: str, values: dict[str, str]) -> None:
        self.rows.append((figure, values.get("direct", "-"), values.get("llama.cpp router", "-"),
                          values.get("routerd", "-")))
        print(f"{figure}: {values}", flush=True)

    def stats_rows(self, figure: str, results: dict[str, list[float]], baseline: str = "direct",
                   goal: str | None = None) -> None:
        """A row of medians and spreads. With ``goal``: routerd's added latency over ``baseline``
        as a multiple of router mode's, in routerd's cell and as an issue 26 target (<= 0.5x)."""
        base = statistics.median(results[baseline]) if results.get(baseline) else None
        cells = {}
        for name, values in results.items():
            if not values:
                continue
            median = statistics.median(values)
            added = f", {(median - base) * 1000:+.2f} ms" if base is not None and name != baseline else ""
            ratio = f", {median / base:.2f}x" if base and name != baseline else ""
            spread = (f"p90 {ms(pct(values, 0.9))}, p99 {ms(pct(values, 0.99))}" if len(values) >= 20
                      else "each " + ", ".join(f"{v * 1000:.0f}" for v in sorted(values)) + " ms")
            cells[name] = f"{ms(median)} ({spread}{added}{ratio})"
        if goal is not None:
            router, routerd = self.targets[1].name, self.targets[2].name
            if base is None or not results.get(router) or not results.get(routerd):
                self.goals.add(goal, "no figure", None)
            else:
                ours, theirs = (statistics.median(results[n]) - base for n in (routerd, router))
                if theirs > 0:
                    times = f"{ours / theirs:.2f}x router mode's added latency"
                    cells[routerd] += f", **{times}**"
                    self.goals.add(goal, f"{ours * 1000:+.2f} vs {theirs * 1000:+.2f} ms, {times}",
                                   ours <= 0.5 * theirs)
                else:
                    self.goals.add(goal, f"{ours * 1000:+.2f} vs {theirs * 1000:+.2f} ms: router mode added nothing "
                                   "over direct in this run, no ratio", None)
        self.row(figure, cells)

    async def timed(self, method: str, target: Target, path: str, body: dict) -> float:
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                response = await self.client.request(method, target.url + path, json=body)
            except httpx.RemoteProtocolError:
                if attempt == 2:
                    raise
                self.dropped[target.name] += 1
                continue
            response.raise_for_status()
            return time.perf_counter() - start
        raise AssertionError("unreachable")

    def dropped_row(self) -> None:
        if any(self.dropped.values()):
            self.row("requests answered by closing a kept-alive connection (retried, not timed)",
                     {name: str(count) for name, count in self.dropped.items()})

    async def latency(self) -> None:
        n = 30 if self.quick else 400

        async def tokenize(t: Target) -> float:
            return await self.timed("POST", t, "/tokenize", {"model": t.models[SMALL], "content": "hello world"})

        async def one_token(t: Target) -> float:
            return await self.timed("POST", t, "/v1/chat/completions",
                                    {"model": t.models[SMALL], "messages": CHAT, "max_tokens": 1})
        for t in self.targets:  # warm: every target has SMALL loaded
            await one_token(t)
        self.stats_rows("1. POST /tokenize", await interleaved(self.targets, n, tokenize),
                        goal="added latency, /tokenize: routerd <= 0.5x router mode's (row 1)")
        self.stats_rows("1. chat, 1 token", await interleaved(self.targets, n // 2, one_token),
                        goal="added latency, 1-token chat: routerd <= 0.5x router mode's (row 1)")

    async def stream_once(self, t: Target, tokens: int) -> tuple[float, list[float], int]:
        """Time to first byte, gaps between chunks, chunk count, for one streamed chat."""
        body = {"model": t.models[SMALL], "messages": CHAT, "max_tokens": tokens, "stream": True,
                "ignore_eos": True}
        start = time.perf_counter()
        first = None
        gaps: list[float] = []
        last = start
        chunks = 0
        async with self.client.stream("POST", t.url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
        return first or float("nan"), gaps, chunks

    async def streaming(self) -> None:
        n = 3 if self.quick else 20
        ttfb: dict[str, list[float]] = {t.name: [] for t in self.targets}
        gaps: dict[str, list[float]] = {t.name: [] for t in self.targets}
        routerd = self.targets[-1]
        cpu_before, chunks_total = process_cpu(routerd.proc.pid), 0
        for _ in range(n):
            for t in random.sample(self.targets, len(self.targets)):
                try:
                    first, g, chunks = await self.stream_once(t, 128)
                except httpx.RemoteProtocolError:  # a kept-alive connection the server closed: count, retry
                    self.dropped[t.name] += 1
                    first, g, chunks = await self.stream_once(t, 128)
                ttfb[t.name].append(first)
                gaps[t.name] += g
                if t is routerd:
                    chunks_total += chunks
        cpu = process_cpu(routerd.proc.pid) - cpu_before
        self.stats_rows("2. stream 128 tokens: time to first byte", ttfb)
        base = gaps["direct"]
        cells = {name: f"p50 {ms(pct(v, 0.5))}, p99 {ms(pct(v, 0.99))}"
                 + (f" (+{ms(pct(v, 0.5) - pct(base, 0.5))} p50, +{ms(pct(v, 0.99) - pct(base, 0.99))} p99)"
                    if name != "direct" else "") for name, v in gaps.items()}
        self.row("2. stream: gap between chunks", cells)
        self.row("3. routerd CPU per 1000 streamed chunks", {"routerd": f"{cpu / max(1, chunks_total) * 1000:.2f} s"})

    async def throughput(self) -> None:
        for concurrency in (1, 16, 64):
            total = max(16 if self.quick else 64, concurrency * (2 if self.quick else 4))
            cells = {}
            for t in random.sample(self.targets, len(self.targets)):
                errors = 0
                start = time.perf_counter()

                async def worker(count: int, t: Target = t) -> None:
                    nonlocal errors
                    for _ in range(count):
                        try:
                            await self.timed("POST", t, "/v1/chat/completions",
                                             {"model": t.models[SMALL], "messages": CHAT, "max_tokens": 8})
                        except httpx.HTTPError:
                            errors += 1
                async with trio.open_nursery() as nursery:
                    for _ in range(concurrency):
                        nursery.start_soon(worker, total // concurrency)
                rate = total / (time.perf_counter() - start)
                cells[t.name] = f"{rate:.1f} req/s" + (f", {errors} errors" if errors else "")
            self.row(f"3. throughput, concurrency {concurrency} (8-token chats)", cells)

    async def cold_and_swap(self, binary: str, small_path: str, cold_path: str) -> None:
        n = 2 if self.quick else 8
        router, routerd = self.targets[1], self.targets[2]

        async def first_token(t: Target, model: str) -> float:
            start = time.perf_counter()
            async with self.client.stream("POST", t.url + "/v1/chat/completions", json={
                    "model": model, "messages": CHAT, "max_tokens": 4, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        break
            return time.perf_counter() - start

        async def unload(t: Target, model: str) -> None:
            if t is router:
                await self.client.post(t.url + "/models/unload", json={"model": model})
                while True:  # its unload returns before the child has exited: wait for "unloaded"
                    listed = (await self.client.get(t.url + "/models")).json()["data"]
                    if next(m for m in listed if m["id"] == model)["status"]["value"] == "unloaded":
                        break
                    await trio.sleep(0.05)
            else:
                subprocess.run([sys.executable, "-m", "routerctl", "--socket", str(control_socket(t)), "unload", model],
                               capture_output=True, cwd=ROOT)

        cold: dict[str, list[float]] = {"direct": [], router.name: [], routerd.name: []}
        from_disk: dict[str, list[float]] = {"direct": [], router.name: [], routerd.name: []}
        swap: dict[str, list[float]] = {router.name: [], routerd.name: []}
        left_cached = 0.0  # the largest share of the file still cached after an eviction
        for _ in range(n):
            for name in random.sample(list(from_disk), 3):  # nothing has the private copy open now
                evict_from_page_cache(cold_path)
                left_cached = max(left_cached, resident_fraction(cold_path))
                if name == "direct":
                    from_disk[name].append(await direct_cold_start(binary, cold_path))
                    continue
                t = router if name == router.name else routerd
                for model in (SMALL, OTHER):  # a load, not a swap (one model at a time)
                    await unload(t, model)
                from_disk[name].append(await first_token(t, COLD))
                await unload(t, COLD)
            cold["direct"].append(await direct_cold_start(binary, small_path))
            for t in random.sample([router, routerd], 2):
                await first_token(t, SMALL)
                await unload(t, SMALL)
                cold[t.name].append(await first_token(t, SMALL))
            for t in random.sample([router, routerd], 2):
                await first_token(t, SMALL)  # A loaded; B must replace it (one model at a time)
                swap[t.name].append(await first_token(t, OTHER))
        self.stats_rows("4. cold start: request to first token (direct: process start to first token)", cold)
        self.stats_rows(f"4. cold start, model file not in the page cache (fadvise DONTNEED; at most "
                        f"{left_cached:.0%} of it left cached)", from_disk)
        self.stats_rows("5. swap A -> B under a one-model limit, to first token", swap, baseline=router.name)

    async def many_streams(self) -> None:
        cells = {}
        routerd = self.targets[-1]
        peak = [rss_mib(routerd.proc.pid)]
        for t in random.sample(self.targets, len(self.targets)):
            errors, durations = 0, []

            async def one(t: Target = t, durations: list[float] = durations) -> None:
                nonlocal errors
                start = time.perf_counter()
                try:
                    await self.stream_once(t, 32)
                    durations.append(time.perf_counter() - start)
                except httpx.HTTPError:
                    errors += 1

            async def sample_rss(stop: trio.Event) -> None:
                while not stop.is_set():
                    peak.append(rss_mib(routerd.proc.pid))
                    with trio.move_on_after(0.05):
                        await stop.wait()
            stop = trio.Event()
            async with trio.open_nursery() as outer:
                outer.start_soon(sample_rss, stop)
                async with trio.open_nursery() as nursery:
                    for _ in range(64):
                        nursery.start_soon(one)
                stop.set()
            cells[t.name] = f"{errors} errors, median {statistics.median(durations):.2f} s per 32-token stream"
        self.row("6. 64 concurrent streams", cells)
        self.row("7. routerd RSS under 64 streams (peak)", {"routerd": f"{max(peak):.1f} MiB"})

    async def aclose(self) -> None:
        await self.client.aclose()


def control_socket(target: Target) -> Path:
    return Path(target.proc.args[target.proc.args.index("--config") + 1]).parent / "control.sock"


async def direct_cold_start(binary: str, model: str) -> float:
    """The limit: start llama-server, wait for /health, stream to the first token."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([binary, "-m", model, "--port", str(port), "--ctx-size", "2048", "--threads", "2",
                             "--fit", "off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            while True:
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.005)
            async with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={
                    "messages": CHAT, "max_tokens": 4, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        break
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def catalog_scale(work: Path, binary: str, quick: bool) -> list[tuple[str, str]]:
    count = 200 if quick else 1000
    folder = work / "synthetic"
    folder.mkdir()
    write_tiny_ggufs(folder, [f"synthetic-{i:04d}-Q4_K_M" for i in range(count)])
    start = time.perf_counter()
    found = discovery.scan_folder(folder)
    scan = time.perf_counter() - start
    port = free_port()
    config = {"server": {"port": port}, "control": {"socket": str(work / "scale.sock")},
              "backend": {"binary": binary}, "catalog": {"hf_cache": False, "folders": [str(folder)]}}
    (work / "scale.toml").write_text(tomli_w.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "routerd", "serve", "--config", str(work / "scale.toml"),
                             "--log-level", "WARNING"], cwd=ROOT,
                            env={**os.environ, "STATE_DIRECTORY": str(work / "s2")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_http(f"http://127.0.0.1:{port}")
        times = []
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            for _ in range(5 if quick else 30):
                t0 = time.perf_counter()
                response = await client.get(f"http://127.0.0.1:{port}/v1/models")  # the whole body read
                times.append(time.perf_counter() - t0)
                listed = response.json()
        idle = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    assert len(found) == count and len(listed["data"]) >= count
    return [(f"8. discovery of {count} GGUF files (cold header cache)", f"{scan:.2f} s"),
            (f"8. GET /v1/models with {count} models", f"{ms(statistics.median(times))} median"),
            (f"7. routerd RSS idle with {count} models", f"{idle:.1f} MiB")]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}")


def private_copy(source: Path, target: Path) -> Path:
    """A copy of a model file that only the cold-start rows open, so evicting it from the page
    cache is not undone by another process keeping it mapped."""
    shutil.copyfile(source, target)
    with open(target, "rb") as copy:
        os.fsync(copy.fileno())  # dirty pages cannot be dropped
    return target


def write_block(text: str, marker: str, block: str) -> str:
    """``text`` with the part between two ``marker`` lines replaced by ``block`` (appended when absent)."""
    wrapped = f"{marker}\n{block}\n{marker}"
    if marker not in text:
        return text + "\n" + wrapped + "\n"
    head, _, rest = text.partition(marker)
    return head + wrapped + rest.partition(marker)[2]


PHASES = ("latency", "streaming", "throughput", "streams", "cold", "cheap", "events", "floor", "slots", "scale",
          "catalog")


async def main(quick: bool, write: bool, routerd_log: Path | None, only: set[str]) -> None:
    models = demo_model_paths(ROOT / "demo")
    binary = config_mod.resolve_llama_server(config_mod.Config(), os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models[COLD] = private_copy(models["smollm2-135m"], work / "cold-copy.gguf")
        targets = start_all(work / "main", binary, models, routerd_log)
        bench = Bench(targets, quick)
        try:
            for t in targets:
                await wait_http(t.url)
            rss_idle = rss_mib(targets[-1].proc.pid)
            bench.row("7. routerd RSS idle (3 models configured, none loaded)", {"routerd": f"{rss_idle:.1f} MiB"})
            if "latency" in only:
                await bench.latency()
            if "streaming" in only:
                await bench.streaming()
            if "throughput" in only:
                await bench.throughput()
            if "streams" in only:
                await bench.many_streams()
            if "cold" in only:
                await bench.cold_and_swap(binary, str(models["smollm2-135m"]), str(models[COLD]))
            bench.dropped_row()
            await bench.aclose()
        finally:
            stop_all(targets)
        if "cheap" in only:  # a model started with --embeddings, one short input per request
            cheap = start_all(work / "cheap", binary, {k: v for k, v in models.items() if k != COLD}, routerd_log,
                              extra_args=("--embeddings", "--pooling", "mean"))
            try:
                for t in cheap:
                    await wait_http(t.url)
                await cost.cheap_requests(bench.row, cheap, quick, bench.goals)
            finally:
                stop_all(cheap)
        if "events" in only:
            await cost.paced_events(bench.row, work / "events", quick, bench.goals)
        if "floor" in only:
            await cost.design_floor(bench.row, work, quick, bench.goals)
        if "slots" in only and not quick:  # minutes of prefill on a CPU: not in the quick smoke run
            bench.row(*await slots.bench_row(work / "slots"))
        scale_table = await cost.scale(work, quick) if "scale" in only else []
        catalog = await catalog_scale(work, binary, quick) if "catalog" in only else []
    lines = ["| figure | direct llama-server | llama.cpp router mode | routerd |", "|---|---|---|---|"]
    lines += [f"| {f} | {d} | {r} | {o} |" for f, d, r, o in bench.rows]
    lines += [f"| {f} | - | - | {v} |" for f, v in catalog]
    table = "\n".join(lines)
    print("\n" + table)
    if scale_table:
        print("\nrouterd CPU per request and per relayed event (stand-in backends):\n" + "\n".join(scale_table))
    if bench.goals.items:
        met = sum(1 for *_, ok in bench.goals.items if ok)
        print(f"\nissue 26 targets: {met} of {len(bench.goals.items)} met in this run (ratios within it):\n"
              + "\n".join(bench.goals.table()))
    if write:
        out = ROOT / "docs" / "benchmarks.md"
        text = out.read_text() if out.exists() else ""
        stamp = (f"Machine: {machine()}. Command: `make bench` "
                 f"(`bench/run.py{' --quick' if quick else ''} --write`), {time.strftime('%Y-%m-%d')}.")
        text = write_block(text, "<!-- bench table -->", f"{stamp}\n\n{table}")
        if scale_table:
            text = write_block(text, "<!-- scale table -->", f"{stamp}\n\n" + "\n".join(scale_table))
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md with the table")
    parser.add_argument("--routerd-log", type=Path, help="keep routerd's log (INFO) in this file")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases to run (default all: {','.join(PHASES)})")
    args = parser.parse_args()
    phases = set(args.only.split(","))
    if unknown := phases - set(PHASES):
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    trio.run(main, args.quick, args.write, args.routerd_log, phases)
