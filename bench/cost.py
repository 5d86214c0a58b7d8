"""routerd's own cost, for `make bench`: cheap requests at full speed, relayed SSE events, scale.

- Cheap requests: ``/tokenize`` and ``/v1/embeddings`` (one short input) from ``wrk`` at
  concurrency 16 and 64, interleaved over direct llama-server, router mode and routerd; the
  CPU each proxy process spends per request (router mode's router process, routerd).
- Paced streams: 64 SSE streams from a fast stand-in backend (bench/standin.py) that emits one
  event per stream every 10 ms, read directly and through routerd: delivered vs offered rate,
  routerd's CPU per event.
- Scale: routerd's CPU per request and per event at concurrency 1/16/64/256 with 1/4/16
  resident stand-in backends.
- The design's floor: the same two CPU figures for routerd's HTTP front serving a do-nothing
  app, and a bare relay on that front (bench/floor.py), interleaved with routerd: what the design
  (hypercorn + trio) costs before routerd's own logic.

Figures only; nothing here asserts a timing.
"""

from __future__ import annotations

import functools
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import tomli_w
import trio

from loadgen import StreamRun, free_port, paced_streams, process_cpu, wait_http, write_tiny_ggufs, wrk

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STANDIN = BENCH / "standin.py"
FLOOR = BENCH / "floor.py"
#: Seconds between two events of one stand-in stream: 100 events/s, a fast GPU's token rate.
EVENT_INTERVAL = 0.01

Row = Callable[[str, dict[str, str]], None]
T = TypeVar("T")


def _body(model: str, route: str) -> bytes:
    if route == "/tokenize":
        return json.dumps({"model": model, "content": "hello world"}).encode()
    return json.dumps({"model": model, "input": "hello world"}).encode()


def _stream_body(model: str, events: int) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": events, "stream": True}).encode()


def _standin_argv(port: int) -> list[str]:
    """The stand-in backend on ``port``, run directly (not by routerd), pacing its streams."""
    return [sys.executable, str(STANDIN), "--port", str(port), "--standin-interval", str(EVENT_INTERVAL)]


def _times(value: float, base: float, what: str) -> str:
    """``value`` as a multiple of ``base`` ("0.44x router mode"); a base of zero (a target that
    answered nothing in a short smoke run) says so instead of dividing by it."""
    return f"{value / base:.2f}x {what}" if base > 0 else f"no ratio: {what} measured zero"


async def _with_cpu(pid: int | None, generate: Callable[[], T]) -> tuple[T, float | None]:
    """Run the blocking load generator ``generate`` in a thread; its result, and the CPU seconds
    process ``pid`` used meanwhile (None without a pid)."""
    before = process_cpu(pid) if pid else 0.0
    result = await trio.to_thread.run_sync(generate)
    return result, (process_cpu(pid) - before) if pid else None


async def cheap_requests(row: Row, targets: Sequence[Any], quick: bool) -> None:
    """Rows 9-10: cheap-request throughput at c=16/64 and each proxy's CPU per 1000 requests.

    ``targets`` are (direct, router mode, routerd) serving the small model with --embeddings."""
    seconds, rounds = (1, 1) if quick else (5, 3)
    proxies = {t.name for t in targets[1:]}
    cpu_per_request: dict[str, list[float]] = {name: [] for name in proxies}
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        for t in targets:  # load the model everywhere before timing
            for route in ("/tokenize", "/v1/embeddings"):
                (await client.post(t.url + route, content=_body(t.models["smollm2"], route))).raise_for_status()
    for route in ("/tokenize", "/v1/embeddings"):
        for connections in (16, 64):
            rates: dict[str, list[float]] = {t.name: [] for t in targets}
            cpus: dict[str, list[float]] = {t.name: [] for t in targets}
            generator, errors = [], {t.name: 0 for t in targets}
            rng = random.Random(connections)
            for _ in range(rounds):
                for t in rng.sample(list(targets), len(targets)):
                    pid = t.proc.pid if t.name in proxies else None
                    bodies = [_body(t.models["smollm2"], route)]
                    run, cpu = await _with_cpu(pid, functools.partial(wrk, t.url, route, bodies,
                                                                      connections=connections, seconds=seconds))
                    rates[t.name].append(run.rate)
                    errors[t.name] += run.errors
                    generator.append(run.cpu / run.seconds)
                    if cpu is not None and run.requests:
                        cpus[t.name].append(cpu / run.requests)
                        cpu_per_request[t.name].append(cpu / run.requests)
            router_rate = statistics.median(rates[targets[1].name])
            cells = {}
            for t in targets:
                rate = statistics.median(rates[t.name])
                text = f"{rate:.0f} req/s (runs " + ", ".join(f"{r:.0f}" for r in rates[t.name]) + ")"
                if cpus[t.name]:
                    text += f", its CPU {statistics.median(cpus[t.name]) * 1000:.2f} ms/req"
                if t is targets[2]:
                    text += f", **{_times(rate, router_rate, 'router mode')}**"
                if errors[t.name]:
                    text += f", {errors[t.name]} errors"
                cells[t.name] = text
            cells["direct"] += f" (wrk used {statistics.median(generator):.2f} of a core)"
            row(f"9. {route} throughput, concurrency {connections} (wrk, 1 thread)", cells)
    row("10. proxy process CPU per 1000 proxied requests (all runs of row 9)",
        {name: f"{statistics.median(values) * 1000:.2f} s (median; {min(values) * 1000:.2f}-{max(values) * 1000:.2f})"
         for name, values in cpu_per_request.items() if values})


class StandinRouterd:
    """routerd serving ``count`` stand-in models (``standin-00``...), all allowed resident."""

    def __init__(self, work: Path, count: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = work / "standin.sock"
        paths = write_tiny_ggufs(work / "standin-models", [f"standin-{i:02d}" for i in range(count)])
        self.names = [p.stem for p in paths]
        config = {"server": {"port": self.port}, "control": {"socket": str(self.socket)},
                  "backend": {"binary": str(STANDIN), "max_loaded_models": count, "idle_ttl": 0,
                              "args": ["--parallel", "256", "--standin-interval", str(EVENT_INTERVAL)]},
                  "scheduler": {"max_queue": 1024},
                  "catalog": {"hf_cache": False},
                  "models": {p.stem: {"path": str(p)} for p in paths}}
        (work / "standin.toml").write_text(tomli_w.dumps(config))
        self.proc = subprocess.Popen([sys.executable, "-m", "routerd", "serve", "--config", str(work / "standin.toml"),
                                      "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "STATE_DIRECTORY": str(work / "s3")})

    async def load(self, client: httpx.AsyncClient, names: Sequence[str]) -> None:
        for name in names:
            (await client.post(self.url + "/tokenize", content=_body(name, "/tokenize"))).raise_for_status()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _delivery(run: StreamRun, events_per_stream: int) -> str:
    offered = run.streams / EVENT_INTERVAL
    ideal = events_per_stream * EVENT_INTERVAL
    delivered = run.events / run.seconds
    text = (f"delivered {delivered:.0f} of {offered:.0f} events/s offered "
            f"({ideal / run.seconds:.2f} of the paced rate), client CPU {run.cpu / run.seconds:.2f} core")
    return text + (f", {run.failed} streams broken" if run.failed else "")


async def paced_events(row: Row, work: Path, quick: bool) -> None:
    """Row 11: 64 paced streams read directly from the stand-in and through routerd."""
    events, rounds = (50, 1) if quick else (300, 3)
    direct_port = free_port()
    direct = subprocess.Popen(_standin_argv(direct_port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    routerd = StandinRouterd(work / "paced", 1)
    try:
        await wait_http(f"http://127.0.0.1:{direct_port}")
        await wait_http(routerd.url)
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            await routerd.load(client, routerd.names)
        bodies = [_stream_body(routerd.names[0], events)] * 64
        runs: dict[str, list[tuple[StreamRun, float | None]]] = {"direct": [], "routerd": []}
        for _ in range(rounds):
            for name in random.sample(list(runs), 2):
                port, pid = (direct_port, None) if name == "direct" else (routerd.port, routerd.proc.pid)
                runs[name].append(await _with_cpu(pid, functools.partial(paced_streams, "127.0.0.1", port, bodies)))
        cells = {}
        for name, results in runs.items():
            run = min(results, key=lambda r: r[0].seconds)  # the least disturbed round
            text = _delivery(run[0], events)
            per_event = [cpu / r.events for r, cpu in results if cpu is not None and r.events]
            if per_event:
                text += (f"; **routerd CPU {statistics.median(per_event) * 1000:.3f} ms/event** (runs "
                         + ", ".join(f"{v * 1000:.3f}" for v in per_event) + ")")
            cells[name] = text
        row(f"11. 64 paced SSE streams, 100 events/s each, {events} events (stand-in backend)", cells)
    finally:
        direct.terminate()
        direct.wait()
        routerd.close()


async def design_floor(row: Row, work: Path, quick: bool) -> None:
    """Row 12: CPU per request (/tokenize, c=16) and per event (64 paced streams) of routerd's
    HTTP front alone and of a bare relay on it, interleaved with routerd, all on the stand-in."""
    seconds, events, rounds = (1, 50, 1) if quick else (4, 200, 5)
    standin_port, front_port, relay_port = free_port(), free_port(), free_port()
    floors = [_standin_argv(standin_port),
              [sys.executable, str(FLOOR), "--app", "front", "--port", str(front_port),
               "--interval", str(EVENT_INTERVAL)],
              [sys.executable, str(FLOOR), "--app", "relay", "--port", str(relay_port), "--upstream-port",
               str(standin_port)]]
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for argv in floors]
    routerd = StandinRouterd(work / "floor", 1)
    targets = {"front alone": (front_port, procs[1].pid), "bare relay": (relay_port, procs[2].pid),
               "routerd": (routerd.port, routerd.proc.pid)}
    try:
        for port, _ in [(standin_port, 0), *targets.values()]:
            await wait_http(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            await routerd.load(client, routerd.names)
        body, stream_bodies = _body(routerd.names[0], "/tokenize"), [_stream_body(routerd.names[0], events)] * 64
        per_request: dict[str, list[float]] = {name: [] for name in targets}
        per_event: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name in random.sample(list(targets), len(targets)):
                port, pid = targets[name]
                url = f"http://127.0.0.1:{port}"
                run, cpu = await _with_cpu(pid, functools.partial(wrk, url, "/tokenize", [body], connections=16,
                                                                  seconds=seconds))
                per_request[name].append((cpu or 0.0) / max(1, run.requests))
                streamed, cpu = await _with_cpu(pid, functools.partial(paced_streams, "127.0.0.1", port,
                                                                       stream_bodies))
                per_event[name].append((cpu or 0.0) / max(1, streamed.events))
    finally:
        routerd.close()
        for proc in procs:
            proc.terminate()
            proc.wait()
    request = {name: statistics.median(values) for name, values in per_request.items()}
    event = {name: statistics.median(values) for name, values in per_event.items()}
    floor = "; ".join(f"{name}: {request[name] * 1000:.2f} ms/req, {event[name] * 1000:.3f} ms/event"
                      for name in ("front alone", "bare relay"))
    row("12. the design's floor: routerd's HTTP front with a do-nothing app, and a bare relay on it (stand-in; "
        f"CPU per /tokenize at c=16 and per event of 64 paced streams, median of {rounds})",
        {"direct": floor,
         "routerd": f"{request['routerd'] * 1000:.2f} ms/req "
                    f"({_times(request['routerd'], request['bare relay'], 'the bare relay')}), "
                    f"{event['routerd'] * 1000:.3f} ms/event "
                    f"({_times(event['routerd'], event['bare relay'], 'the bare relay')})"})


async def scale(work: Path, quick: bool) -> list[str]:
    """routerd's CPU per request and per event against concurrency and resident models: a
    markdown table for docs/benchmarks.md."""
    seconds, events = (1, 20) if quick else (4, 200)
    levels, residents = (1, 16, 64, 256), (1, 4, 16)
    routerd = StandinRouterd(work / "scale-cost", max(residents))
    cells: dict[tuple[int, int], str] = {}
    try:
        await wait_http(routerd.url)
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            for resident in residents:
                names = routerd.names[:resident]
                await routerd.load(client, names)
                for level in levels:
                    bodies = [_body(name, "/tokenize") for name in names]
                    generate = functools.partial(wrk, routerd.url, "/tokenize", bodies, connections=level,
                                                 seconds=seconds)
                    run, cpu = await _with_cpu(routerd.proc.pid, generate)
                    per_request = (cpu or 0.0) / max(1, run.requests)
                    stream_bodies = [_stream_body(names[i % resident], events) for i in range(level)]
                    streamed, stream_cpu = await _with_cpu(
                        routerd.proc.pid, functools.partial(paced_streams, "127.0.0.1", routerd.port, stream_bodies))
                    per_event = (stream_cpu or 0.0) / max(1, streamed.events)
                    offered = level / EVENT_INTERVAL
                    run_errors = f", {run.errors} errors" if run.errors else ""
                    broken = f", {streamed.failed} broken" if streamed.failed else ""
                    cells[(level, resident)] = (
                        f"{per_request * 1000:.2f} ms/req ({run.rate:.0f} req/s{run_errors}); "
                        f"{per_event * 1000:.3f} ms/event "
                        f"({streamed.events / streamed.seconds:.0f} of {offered:.0f} ev/s{broken})")
                    print(f"scale: concurrency {level}, {resident} resident: {cells[(level, resident)]}", flush=True)
    finally:
        routerd.close()
    lines = ["| concurrency | " + " | ".join(f"{r} resident model{'s' if r > 1 else ''}" for r in residents) + " |",
             "|---|" + "---|" * len(residents)]
    lines += [f"| {level} | " + " | ".join(cells[(level, r)] for r in residents) + " |" for level in levels]
    return lines
