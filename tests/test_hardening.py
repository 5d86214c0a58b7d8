"""Nothing a client sends takes routerd down: the faults found in review, each as a regression
test, plus the limits that keep slow or idle clients from holding the daemon.

Each of these failed before the hardening: a deep JSON line or a huge number on the control
socket ended the daemon, the same bodies over HTTP were 500s, startup failures printed
tracebacks, queued requests failed with a backend they never reached, and corrupted cache
entries vanished without a word.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio
import trio.testing

from routerd import client_json
from routerd.errors import EXIT_CANTCREAT, EXIT_CONFIG, EXIT_UNAVAILABLE
from routerd.front import h1_connection, http_server
from routerd.models import discovery
from tests.conftest import isolated_env, make_config, spawn_routerd
from tests.test_catalog import hf_repo
from tests.test_control import call, rpc

CHAT = "/v1/chat/completions"
DEEP = b"[" * 50_000 + b"]" * 50_000
HUGE_NUMBER = b"1" * 5000


def deep_request(params: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","id":1,"method":"status","params":' + params + b"}\n"


# -- parsing (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "why"), [
    (DEEP, "nested more than about"),
    (HUGE_NUMBER, "can read"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{nope", "not valid JSON"),
    (b"[[[[1]]]]", "nested more than 3 levels"),
])
def test_every_bad_document_is_one_error(data, why):
    with pytest.raises(client_json.InvalidJson, match=why):
        client_json.loads(data, max_depth=3)


def test_depth_counts_arrays_and_objects_alike():
    assert not client_json.depth_exceeds({"a": [{"b": 1}]}, 3)
    assert client_json.depth_exceeds({"a": [{"b": [1]}]}, 3)
    assert not client_json.depth_exceeds("scalar", 0)


# -- the control socket ---------------------------------------------------------------------
@pytest.mark.parametrize("params", [DEEP, HUGE_NUMBER, b"[" * 33 + b"]" * 33])
async def test_a_hostile_control_line_is_a_parse_error_and_the_daemon_lives(start_routerd, tmp_path, model_file,
                                                                          params):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    reply = (await rpc(r.daemon.socket_path, raw=deep_request(params)))[0]
    assert reply["error"]["code"] == -32700 and reply["id"] is None
    assert (await rpc(r.daemon.socket_path, call("ping")))[0]["result"] == "pong"
    assert (await r.http.get("/health")).status_code == 200


async def test_a_batch_over_the_limit_is_an_invalid_request(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    reply = (await rpc(r.daemon.socket_path, [call("ping", id=i) for i in range(65)]))[0]
    assert reply["error"]["code"] == -32600 and "at most 64" in reply["error"]["message"]
    assert len((await rpc(r.daemon.socket_path, [call("ping", id=i) for i in range(64)]))[0]) == 64


async def test_wrong_types_in_params_and_ids_are_errors_not_crashes(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    sock = r.daemon.socket_path
    for params in ({"model": 5}, {"model": ["a"]}, {"model": "a", "lines": 1.5}, {"model": None}):
        assert (await rpc(sock, call("logs", params)))[0]["error"]["code"] == -32602
    assert (await rpc(sock, call("ping", id=True)))[0]["error"]["code"] == -32600
    assert (await rpc(sock, call("ping", id=[1])))[0]["error"]["code"] == -32600
    assert (await rpc(sock, call("x" * 100_000)))[0]["error"]["code"] == -32601


async def idle_connections(path: str, n: int) -> list[trio.SocketStream]:
    return [await trio.open_unix_socket(path) for _ in range(n)]


async def test_idle_control_clients_never_lock_out_routerctl(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, control={"max_connections": 8}))
    idle = await idle_connections(r.daemon.socket_path, 20)
    try:
        for _ in range(3):
            status = (await rpc(r.daemon.socket_path, call("status")))[0]
            assert status["result"]["summary"].startswith("1 models")
        closed = 0
        for stream in idle:  # the longest-idle ones were closed to make room
            with trio.move_on_after(1):
                closed += await stream.receive_some(100) == b""
        assert closed >= 12
    finally:
        for stream in idle:
            await stream.aclose()


async def test_a_silent_control_connection_is_closed_after_the_idle_timeout(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, control={"idle_timeout": 0.3}))
    stream = await trio.open_unix_socket(r.daemon.socket_path)
    async with stream:
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""


async def test_a_control_connection_closes_exactly_idle_timeout_after_its_last_request(autojump_clock):
    """The control socket's idle timer, in-process on trio's MockClock: each request line that
    comes within ``idle_timeout`` of the last is read, and the connection ends exactly
    ``idle_timeout`` after the last one (the daemon's wiring of ``control.idle_timeout`` is the
    test above)."""
    from routerd.ops.jsonrpc import Connection

    ours, theirs = trio.socket.socketpair()
    client = trio.SocketStream(theirs)
    conn = Connection(trio.SocketStream(ours), idle_timeout=0.3)

    async def send_requests() -> None:
        for gap, line in ((0.2, b'{"id": 1}\n'), (0.29, b'{"id": 2}\n'), (0.25, b'\n{"id": 3}\n')):
            await trio.sleep(gap)
            await client.send_all(line)

    read: list[tuple[bytes, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_requests)
        async for line in conn.lines():
            read.append((line, trio.current_time()))
    ended = trio.current_time()
    assert [line for line, _ in read] == [b'{"id": 1}', b'{"id": 2}', b'{"id": 3}']  # a blank line is no request
    assert ended - read[-1][1] == pytest.approx(0.3, abs=1e-6)
    await client.aclose()


# -- HTTP -----------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b'{"model": "a", "messages": ' + DEEP + b"}",
                                  b'{"model": "a", "n": ' + HUGE_NUMBER + b"}",
                                  b'{"model": "a\xff"}'])
async def test_hostile_json_bodies_are_400_not_500(start_routerd, tmp_path, model_file, body):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    response = await r.http.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"


async def test_too_many_header_fields_is_431(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, server={"max_headers": 20}))
    headers = {f"x-filler-{i}": "1" for i in range(30)}
    for response in (await r.http.get("/health", headers=headers), await r.http.post(CHAT, json={}, headers=headers)):
        assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"


async def raw_exchange(url: str, data: bytes, *, wait: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    received = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(wait):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_a_body_that_never_arrives_is_408(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, server={"body_timeout": 0.3}))
    answer = await raw_exchange(r.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer


async def test_unfinished_headers_are_dropped_after_the_header_timeout(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, server={"header_timeout": 0.5}))
    with trio.fail_after(5):  # a closed connection, not the 5 s the helper would wait
        assert await raw_exchange(r.url, b"GET /health HTTP/1.1\r\nhost: x\r\n", wait=10) == b""


def front_answering_ok(*, header_timeout: float) -> Any:
    """routerd's HTTP front for plain connections, its settings from ``[server]``, with a handler
    that answers every request ``"ok"``, for driving one connection in-process
    (``http_server._connection``)."""
    from routerd.config import ServerConfig

    config = http_server.hypercorn_config(ServerConfig(header_timeout=header_timeout))

    async def ok(scope, request):
        await request.answer(200, [], b'"ok"\r\n')

    settings = h1_connection.Settings(header_timeout=config.keep_alive_timeout,
                                      max_head_bytes=config.h11_max_incomplete_size)
    return config, http_server._Front(ok, settings, plain_on_hypercorn=False)


def serve_one(config: Any, front: Any, stream: Any) -> Any:
    """The front's task for one accepted connection."""
    return partial(http_server._connection, None, config, http_server.WorkerContext(None), {}, lambda: None, 60.0,
                   front, stream)


async def read_ok(client: trio.SocketStream, closed_means: str) -> None:
    """Read one whole "ok" answer; the connection closing first fails with ``closed_means``."""
    answer = b""
    while b'"ok"' not in answer:
        chunk = await client.receive_some(65536)
        assert chunk, f"{closed_means} (answer so far: {answer!r})"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")


async def test_a_kept_alive_connection_serves_again_and_closes_once_idle_for_the_header_timeout(autojump_clock):
    """The front's keep-alive timer, in-process on trio's MockClock: each request that comes
    within ``header_timeout`` of the last answer is served on the same connection, and the
    connection is closed exactly ``header_timeout`` after its last answer (the wiring of
    ``server.header_timeout`` through a real daemon is test_unfinished_headers_... above)."""
    config, front = front_answering_ok(header_timeout=0.5)
    assert front.settings.header_timeout == 0.5
    ours, theirs = trio.socket.socketpair()
    client = trio.SocketStream(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one(config, front, trio.SocketStream(ours)))
        for gap in (0.3, 0.49, 0.0, 0.45):  # each within the timeout of the last answer
            await trio.sleep(gap)
            await client.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            await read_ok(client, "the connection was closed within the keep-alive timeout")
            answered = trio.current_time()
        with trio.fail_after(5):  # then idle: closed once 0.5 s have passed, not before
            assert await client.receive_some(65536) == b""
        assert trio.current_time() - answered == pytest.approx(0.5, abs=1e-6)
    await client.aclose()


async def test_a_request_still_unread_when_the_keep_alive_deadline_passes_is_answered(mock_clock):
    """A request that arrived within ``header_timeout`` but is still unread when the deadline
    passes (routerd's loop was busy: seen under load with a 0.1-s timeout) is answered, not
    closed under. trio wakes the reader and the timer in either order, so this tries often
    (each try ran both ways about half the time before the fix)."""
    config, front = front_answering_ok(header_timeout=0.5)
    for _ in range(24):
        ours, theirs = socket.socketpair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one(config, front, trio.SocketStream(trio.socket.from_stdlib_socket(ours))))
            await trio.testing.wait_all_tasks_blocked()  # reading, its timer armed
            theirs.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")  # in time...
            mock_clock.jump(1.0)  # ...but the loop only gets to it after the deadline
            client = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
            await read_ok(client, "closed under a request that arrived in time")
            await client.aclose()
            mock_clock.autojump_threshold = 0  # let the connection's own timers run out
        mock_clock.autojump_threshold = math.inf


async def test_a_kept_alive_connection_late_at_every_deadline_keeps_serving(mock_clock):
    """routerd's loop reaches each request of a long-lived connection only after its header
    deadline (the request itself came in time): every one is answered and the connection goes
    on. A head parsed just as the timer fired used to be answered and the connection then
    closed, the timer's firing taken for an idle client (fails without the fix at the second
    request). The extra header_timeout for unread bytes is per idle spell as well."""
    config, front = front_answering_ok(header_timeout=0.5)
    ours, theirs = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one(config, front, trio.SocketStream(trio.socket.from_stdlib_socket(ours))))
        for _ in range(16):  # trio runs the reader or the timer first, in either order
            await trio.testing.wait_all_tasks_blocked()  # idle, its timer armed
            theirs.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")  # in time...
            mock_clock.jump(0.6)  # ...but the loop gets to it after the deadline
            await read_ok(client, "closed under a request that arrived in time")
        await client.aclose()
        mock_clock.autojump_threshold = 0


async def test_a_client_pipelining_without_reading_answers_is_not_read_without_bound():
    """Requests sent behind one that is still being answered are read ahead only up to
    MAX_PIPELINED: a client that floods requests and reads no answers holds a bounded queue,
    and the requests it sent are all answered, in order, once it reads."""
    release = trio.Event()
    seen: list[str] = []

    async def slow_first(scope, request):
        seen.append(scope["path"])
        if scope["path"] == "/0":
            await release.wait()
        await request.answer(200, [], scope["path"].encode())

    ours, theirs = trio.socket.socketpair()
    connection = h1_connection.Connection(trio.SocketStream(ours), slow_first,
                                          h1_connection.Settings(header_timeout=30))
    client = trio.SocketStream(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve)
        for i in range(200):  # one write each: the reader sees them arrive one by one
            await client.send_all(b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % i)
            await trio.testing.wait_all_tasks_blocked()
            # at most MAX_PIPELINED (16) heads waiting, each with its end, and one read's worth more
            assert len(connection.pieces) <= 40, f"read ahead without bound: {len(connection.pieces)} pieces"
        release.set()
        received = b""
        with trio.fail_after(10):
            while received.count(b"HTTP/1.1 200") < 200:
                received += await client.receive_some(65536)
        await client.aclose()
    assert seen == [f"/{i}" for i in range(200)]


async def test_a_request_that_outlasts_the_header_timeout_is_answered_whole(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.2"]}},
        server={"header_timeout": 0.3}))
    body = json.dumps({"model": "a", "max_tokens": 6, "messages": [], "stream": True}).encode()
    answer = await raw_exchange(r.url, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                       b"content-type: application/json\r\n"
                                       b"content-length: %d\r\n\r\n%s" % (len(body), body), wait=10)
    assert answer.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in answer


def test_hundreds_of_stalled_clients_on_both_fronts_do_not_stop_service(tmp_path, model_file):
    """300 HTTP connections that never finish their headers and 200 idle control connections
    (routerd in its own process, as in production): a request and `routerctl status` go through."""
    data = make_config(tmp_path, {"a": {"path": model_file("a")}})
    proc, url = spawn_routerd(tmp_path, data)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stalled: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
            stalled.append(s)
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.connect(data["control"]["socket"])
            stalled.append(s)
        response = httpx.post(url + CHAT, json={"model": "a", "messages": [{"role": "user", "content": "hi"}]},
                              timeout=30, trust_env=False)
        assert response.status_code == 200
        status = subprocess.run([sys.executable, "-m", "routerctl", "--socket", data["control"]["socket"], "status"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "a " in status.stdout, status.stderr
    finally:
        for s in stalled:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- startup failures -----------------------------------------------------------------------
def serve(tmp_path: Path, data: dict | None, env: dict[str, str] | None = None,
          config_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    if config_path is None:
        config_path = tmp_path / "config.toml"
        config_path.write_text(tomli_w.dumps(data or {}))
    return subprocess.run([sys.executable, "-m", "routerd", "serve", "--config", str(config_path),
                           "--log-level", "ERROR"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **isolated_env(tmp_path), **(env or {})})


def assert_clean_failure(result: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("routerd: ")]
    assert len(lines) == 1, result.stderr  # one message (a config's may list each error below it)
    for word in words:
        assert word in result.stderr, result.stderr


def test_port_in_use_is_one_line_and_exit_69(tmp_path, model_file):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = make_config(tmp_path, {}, server={"port": taken.getsockname()[1]})
        assert_clean_failure(serve(tmp_path, data), EXIT_UNAVAILABLE, "address is in use", "server.port")


def test_socket_of_another_routerd_is_one_line_and_exit_69(tmp_path, model_file):
    data = make_config(tmp_path, {})
    proc, _ = spawn_routerd(tmp_path, dict(data))
    try:
        second = tmp_path / "second"
        second.mkdir()
        result = serve(second, make_config(tmp_path, {}))  # same control socket, another port
        assert_clean_failure(result, EXIT_UNAVAILABLE, "another routerd is already listening", "control.socket")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_bad_or_unreadable_config_is_one_error_and_exit_78(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    assert_clean_failure(serve(tmp_path, None, config_path=bad), EXIT_CONFIG, "server.port")
    assert_clean_failure(serve(tmp_path, None, config_path=tmp_path), EXIT_CONFIG, "cannot read")


def test_missing_llama_server_is_one_line_and_exit_78(tmp_path):
    data = make_config(tmp_path, {})
    data["backend"]["binary"] = str(tmp_path / "no-such-llama-server")
    assert_clean_failure(serve(tmp_path, data), EXIT_CONFIG, "not an executable file")


def test_unwritable_state_directory_is_one_line_and_exit_73(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory below a regular file cannot be made, even by root
    result = serve(tmp_path, make_config(tmp_path, {}), env={"STATE_DIRECTORY": str(blocker / "state")})
    assert_clean_failure(result, EXIT_CANTCREAT, "state directory", "STATE_DIRECTORY")


def test_debug_shows_the_traceback(tmp_path):
    data = make_config(tmp_path, {})
    data["backend"]["binary"] = str(tmp_path / "no-such-llama-server")
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(data))
    result = subprocess.run([sys.executable, "-m", "routerd", "serve", "--debug", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, **isolated_env(tmp_path)})
    assert result.returncode == EXIT_CONFIG and "Traceback" in result.stderr


# -- a backend's death and the queue ---------------------------------------------------------
async def test_requests_still_queued_when_the_backend_dies_are_served_by_the_next_one(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--parallel", "4", "--fake-token-delay", "0.1"]}},
        scheduler={"restart_backoff": 0.1}))
    bodies: list[str] = []
    started = 0
    progress = trio.Event()

    async def stream() -> None:
        nonlocal started, progress
        body = ""
        async with r.http.stream("POST", CHAT, json={"model": "a", "stream": True, "max_tokens": 40,
                                                     "messages": [{"role": "user", "content": "hi"}]}) as response:
            async for chunk in response.aiter_text():
                if not body and "tok0" in chunk:  # delivered: the backend is answering it
                    started += 1
                    progress.set()
                    progress = trio.Event()
                body += chunk
        bodies.append(body)

    await r.http.post(CHAT, json={"model": "a", "max_tokens": 1, "messages": []})
    first = r.supervisor.running("a")
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(stream)
        with trio.fail_after(10):  # four streams answering, two still queued in routerd
            while not (started == 4 and r.supervisor.queued("a") == 2):
                await progress.wait()
        os.kill(first.pid, signal.SIGKILL)
    failed = [b for b in bodies if "backend_failed" in b]
    served = [b for b in bodies if b.rstrip().endswith("data: [DONE]")]
    assert len(failed) == 4 and len(served) == 2, [body[:120] + " ... " + body[-200:] for body in bodies]
    assert r.supervisor.running("a").pid != first.pid


async def test_a_backend_whose_call_broke_takes_requests_again_once_healthy(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.5"]}},
        server={"upstream_read_timeout": 0.2}))
    slow = await r.http.post(CHAT, json={"model": "a", "max_tokens": 3, "messages": []})
    assert slow.status_code == 502 and "no data from the backend" in slow.json()["error"]["message"]
    backend = r.supervisor.running("a")
    with trio.fail_after(10):  # /health answers: the same process serves again
        while backend.suspect:
            await r.supervisor.wait_changed()
    quick = await r.http.post("/tokenize", json={"model": "a", "content": "hi"})
    assert quick.status_code == 200 and r.supervisor.running("a") is backend


# -- corrupted cache entries ---------------------------------------------------------------------
def corrupt_repo(cache: Path) -> None:
    hf_repo(cache, "org/good", {"good-Q4_K_M.gguf": "model"})
    hf_repo(cache, "org/broken", {"broken-Q4_K_M.gguf": "model"}, revision="b" * 40, main=False)
    refs = cache / "models--org--broken" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("c" * 40)  # names a snapshot that is not there


def test_a_corrupted_cache_repo_is_reported_with_its_reason(tmp_path):
    corrupt_repo(tmp_path / "hub")
    scan = discovery.scan_hf_cache(tmp_path / "hub")
    assert [f.name for f in scan.found] == ["org/good:Q4_K_M"]
    assert len(scan.problems) == 1 and scan.problems[0].startswith("org/broken: ")


async def test_rescan_lists_corrupted_cache_entries_and_logs_them(start_routerd, tmp_path, caplog):
    r = await start_routerd(make_config(tmp_path, {}))
    corrupt_repo(tmp_path / "hf-cache")
    result = (await rpc(r.daemon.socket_path, call("rescan")))[0]["result"]
    assert result["added"] == ["org/good:Q4_K_M"]
    assert len(result["problems"]) == 1 and result["problems"][0].startswith("org/broken: ")
    assert any("corrupted" in rec.getMessage() and "org/broken" in rec.getMessage() for rec in caplog.records)
    printed = await trio.run_process([sys.executable, "-m", "routerctl", "--socket", r.daemon.socket_path, "rescan"],
                                     capture_stdout=True, check=False)
    assert b"not served (corrupted cache entry): org/broken: " in printed.stdout


# -- the HTTP server's per-connection containment ----------------------------------------------
class _FailingStream:
    """A real socket stream whose reads fail the way no HTTP server expects (a stand-in for
    hypercorn's own protocol races, such as the BusyResourceError the fuzz suite found in its
    close path)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise RuntimeError("injected fault inside the HTTP server")


async def test_a_failure_inside_the_http_server_closes_only_that_connection(caplog):
    config, front = front_answering_ok(header_timeout=5.0)
    ours, theirs = trio.socket.socketpair()
    stream = _FailingStream(trio.SocketStream(ours))
    with trio.fail_after(5):
        await serve_one(config, front, stream)()
    assert stream.socket.fileno() == -1  # closed
    assert any("failed inside the HTTP server" in rec.getMessage() for rec in caplog.records)
    assert not front.open, "the failed connection is still counted as open"
    theirs.close()


# -- routerctl against a socket that misbehaves ------------------------------------------------
@pytest.mark.parametrize("answer", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n", b"[1, 2]\n"])
def test_routerctl_says_what_went_wrong_when_the_socket_misbehaves(tmp_path, answer):
    """A peer that hangs up at once, or that is not routerd: one line and exit 3, no traceback."""
    import threading

    path = str(tmp_path / "not-routerd.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve_once() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        if answer is not None:
            conn.sendall(answer)
        conn.close()

    thread = threading.Thread(target=serve_once)
    thread.start()
    try:
        result = subprocess.run([sys.executable, "-m", "routerctl", "--socket", path, "status"],
                                capture_output=True, text=True, timeout=30)
    finally:
        thread.join(10)
        server.close()
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("routerctl: ") and "Traceback" not in result.stderr
