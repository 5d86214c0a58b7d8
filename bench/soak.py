#!/usr/bin/env python3
"""`make soak`: routerd under mixed traffic for a long while, with faults injected.

Runs routerd (its own process, the real llama-server, both demo models) and, until the time is
up: chats streamed and not, streams the client abandons halfway, bad requests of every kind,
/tokenize, config reloads and status calls on the control socket, and a `kill -9` of a random
running llama-server every so often. Every request is bounded; one that outlives its bound is
counted as hung. Prints (and with --write records in docs/soak.md) requests by outcome, hung
requests, routerd's RSS and open file descriptors at start, middle and end, and the
llama-server processes left after routerd stops. Figures never fail anything: not a test.

    .venv/bin/python bench/soak.py [--minutes 30] [--write]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))
sys.path.insert(0, str(ROOT))

from demo import demo_model_paths  # noqa: E402
from routerd import config as config_mod  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
CHAT = "/v1/chat/completions"
#: Seconds of traffic before the "start" sample of RSS and fds.
WARM_UP = 60.0
#: Longest any one request may take before it counts as hung (seconds).
REQUEST_BOUND = 180.0
READING = """Reading it: `502 backend_failed` (in-band once a stream had started) are the requests
that were in a backend's hands when it was killed: they may have had effects, so they are never
sent again. Requests still queued in routerd at a kill wait for the restarted backend instead.
`400`/`404` answer the bad requests the soak sends on purpose (not JSON, nested 50,000 deep, a
5000-digit number, invalid UTF-8, no model, an unknown model). RSS grows in the first minutes
(allocator arenas, per-model log rings and caches filling) and must then stay flat; open fds
follow the number of loaded backends and pooled connections."""
BAD_BODIES = [b"{nope", b"[" * 50_000 + b"]" * 50_000, b'{"model": "smollm2-135m", "n": ' + b"9" * 5000 + b"}",
              json.dumps({"messages": []}).encode(), json.dumps({"model": "no-such-model"}).encode(),
              b"\xff\xfe", json.dumps(["a list"]).encode()]


class Soak:
    def __init__(self, url: str, socket_path: str, pid: int, deadline: float, kill_every: float,
                 reload_every: float) -> None:
        self.url, self.socket_path, self.pid = url, socket_path, pid
        self.deadline, self.kill_every, self.reload_every = deadline, kill_every, reload_every
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.hung = 0
        self.kills = 0
        self.backend_pids: set[int] = set()
        self.samples: list[tuple[float, float, int]] = []  # (elapsed s, RSS MiB, open fds)
        self.started = time.monotonic()
        self.scrapes: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()

    # -- observers: a scraper, an event reader that keeps up, one that stalls ----------------
    async def scraper(self) -> None:
        """GET /metrics every 2 s, as Prometheus would."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10, trust_env=False) as http:
            while trio.current_time() < self.deadline:
                try:
                    response = await http.get("/metrics")
                    ok = response.status_code == 200 and "routerd_requests_total" in response.text
                    self.scrapes["ok" if ok else f"HTTP {response.status_code}"] += 1
                except httpx.HTTPError as exc:
                    self.scrapes[type(exc).__name__] += 1
                await trio.sleep(2)

    async def watcher(self) -> None:
        """Read /events?requests=1 as it comes; reconnect whenever it ends."""
        async with httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10, read=None),
                                     trust_env=False) as http:
            with trio.move_on_at(self.deadline):  # the stream never ends by itself
                await self._watch(http)

    async def _watch(self, http: httpx.AsyncClient) -> None:
        while True:
            try:
                async with http.stream("GET", "/events?requests=1") as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            self.events[json.loads(line[6:])["type"]] += 1
            except httpx.HTTPError:
                await trio.sleep(1)
            self.events["reconnects"] += 1

    async def staller(self) -> None:
        """Open /events?requests=1 and never read: routerd must drop it and go on; again and again."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        with trio.move_on_at(self.deadline):
            while True:
                stream = await trio.open_tcp_stream(host, int(port))
                async with stream:
                    await stream.send_all(b"GET /events?requests=1 HTTP/1.1\r\nHost: soak\r\n\r\n")
                    await trio.sleep(120)  # holding it open, reading nothing

    # -- traffic ---------------------------------------------------------------------------
    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_BOUND, trust_env=False) as http:
            while trio.current_time() < self.deadline:
                action = rng.choices(["chat", "stream", "cancel", "bad", "tokenize"], [3, 3, 1, 2, 2])[0]
                with trio.move_on_after(REQUEST_BOUND) as bound:
                    outcome = await self.request(http, action, rng)
                self.outcomes["hung" if bound.cancelled_caught else f"{action}: {outcome}"] += 1
                self.hung += bound.cancelled_caught

    async def request(self, http: httpx.AsyncClient, action: str, rng: random.Random) -> str:
        model = rng.choice(MODELS)
        body = {"model": model, "messages": [{"role": "user", "content": rng.choice(["hi", "Count to five."])}],
                "max_tokens": rng.randint(1, 24)}
        try:
            if action == "bad":
                response = await http.post(CHAT, content=rng.choice(BAD_BODIES),
                                           headers={"content-type": "application/json"})
                return _status(response)
            if action == "tokenize":
                response = await http.post("/tokenize", json={"model": model, "content": "hello world"})
                return _status(response)
            if action == "chat":
                return _status(await http.post(CHAT, json=body))
            async with http.stream("POST", CHAT, json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    await response.aread()
                    return _status(response)
                text = ""
                async for chunk in response.aiter_text():
                    text += chunk
                    if action == "cancel" and text.count("data:") >= 2:
                        return "abandoned mid-stream"
                if "backend_failed" in text:
                    return "502 backend_failed (in-band)"
                return "200 [DONE]" if "[DONE]" in text else "200 stream without [DONE]"
        except httpx.HTTPError as exc:
            return f"transport error {type(exc).__name__}"

    # -- faults and operations ---------------------------------------------------------------
    async def rpc(self, method: str, params: dict | None = None) -> dict:
        stream = await trio.open_unix_socket(self.socket_path)
        async with stream:
            message = {"jsonrpc": "2.0", "id": 1, "method": method, **({"params": params} if params else {})}
            await stream.send_all(json.dumps(message).encode() + b"\n")
            buffer = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{method}: connection closed without an answer")
                buffer += chunk
                for line in buffer.split(b"\n")[:-1]:
                    reply = json.loads(line)
                    if reply.get("id") == 1:
                        return reply

    async def operator(self) -> None:
        """Reloads and status calls, as a person or a config tool would."""
        while trio.current_time() < self.deadline:
            await trio.sleep(self.reload_every)
            reply = await self.rpc("reload")
            self.outcomes["control reload: " + ("ok" if "result" in reply else str(reply["error"]["code"]))] += 1
            status = await self.rpc("status")
            self.outcomes["control status: " + ("ok" if "result" in status else "error")] += 1
            self.backend_pids |= {m["pid"] for m in status["result"]["models"] if m.get("pid")}

    async def killer(self, rng: random.Random) -> None:
        while trio.current_time() < self.deadline:
            await trio.sleep(self.kill_every)
            status = (await self.rpc("status"))["result"]["models"]
            running = [m for m in status if m.get("pid") and m["state"] == "ready"]
            if running:
                victim = rng.choice(running)
                self.backend_pids.add(victim["pid"])
                os.kill(victim["pid"], signal.SIGKILL)
                self.kills += 1

    async def sampler(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self.started, rss_mib(self.pid), open_fds(self.pid)))
            await trio.sleep(30)


def _status(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} (not an OpenAI error)"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pids: set[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            left.append(pid)
    return left


def start_routerd(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    paths = demo_model_paths(ROOT / "demo")
    socket_path = str(work / "control.sock")
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 10.0},
        "backend": {"args": ["--ctx-size", "2048", "--threads", "1"], "idle_ttl": 120, "stop_grace": 5.0},
        "control": {"socket": socket_path},
        "catalog": {"hf_cache": False},
        # The soak kills backends on purpose, every kill_every seconds: with the default breaker
        # (3 failures in 300 s) a model would sit "failed" for minutes and see no traffic. The
        # breaker has its own tests; here every kill must be recovered from.
        "scheduler": {"restart_backoff": 0.5, "max_queue_wait": 120.0, "crash_loop_failures": 20},
        "models": {name: {"path": str(path)} for name, path in paths.items()},
    }
    config_path = work / "config.toml"
    config_path.write_text(tomli_w.dumps(config))
    config_mod.load(config_path)  # fail here, not in the daemon, if it is wrong
    log = open(work / "routerd.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "routerd", "serve", "--config", str(config_path)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "STATE_DIRECTORY": str(work / "state")})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (work / "routerd.log").read_text()
        if "serving on http://" in text:
            return proc, text.split("serving on ")[1].split(",")[0].split()[0], socket_path
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit("routerd did not start:\n" + (work / "routerd.log").read_text())


async def run(minutes: float, clients: int, kill_every: float, reload_every: float,
              work: Path) -> tuple[Soak, int, int]:
    proc, url, socket_path = start_routerd(work)
    soak = Soak(url, socket_path, proc.pid, trio.current_time() + minutes * 60, kill_every, reload_every)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(soak.sampler)
        async with trio.open_nursery() as traffic:
            for seed in range(clients):
                traffic.start_soon(soak.client, seed)
            traffic.start_soon(soak.operator)
            traffic.start_soon(soak.scraper)
            traffic.start_soon(soak.watcher)
            traffic.start_soon(soak.staller)
            traffic.start_soon(soak.killer, random.Random(1234))
        soak.samples.append((time.monotonic() - soak.started, rss_mib(proc.pid), open_fds(proc.pid)))
        nursery.cancel_scope.cancel()
    status = (await soak.rpc("status"))["result"]["models"]
    soak.backend_pids |= {m["pid"] for m in status if m.get("pid")}
    proc.send_signal(signal.SIGTERM)
    exit_code = await trio.to_thread.run_sync(proc.wait)
    await trio.sleep(0.5)
    return soak, exit_code, len(alive(soak.backend_pids))


def report(soak: Soak, minutes: float, clients: int, exit_code: int, left: int) -> str:
    # "Start" is after warm-up: both models loaded, connections pooled (that growth is not a leak).
    warm = [sample for sample in soak.samples if sample[0] >= min(WARM_UP, minutes * 15)] or soak.samples
    first, middle, last = warm[0], warm[len(warm) // 2], warm[-1]
    total = sum(soak.outcomes.values())
    lines = [
        f"# Soak run: {minutes:g} minutes of mixed traffic\n",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"`bench/soak.py --minutes {minutes:g}`; {clients} clients, the real llama-server with both demo models; "
        f"every request bounded at {REQUEST_BOUND:g} s.\n",
        "| figure | value |", "|---|---|",
        f"| requests and control calls | {total} |",
        f"| hung requests (must be 0) | {soak.hung} |",
        f"| llama-servers killed with SIGKILL | {soak.kills} |",
        f"| routerd RSS after warm-up / middle / end | {first[1]:.1f} / {middle[1]:.1f} / {last[1]:.1f} MiB |",
        f"| routerd open fds after warm-up / middle / end | {first[2]} / {middle[2]} / {last[2]} |",
        f"| routerd exit status after SIGTERM | {exit_code} |",
        f"| llama-server processes left after stop (must be 0) | {left} of {len(soak.backend_pids)} seen |",
        f"| /metrics scrapes (every 2 s) | {dict(soak.scrapes)} |",
        f"| events read by a reader that keeps up | {sum(v for k, v in soak.events.items() if k != 'reconnects')}"
        f" ({soak.events['request']} requests, {soak.events['reconnects']} reconnects) |",
        "", "Outcomes (action: status and error code):", "", "| outcome | count |", "|---|---|",
    ]
    lines += [f"| {outcome} | {count} |" for outcome, count in sorted(soak.outcomes.items())]
    lines += ["", READING]
    lines += ["", "RSS (MiB) and open fds every 30 s: " +
              ", ".join(f"{t / 60:.0f}m {rss:.0f}/{fds}" for t, rss, fds in soak.samples)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--kill-every", type=float, default=90.0, help="seconds between backend kills")
    parser.add_argument("--reload-every", type=float, default=60.0, help="seconds between config reloads")
    parser.add_argument("--write", action="store_true", help="record the figures in docs/soak.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="routerd-soak-") as tmp:
        soak, exit_code, left = trio.run(run, args.minutes, args.clients, args.kill_every, args.reload_every, Path(tmp))
        text = report(soak, args.minutes, args.clients, exit_code, left)
        tracebacks = (Path(tmp) / "routerd.log").read_text().count("Traceback")
        text += f"\nTracebacks in routerd's log: {tracebacks}\n"
    print(text)
    if args.write:
        (ROOT / "docs" / "soak.md").write_text(text)


if __name__ == "__main__":
    main()
