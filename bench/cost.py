"""routerd's own cost, for `make bench`: cheap requests at full speed, relayed SSE events, scale.

- Cheap requests: ``/tokenize`` and ``/v1/embeddings`` (one short input) from ``wrk`` at
  concurrency 16 and 64, interleaved over direct llama-server, router mode and routerd; the
  CPU each proxy process spends per request (router mode's router process, routerd).
- Paced streams: 128 SSE streams from a fast stand-in backend (bench/standin.py) that emits one
  event per stream every 10 ms, read directly and through routerd: delivered vs offered rate,
  routerd's CPU per event.
- Scale: routerd's CPU per request and per event at concurrency 1/16/64/256 with 1/4/16
  resident stand-in backends.
- The design's floor: the same two CPU figures for hypercorn's front serving a do-nothing app
  (the reference issue 26 keeps), routerd's own HTTP/1.1 front serving it, and a bare relay on
  routerd's front (bench/floor.py), interleaved with routerd: what the front costs before
  routerd's own logic.

Issue 26's targets are ratios within one run; each row that measures one hands its figure to a
``Goals`` list, which bench/run.py prints after the table. Figures only; nothing here asserts a
timing.
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

#: Paced streams of row 11 (issue 26: 128 at 100 events/s each) and of row 12's per-event figure.
PACED_STREAMS = 128
FLOOR_STREAMS = 64

Row = Callable[[str, dict[str, str]], None]
T = TypeVar("T")


class Goals:
    """Issue 26's targets as measured in this run: what, the figure, met (None: no figure)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bool | None]] = []

    def add(self, target: str, figure: str, met: bool | None) -> None:
        self.items.append((target, figure, met))

    def table(self) -> list[str]:
        lines = ["| target | this run | met |", "|---|---|---|"]
        verdict = {True: "yes", False: "**no**", None: "no figure"}
        lines += [f"| {target} | {figure} | {verdict[met]} |" for target, figure, met in self.items]
        return lines


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


#: Seconds wrk waits for one answer: long, so a slow server is not read as clients giving up.
WRK_TIMEOUT = 30.0


async def cheap_requests(row: Row, targets: Sequence[Any], quick: bool, goals: Goals | None = None) -> None:
    """Rows 9-10: cheap-request throughput at c=16/64 and each proxy's CPU per 1000 requests.

    ``targets`` are (direct, router mode, routerd) serving the small model with --embeddings.
    Issue 26: /tokenize >= 2x router mode's throughput; /v1/embeddings >= 1x router mode's in
    every round (rounds are interleaved, so round i of both ran side by side); routerd's CPU per
    proxied request <= 0.5x router mode's process CPU per request."""
    goals = goals if goals is not None else Goals()
    seconds, rounds = (1, 1) if quick else (5, 3)
    router_name, routerd_name = targets[1].name, targets[2].name
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
            generator = []
            errors, timeouts = {t.name: 0 for t in targets}, {t.name: 0 for t in targets}
            rng = random.Random(connections)
            for _ in range(rounds):
                for t in rng.sample(list(targets), len(targets)):
                    pid = t.proc.pid if t.name in proxies else None
                    bodies = [_body(t.models["smollm2"], route)]
                    generate = functools.partial(wrk, t.url, route, bodies, connections=connections,
                                                 seconds=seconds, timeout=WRK_TIMEOUT)
                    run, cpu = await _with_cpu(pid, generate)
                    rates[t.name].append(run.rate)
                    errors[t.name] += run.errors
                    timeouts[t.name] += run.timeouts
                    generator.append(run.cpu / run.seconds)
                    if cpu is not None and run.requests:
                        cpus[t.name].append(cpu / run.requests)
                        cpu_per_request[t.name].append(cpu / run.requests)
            router_rate = statistics.median(rates[router_name])
            cells = {}
            for t in targets:
                rate = statistics.median(rates[t.name])
                text = f"{rate:.0f} req/s (runs " + ", ".join(f"{r:.0f}" for r in rates[t.name]) + ")"
                if cpus[t.name]:
                    text += f", its CPU {statistics.median(cpus[t.name]) * 1000:.2f} ms/req"
                if t.name == routerd_name:
                    text += f", **{_times(rate, router_rate, 'router mode')}**"
                if errors[t.name]:
                    text += f", {errors[t.name]} errors"
                    text += f" ({timeouts[t.name]} timeouts)" if timeouts[t.name] else ""
                cells[t.name] = text
            routerd_rate = statistics.median(rates[routerd_name])
            if route == "/tokenize":
                ratio = _times(routerd_rate, router_rate, "router mode")
                goals.add(f"/tokenize c={connections}: routerd >= 2x router mode's throughput",
                          f"{routerd_rate:.0f} vs {router_rate:.0f} req/s, {ratio}",
                          routerd_rate >= 2 * router_rate if router_rate > 0 else None)
            else:
                # a round held: routerd answered something and at least router mode's rate; a
                # round where both answered nothing says nothing about routerd (None)
                pairs = list(zip(rates[routerd_name], rates[router_name], strict=True))
                held = [None if ours == theirs == 0 else ours > 0 and ours >= theirs for ours, theirs in pairs]
                marks = {True: ">=", False: "<", None: "both 0"}
                per_round = ", ".join(f"{ours:.0f} vs {theirs:.0f} ({marks[ok]})"
                                      for (ours, theirs), ok in zip(pairs, held, strict=True))
                cells[routerd_name] += f"; per round vs router mode: {per_round}"
                judged = [ok for ok in held if ok is not None]
                goals.add(f"/v1/embeddings c={connections}: routerd >= 1x router mode's throughput, every round",
                          f"{sum(judged)} of {len(held)} rounds (routerd vs router mode req/s: {per_round})",
                          all(judged) if judged else None)
            cells["direct"] += f" (wrk used {statistics.median(generator):.2f} of a core)"
            row(f"9. {route} throughput, concurrency {connections} (wrk, 1 thread, {WRK_TIMEOUT:g} s timeout)", cells)
    cells = {name: f"{statistics.median(values) * 1000:.2f} s "
                   f"(median; {min(values) * 1000:.2f}-{max(values) * 1000:.2f})"
             for name, values in cpu_per_request.items() if values}
    cpu_goal = "routerd CPU per proxied request <= 0.5x router mode's process CPU per request (row 10)"
    if cpu_per_request[routerd_name] and cpu_per_request[router_name]:
        ours, theirs = (statistics.median(cpu_per_request[n]) for n in (routerd_name, router_name))
        ratio = _times(ours, theirs, "router mode's")
        cells[routerd_name] += f", **{ratio}**"
        goals.add(cpu_goal, f"{ours * 1000:.3f} vs {theirs * 1000:.3f} ms/req, {ratio}",
                  ours <= 0.5 * theirs if theirs > 0 else None)
    else:
        goals.add(cpu_goal, "no proxied request measured", None)
    row("10. proxy process CPU per 1000 proxied requests (all runs of row 9)", cells)


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


def _delivered(run: StreamRun) -> float:
    """The share of the offered event rate (streams x 100 events/s) that was delivered."""
    offered = run.streams / EVENT_INTERVAL
    return run.events / run.seconds / offered if run.seconds else 0.0


def _delivery(run: StreamRun, events_per_stream: int) -> str:
    offered = run.streams / EVENT_INTERVAL
    ideal = events_per_stream * EVENT_INTERVAL
    delivered = run.events / run.seconds
    text = (f"delivered {delivered:.0f} of {offered:.0f} events/s offered "
            f"({ideal / run.seconds:.2f} of the paced rate), client CPU {run.cpu / run.seconds:.2f} core")
    return text + (f", {run.failed} streams broken" if run.failed else "")


async def paced_events(row: Row, work: Path, quick: bool, goals: Goals | None = None) -> None:
    """Row 11: 128 paced streams read directly from the stand-in and through routerd.

    Issue 26: delivered >= 0.99 of the offered rate (128 x 100 events/s) through routerd; the
    median over the rounds, none broken, is the figure (the direct stand-in's is the machine's)."""
    goals = goals if goals is not None else Goals()
    events, rounds = (50, 1) if quick else (300, 3)
    direct_port = free_port()
    direct = subprocess.Popen(_standin_argv(direct_port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    routerd = StandinRouterd(work / "paced", 1)
    try:
        await wait_http(f"http://127.0.0.1:{direct_port}")
        await wait_http(routerd.url)
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            await routerd.load(client, routerd.names)
        bodies = [_stream_body(routerd.names[0], events)] * PACED_STREAMS
        runs: dict[str, list[tuple[StreamRun, float | None]]] = {"direct": [], "routerd": []}
        for _ in range(rounds):
            for name in random.sample(list(runs), 2):
                port, pid = (direct_port, None) if name == "direct" else (routerd.port, routerd.proc.pid)
                runs[name].append(await _with_cpu(pid, functools.partial(paced_streams, "127.0.0.1", port, bodies)))
        cells = {}
        shares = {}
        for name, results in runs.items():
            run = min(results, key=lambda r: r[0].seconds)  # the least disturbed round
            shares[name] = [_delivered(r) for r, _ in results]
            text = (_delivery(run[0], events) + "; delivered/offered per round "
                    + ", ".join(f"{share:.3f}" for share in shares[name]))
            per_event = [cpu / r.events for r, cpu in results if cpu is not None and r.events]
            if per_event:
                text += (f"; **routerd CPU {statistics.median(per_event) * 1000:.3f} ms/event** (runs "
                         + ", ".join(f"{v * 1000:.3f}" for v in per_event) + ")")
            cells[name] = text
        share, broken = statistics.median(shares["routerd"]), sum(r.failed for r, _ in runs["routerd"])
        goals.add(f"{PACED_STREAMS} paced streams at 100 events/s each delivered at >= 0.99 of the offered rate "
                  "(row 11)",
                  f"{share:.3f} through routerd (median of {rounds}; direct stand-in "
                  f"{statistics.median(shares['direct']):.3f})" + (f", {broken} streams broken" if broken else ""),
                  share >= 0.99 and not broken)
        row(f"11. {PACED_STREAMS} paced SSE streams, 100 events/s each, {events} events (stand-in backend)", cells)
    finally:
        direct.terminate()
        direct.wait()
        routerd.close()


#: Row 12's servers besides routerd: bench/floor.py's arguments, and what the row calls them.
FLOORS = {"hypercorn front": ("front", "hypercorn"), "routerd front": ("front", "routerd"),
          "bare relay": ("relay", "routerd")}
FLOOR_LABELS = {"hypercorn front": "hypercorn's do-nothing front (the reference)",
                "routerd front": "routerd's front, do-nothing app", "bare relay": "bare relay on routerd's front"}


async def design_floor(row: Row, work: Path, quick: bool, goals: Goals | None = None) -> None:
    """Row 12: CPU per request (/tokenize, c=16) and per event (64 paced streams) of hypercorn's
    front with a do-nothing app (the reference), routerd's own front with it, a bare relay on
    routerd's front, and routerd, interleaved in shuffled order each round, all on the stand-in.

    Issue 26: routerd's CPU per relayed event <= 0.5x hypercorn's do-nothing front's."""
    goals = goals if goals is not None else Goals()
    seconds, events, rounds = (1, 50, 1) if quick else (4, 200, 5)
    standin_port = free_port()
    ports = {name: free_port() for name in FLOORS}
    argvs = [_standin_argv(standin_port)]
    for name, (app, server) in FLOORS.items():
        argvs.append([sys.executable, str(FLOOR), "--app", app, "--server", server, "--port", str(ports[name]),
                      "--interval", str(EVENT_INTERVAL), "--upstream-port", str(standin_port)])
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for argv in argvs]
    routerd = StandinRouterd(work / "floor", 1)
    targets = {name: (ports[name], proc.pid) for name, proc in zip(FLOORS, procs[1:], strict=True)}
    targets["routerd"] = (routerd.port, routerd.proc.pid)
    try:
        for port, _ in [(standin_port, 0), *targets.values()]:
            await wait_http(f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            await routerd.load(client, routerd.names)
        body = _body(routerd.names[0], "/tokenize")
        stream_bodies = [_stream_body(routerd.names[0], events)] * FLOOR_STREAMS
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
    floor = "; ".join(f"{FLOOR_LABELS[name]}: {request[name] * 1000:.3f} ms/req, {event[name] * 1000:.3f} ms/event"
                      for name in FLOORS)
    vs_hypercorn = _times(event["routerd"], event["hypercorn front"], "hypercorn's do-nothing front")
    row("12. the design's floor: hypercorn's front and routerd's own front with a do-nothing app, and a bare relay "
        f"on routerd's front (stand-in; CPU per /tokenize at c=16 and per event of {FLOOR_STREAMS} paced streams, "
        f"median of {rounds})",
        {"direct": floor,
         "routerd": f"{request['routerd'] * 1000:.3f} ms/req "
                    f"({_times(request['routerd'], request['bare relay'], 'the bare relay')}, "
                    f"{_times(request['routerd'], request['hypercorn front'], 'the hypercorn front')}), "
                    f"{event['routerd'] * 1000:.3f} ms/event "
                    f"(**{vs_hypercorn}**, {_times(event['routerd'], event['bare relay'], 'the bare relay')})"})
    goals.add("routerd CPU per relayed event <= 0.5x hypercorn's do-nothing front's (row 12)",
              f"{event['routerd'] * 1000:.3f} vs {event['hypercorn front'] * 1000:.3f} ms/event, {vs_hypercorn}",
              event["routerd"] <= 0.5 * event["hypercorn front"] if event["hypercorn front"] > 0 else None)


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
