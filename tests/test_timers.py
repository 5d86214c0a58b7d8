"""routerd's in-process timers, on trio's MockClock (``autojump_clock``: the clock jumps to the
next deadline whenever every task waits, so each test takes milliseconds and each time it
asserts is exact, under any load).

The supervisor runs whole, with every real part (queues, placement, pools, the backend's
readiness poll, its idle timer, its connection pool over a loopback socket); only the
llama-server process is replaced, through the supervisor's ``spawn`` seam, by ``FakeLlama``: a
trio task answering ``/health`` whose readiness and exit the test decides.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from routerd import config as config_mod
from routerd import events
from routerd.backends.backend import Backend, State
from routerd.backends.memory import MemoryManager
from routerd.backends.remote import Remote
from routerd.backends.supervisor import Supervisor
from routerd.errors import LoadFailed, Unavailable
from routerd.front import proxy
from routerd.front.client_io import AsgiSink
from routerd.front.exchange import Exchange
from routerd.front.proxy import keep_informed
from routerd.models.catalog import Catalog
from tests.conftest import FakeGpus, make_config

# -- an in-process llama-server --------------------------------------------------------------



async def request_heads(stream: trio.SocketStream) -> AsyncIterator[bytes]:
    """Each request head a client sends on ``stream`` (bodiless GETs), until it closes."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        yield head

class FakeLlama:
    """One stand-in llama-server: ``/health`` over a real loopback socket on the port routerd
    chose (503 while loading, 200 once ready), its output a memory stream, its exit the test's."""

    def __init__(self, argv: list[str], nursery: trio.Nursery, pid: int, load_time: float | None,
                 exit_code: int | None) -> None:
        self.pid = pid
        self.spawned_at = trio.current_time()
        self.ready = False
        self.exit_code: int | None = None
        self.exited_at: float | None = None
        self._exited = trio.Event()
        port = int(argv[argv.index("--port") + 1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._send_output, self.output = trio.testing.memory_stream_one_way_pair()
        self._scope = trio.CancelScope()
        nursery.start_soon(self._life, load_time, exit_code)

    async def _life(self, load_time: float | None, exit_code: int | None) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._connection, [self._listener])
                if exit_code is not None:  # crashes while loading
                    await trio.lowlevel.checkpoint()
                    await self._send_output.send_all(b"error: cannot load model\n")
                    self.exit(exit_code)
                elif load_time is not None:
                    await trio.sleep(load_time)
                    await self.become_ready()

    async def become_ready(self) -> None:
        self.ready = True
        await self._send_output.send_all(b"main: server is listening\n")  # wakes the readiness poll

    def exit(self, code: int) -> None:
        if self._exited.is_set():
            return
        self.exit_code, self.exited_at = code, trio.current_time()
        self._send_output.close()
        self._scope.cancel()
        self._exited.set()

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            async for _ in request_heads(stream):
                status, body = (b"200 OK", b'{"status":"ok"}') if self.ready else (b"503 Loading", b"{}")
                await stream.send_all(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                                      b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    # -- backend.Process ----------------------------------------------------------------------
    async def wait(self) -> int:
        await self._exited.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def stop(self, grace: float | None = None) -> int:
        self.exit(0)  # llama-server ends at once on SIGTERM when idle
        return await self.wait()

    async def __aenter__(self) -> FakeLlama:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class FakeSpawner:
    """The supervisor's ``spawn``: each call makes a FakeLlama that loads in ``load_time`` s
    (None: only when the test says) or crashes at once with ``crash_code``."""

    def __init__(self, nursery: trio.Nursery, *, load_time: float | None = 0.0, crash_code: int | None = None) -> None:
        self.nursery = nursery
        self.load_time = load_time
        self.crash_code = crash_code
        self.spawned: list[FakeLlama] = []

    def __call__(self, argv: Any, *, env: Any, stop_grace: float) -> FakeLlama:
        process = FakeLlama(list(argv), self.nursery, 4_000_000 + len(self.spawned), self.load_time, self.crash_code)
        self.spawned.append(process)
        return process


async def start_supervisor(nursery: trio.Nursery, tmp_path: Any, spawner: FakeSpawner,
                           models: dict[str, dict[str, Any]], **sections: dict[str, Any]) -> Supervisor:
    """A running Supervisor for ``models`` (every file exists; nothing is spawned yet)."""
    for name, model in models.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"not really a gguf")
        model.setdefault("path", str(path))
    config = config_mod.from_mapping(make_config(tmp_path, models, **sections), base=tmp_path)
    supervisor = Supervisor(config, Catalog.from_config(config), "llama-server", env={},
                            memory=MemoryManager(config.memory, FakeGpus(), env={}), spawn=spawner)
    await nursery.start(supervisor.run)
    return supervisor


async def take_slot(supervisor: Supervisor, model: str) -> Backend:
    """What the proxy does for one request: queue, acquire, leave the queue; the backend that
    serves it (``release()`` it to end the request)."""
    ticket = supervisor.enqueue(model)
    try:
        lease = await supervisor.acquire_ticket(model, ticket)
    finally:
        supervisor.dequeue(ticket)
    assert isinstance(lease.endpoint, Backend)
    return lease.endpoint


async def gone_at(backend: Backend, bound: float = 1000.0) -> float:
    """When ``backend`` is gone (a failure, not a hang, if it is still there ``bound`` s on)."""
    with trio.fail_after(bound):
        await backend.wait_gone()
    return trio.current_time()


# -- the queue's wait ------------------------------------------------------------------------


async def test_a_queued_request_gets_503_queue_timeout_exactly_max_queue_wait_after_it_joined(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Any) -> None:
    spawner = FakeSpawner(nursery)
    supervisor = await start_supervisor(nursery, tmp_path, spawner, {"m": {"args": ["--parallel", "1"]}},
                                        scheduler={"max_queue_wait": 7.5})
    busy = await take_slot(supervisor, "m")  # the only slot, held to the end
    await trio.sleep(3)
    ticket = supervisor.enqueue("m")
    joined = trio.current_time()
    with pytest.raises(Unavailable) as caught:
        await supervisor.acquire_ticket("m", ticket)
    assert caught.value.code == "queue_timeout"
    assert trio.current_time() - joined == pytest.approx(7.5, abs=1e-9)
    supervisor.dequeue(ticket)
    busy.release()


async def test_a_queued_request_is_served_the_moment_a_slot_frees_before_max_queue_wait(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Any) -> None:
    spawner = FakeSpawner(nursery)
    supervisor = await start_supervisor(nursery, tmp_path, spawner, {"m": {"args": ["--parallel", "1"]}},
                                        scheduler={"max_queue_wait": 7.5})
    busy = await take_slot(supervisor, "m")
    start = trio.current_time()

    async def end_first_request() -> None:
        await trio.sleep(7.4)
        busy.release()

    nursery.start_soon(end_first_request)
    second = await take_slot(supervisor, "m")
    assert trio.current_time() - start == pytest.approx(7.4, abs=1e-9)
    second.release()


# -- restart backoff -------------------------------------------------------------------------


async def test_restarts_after_failures_wait_restart_backoff_doubling_up_to_restart_backoff_max(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Any) -> None:
    spawner = FakeSpawner(nursery, crash_code=1)
    supervisor = await start_supervisor(
        nursery, tmp_path, spawner, {"m": {}},
        scheduler={"restart_backoff": 0.4, "restart_backoff_max": 1.6, "crash_loop_failures": 100})
    for _ in range(6):
        with pytest.raises(LoadFailed):
            await supervisor.load("m")
    starts = [process.spawned_at for process in spawner.spawned]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    assert gaps == pytest.approx([0.4, 0.8, 1.6, 1.6, 1.6], abs=1e-9)
    # A success ends the backoff: the next failure waits the base again.
    spawner.crash_code = None
    await supervisor.load("m")
    supervisor.unload("m")
    while supervisor.running("m") is not None:
        await supervisor.wait_changed()
    spawner.crash_code = 1
    with pytest.raises(LoadFailed):
        await supervisor.load("m")
    failed_at = trio.current_time()
    with pytest.raises(LoadFailed):
        await supervisor.load("m")
    assert spawner.spawned[-1].spawned_at - failed_at == pytest.approx(0.4, abs=1e-9)


# -- idle TTL --------------------------------------------------------------------------------


async def test_an_idle_backend_stops_exactly_idle_ttl_after_its_last_request_ended_never_during_one(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Any) -> None:
    spawner = FakeSpawner(nursery)
    supervisor = await start_supervisor(nursery, tmp_path, spawner, {"m": {"idle_ttl": 30}})
    backend = await take_slot(supervisor, "m")
    await trio.sleep(50)  # a request longer than the TTL: in flight is never idle
    assert backend.state is State.READY and not backend.stop_requested
    backend.release()
    await trio.sleep(20)
    again = await take_slot(supervisor, "m")  # a request moves the deadline
    assert again is backend
    await trio.sleep(1)
    again.release()
    last_ended = trio.current_time()
    assert await gone_at(backend) - last_ended == pytest.approx(30, abs=1e-9)
    assert backend.stop_cause == "idle"


async def test_an_extra_replica_stops_after_scale_down_idle_while_the_first_stays(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Any) -> None:
    spawner = FakeSpawner(nursery, load_time=0.0)
    supervisor = await start_supervisor(
        nursery, tmp_path, spawner, {"m": {"args": ["--parallel", "1"], "replicas": "auto", "max_replicas": 2}},
        scheduler={"scale_up_wait": 0.5, "scale_down_idle": 5.0, "max_queue_wait": 60})
    first = await take_slot(supervisor, "m")  # ready at once: no request waited yet
    spawner.load_time = 2.0
    waiting_since = trio.current_time()
    extra = await take_slot(supervisor, "m")  # waits scale_up_wait, then for the new replica's load
    assert extra is not first and extra.extra
    # Started once the request has waited scale_up_wait (the pool looks again 10 ms past it),
    # and the request served the moment the new replica is ready.
    started_after = spawner.spawned[1].spawned_at - waiting_since
    assert 0.5 <= started_after <= 0.5 + 0.01 + 1e-9
    assert trio.current_time() - waiting_since == pytest.approx(started_after + 2.0, abs=1e-9)
    await trio.sleep(10)
    extra.release()
    released = trio.current_time()
    first.release()
    assert await gone_at(extra) - released == pytest.approx(5.0, abs=1e-9)
    assert extra.stop_cause == "idle"
    await trio.sleep(100)
    assert first.state is State.READY  # the model's idle_ttl is 0: its first replica stays


# -- a remote's health checks ------------------------------------------------------------------


class RemoteServer:
    """A remote over loopback that notes when each check comes and answers 200 or 503."""

    def __init__(self) -> None:
        self.checks: list[float] = []
        self.up = True
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            async for _ in request_heads(stream):
                self.checks.append(trio.current_time())
                status = b"200 OK" if self.up else b"503 Unavailable"
                await stream.send_all(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")


async def checked_remote(nursery: trio.Nursery) -> tuple[RemoteServer, Remote, float]:
    """A remote (``health_interval`` 10 s) in front of a ``RemoteServer``, started now: the
    server, the remote, and the time its checks count from."""
    server = RemoteServer()
    await nursery.start(server.serve)
    config = config_mod.RemoteConfig(url=f"http://127.0.0.1:{server.port}", models=["x"], health_interval=10.0,
                                     health_path="/health")
    remote = Remote("r", config, "", bus=events.Bus(), on_change=lambda: None)
    start = trio.current_time()
    nursery.start_soon(remote.run, lambda: None)
    return server, remote, start


async def test_a_remote_is_checked_every_health_interval_and_backs_off_while_unreachable(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    server, remote, start = await checked_remote(nursery)
    await trio.sleep(25)
    server.up = False  # the check at 30 fails: then 0.25, 0.5, 1, 2, 4, 8 s later, then every 10 s
    await trio.sleep(25)
    assert remote.state == "unreachable"
    server.up = True  # the check at 55.75 answers: every 10 s again
    await trio.sleep(20)
    assert remote.state == "reachable"
    times = [round(t - start, 9) for t in server.checks]
    assert times == pytest.approx([0, 10, 20, 30, 30.25, 30.75, 31.75, 33.75, 37.75, 45.75, 55.75, 65.75],
                                  abs=1e-9)
    remote.close()


async def test_a_broken_call_to_a_remote_makes_it_checked_at_once(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    server, remote, start = await checked_remote(nursery)
    await trio.sleep(4)
    remote.distrust()  # a request to it failed: unreachable until a check answers, checked now
    assert not remote.accepting
    await trio.sleep(0.001)
    assert remote.accepting
    assert [round(t - start, 9) for t in server.checks] == pytest.approx([0, 4], abs=1e-9)
    remote.close()


# -- a waiting stream's keep-alive and loading feedback -----------------------------------------


class RecordingClient:
    """An ASGI send noting when each message goes out."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, dict[str, Any]]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append((trio.current_time(), dict(message)))

    def bodies(self, start: float) -> list[tuple[float, bytes]]:
        return [(round(at - start, 9), message["body"]) for at, message in self.messages
                if message["type"] == "http.response.body"]


async def test_a_waiting_stream_gets_a_keep_alive_comment_every_keepalive_interval_until_served(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    send = RecordingClient()
    client = Exchange(AsgiSink(send))
    done = trio.Event()
    start = trio.current_time()

    async def served_at(when: float) -> None:
        await trio.sleep(when)
        done.set()

    nursery.start_soon(served_at, 16.0)
    await keep_informed(client, done, interval=5.0, model="m")
    assert trio.current_time() - start == pytest.approx(16.0, abs=1e-9)  # returns the moment it is served
    start_message = send.messages[0]
    assert start_message[1]["type"] == "http.response.start" and start_message[0] - start == pytest.approx(5.0)
    assert (b"content-type", b"text/event-stream") in start_message[1]["headers"]
    assert send.bodies(start) == [(5.0, b": waiting for m\n\n"), (10.0, b": waiting for m\n\n"),
                                  (15.0, b": waiting for m\n\n")]


async def test_a_stream_served_before_the_first_interval_gets_no_headers_from_the_wait(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    send = RecordingClient()
    client = Exchange(AsgiSink(send))
    done = trio.Event()

    async def served_soon() -> None:
        await trio.sleep(4.9)
        done.set()

    nursery.start_soon(served_soon)
    await keep_informed(client, done, interval=5.0, model="m")
    assert send.messages == [] and not client.started  # the answer may still be a plain JSON error


async def test_loading_feedback_is_said_when_it_changes_or_every_keepalive_interval(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    send = RecordingClient()
    client = Exchange(AsgiSink(send))
    client.model = "m"
    done = trio.Event()
    start = trio.current_time()
    phases = {0.0: "loading m", 3.5: "loading m, further"}  # what describe() says from each time on

    def describe() -> str:
        elapsed = trio.current_time() - start
        return phases[max(at for at in phases if at <= elapsed)]

    async def served_at(when: float) -> None:
        await trio.sleep(when)
        done.set()

    nursery.start_soon(served_at, 14.5)
    await keep_informed(client, done, interval=5.0, model="m", describe=describe)
    said = [(at, json.loads(body.removeprefix(b"data: "))["choices"][0]["delta"]["reasoning_content"])
            for at, body in send.bodies(start)]
    # Looked at every FEEDBACK_INTERVAL (1 s): said at 1 s, again at 4 s (changed), then every 5 s.
    assert proxy.FEEDBACK_INTERVAL == 1.0
    assert said == [(1.0, "loading m\n"), (4.0, "loading m, further\n"), (9.0, "loading m, further\n"),
                    (14.0, "loading m, further\n")]
