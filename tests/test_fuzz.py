"""Fuzzing both fronts of a running routerd (its own process, fake backend): random bytes,
random HTTP framing, random JSON bodies and random JSON-RPC. After every example the daemon
must still answer ``GET /health`` and ``ping``, and nothing may be routerd's own 500 or
JSON-RPC internal error (those mean a client's input reached a bug). Bounded: a few hundred
examples, well under two minutes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerd.front import http_server
from routerd.front.routes import PROXIED_POST
from routerd.ops.control import STATE_CHANGING
from tests.conftest import make_config, spawn_routerd

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PING = b'{"jsonrpc": "2.0", "id": "after", "method": "ping"}'
METHODS = sorted(STATE_CHANGING | {"ping", "version", "status", "models", "logs", "memory"})


class Target:
    """The routerd under fuzz: its HTTP address, control socket and process."""

    def __init__(self, proc: Any, url: str, socket_path: str, scratch: Path) -> None:
        self.proc, self.url, self.socket_path, self.scratch = proc, url, socket_path, scratch
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.address = (host, int(port))
        # A new connection per request: the daemon closes idle ones after header_timeout (0.1 s
        # here), and a request sent on a kept one just as it closes is a race every HTTP server
        # has, not a finding.
        self.http = httpx.Client(base_url=url, timeout=30, trust_env=False,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def raw_http(self, data: bytes) -> bytes:
        """Send raw bytes; the status line of the answer (b"" if the server just closed)."""
        with socket.create_connection(self.address, timeout=10) as s:
            try:
                s.sendall(data)
            except OSError:
                pass  # the server may refuse the rest of what we send, having answered already
            received = b""
            try:
                while b"\r\n" not in received and (chunk := s.recv(65536)):
                    received += chunk
            except OSError:
                pass
        return received.split(b"\r\n", 1)[0]

    def control(self, line: bytes) -> list[Any]:
        """Send one line, then a ping on the same connection; every reply before the ping's
        (notifications and blank lines get none), parsed."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.socket_path)
            s.sendall(line + b"\n" + PING + b"\n")
            received = b""
            while b'"id": "after"' not in received and (chunk := s.recv(65536)):
                received += chunk
        replies = [json.loads(part) for part in received.split(b"\n") if part.strip()]
        return [reply for reply in replies if not (isinstance(reply, dict) and reply.get("id") == "after")]

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, "routerd exited"
        assert self.http.get("/health").status_code == 200
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.socket_path)
            s.sendall(PING + b"\n")
            assert json.loads(s.makefile("rb").readline())["result"] == "pong"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("fuzz")
    model = home / "a.gguf"
    model.write_bytes(b"not really a gguf")
    data = make_config(home, {"a": {"path": str(model)}},
                       server={"header_timeout": 0.1, "body_timeout": 0.1, "max_body_bytes": 65536},
                       scheduler={"max_queue_wait": 5.0, "restart_backoff": 0.05})
    proc, url = spawn_routerd(home, data, env={"HF_HUB_OFFLINE": "1"})
    target = Target(proc, url, data["control"]["socket"], home / "scratch")
    target.scratch.mkdir()
    try:
        yield target
    finally:
        target.http.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "routerd did not stop cleanly after the fuzzing"


# -- strategies -------------------------------------------------------------------------------
huge_numbers = st.integers(4000, 6000).map(lambda n: b"9" * n)  # past Python's int conversion limit
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=50),
                    st.text(min_size=5000, max_size=20000).filter(bool))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=5) |
                           st.dictionaries(st.text(max_size=10), children, max_size=5), max_leaves=20)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    """Valid JSON of every shape, plus what only breaks parsers: deep nesting, huge numbers,
    invalid UTF-8, truncation."""
    kind = draw(st.sampled_from(["value", "deep", "huge", "bad-utf8", "truncated"]))
    if kind == "deep":
        depth = draw(st.integers(30, 60_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * depth + b"1" + closer * depth
    if kind == "huge":
        return b'{"model": "a", "n": ' + draw(huge_numbers) + b"}"
    document = encode(draw(json_values))
    if kind == "bad-utf8":
        return document[:1] + b"\xff\xc3" + document[1:]
    if kind == "truncated":
        return document[: draw(st.integers(0, max(0, len(document) - 1)))]
    return document


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """Bodies routerd reads: ``model`` and ``stream`` of every type, or no object at all."""
    if draw(st.booleans()):
        return draw(json_documents())
    body = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    body["model"] = draw(st.sampled_from(["a", "nope", "", "a/b:Q4"]) | json_values)
    body["stream"] = draw(st.booleans() | json_values)
    body["messages"] = [{"role": "user", "content": "hi"}]
    body["max_tokens"] = 2  # what the stand-in backend generates stays short
    return encode(body)


header_text = st.text(st.characters(codec="latin-1"), max_size=40).map(lambda t: t.encode("latin-1"))
paths = st.sampled_from(sorted(PROXIED_POST) + ["/health", "/v1/models", "/memory", "/upstream/a/health",
                                                "/a/props", "/v1/models/a", "/%00", "/" + "x" * 9000]) | \
    header_text.map(lambda t: b"/" + t).map(lambda b: b.decode("latin-1"))


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """HTTP/1.1 framing, right and wrong: methods, targets, versions, header names and values,
    Content-Length and chunked bodies that disagree with what follows."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE"]) | header_text)
    target = draw(paths).encode("latin-1", "replace")
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b""]))
    body = draw(request_bodies())
    headers = [(b"host", b"x")]
    headers += draw(st.lists(st.tuples(header_text, header_text), max_size=6))
    framing = draw(st.sampled_from(["length", "wrong-length", "bad-length", "chunked", "bad-chunked", "none"]))
    if framing == "length":
        headers.append((b"content-length", b"%d" % len(body)))
    elif framing == "wrong-length":
        headers.append((b"content-length", b"%d" % draw(st.integers(0, 10**12))))
    elif framing == "bad-length":
        headers.append((b"content-length",
                        draw(st.sampled_from([b"-1", b"abc", b"1e3", b"", b"99999999999999999999"]))))
    elif framing in ("chunked", "bad-chunked"):
        headers.append((b"transfer-encoding", b"chunked"))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if framing == "chunked" else b"zz\r\n" + body
    head = method + b" " + target + (b" " + version if version else b"") + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


@st.composite
def rpc_lines(draw: st.DrawFn, scratch: str) -> bytes:
    """JSON-RPC requests with wrong types everywhere, or lines that are not JSON-RPC at all."""
    kind = draw(st.sampled_from(["request", "request", "batch", "document", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300)).replace(b"\n", b" ")
    if kind == "document":
        return draw(json_documents())

    def message() -> Any:
        request = {"jsonrpc": draw(st.sampled_from(["2.0", "1.0"]) | json_values),
                   "method": draw(st.sampled_from(METHODS) | json_values)}
        params = draw(st.none() | st.fixed_dictionaries(
            {}, optional={"model": st.sampled_from(["a", "nope"]) | json_values, "wait": json_values,
                          "force": json_values, "lines": json_values, "file": json_values, "path": json_values}) |
            json_values)
        if isinstance(params, dict):
            # Never follow logs forever, never import or pull outside the scratch folder.
            params.pop("follow", None)
            if "path" in params and isinstance(params["path"], str):
                params["path"] = os.path.join(scratch, params["path"].lstrip("/").replace("..", "_"))
            request["params"] = params
        if draw(st.booleans()):
            request["id"] = draw(st.integers() | st.text(max_size=5) | json_values)
        return request

    value = [message() for _ in range(draw(st.integers(1, 4)))] if kind == "batch" else message()
    return encode(value).replace(b"\n", b" ")


# -- the fuzz -------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_on_the_http_port(target: Target, data: bytes) -> None:
    status = target.raw_http(data)
    assert b" 500 " not in status
    target.assert_alive()


@FUZZ
@given(data=http_requests())
def test_random_http_framing(target: Target, data: bytes) -> None:
    status = target.raw_http(data)
    assert b" 500 " not in status
    target.assert_alive()


@FUZZ
@given(route=st.sampled_from(sorted(PROXIED_POST)), body=request_bodies(),
       # (a header value cannot start or end with a space: the client itself refuses to send one)
       priority=(st.none() | st.sampled_from(["high", "low"])
                 | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(str.strip)))
def test_random_json_bodies(target: Target, route: str, body: bytes, priority: str | None) -> None:
    headers = {"content-type": "application/json"}
    if priority is not None:
        headers["x-request-priority"] = priority
    response = target.http.post(route, content=body, headers=headers)
    assert response.status_code != 500, response.text
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith("application/json"):
        error = response.json()["error"]
        assert error["message"] and error["type"]
    target.assert_alive()


@FUZZ
@given(data=st.data())
def test_random_json_rpc(target: Target, data: st.DataObject) -> None:
    line = data.draw(rpc_lines(str(target.scratch)))
    replies = target.control(line)
    for reply in replies:
        for one in reply if isinstance(reply, list) else [reply]:
            assert one["jsonrpc"] == "2.0"
            assert "result" in one or one["error"]["code"] != -32603, one
    target.assert_alive()


def test_the_fuzzed_daemon_still_serves_and_reports_nothing_internal(target: Target) -> None:
    """After all of the above: a real completion goes through, and routerd's log names no bug."""
    log_path = target.scratch.parent / "routerd.log"
    answered = " POST /v1/chat/completions 200 "  # its request-log line, written once the answer is out

    def logged() -> int:
        return log_path.read_text().count(answered)
    before = logged()
    response = target.http.post("/v1/chat/completions", json={"model": "a", "messages": [], "max_tokens": 2})
    assert response.status_code == 200
    deadline = time.monotonic() + 10  # routerd is another process: wait for this request's log line
    while logged() == before and time.monotonic() < deadline:
        time.sleep(0.02)
    log = log_path.read_text()
    assert log.count(answered) == before + 1, "the completion was never logged"
    assert bug_reports(log) == []


#: What routerd logs when a client's input reached a bug: the proxy's and the views' catch-alls,
#: the contained failure of one HTTP connection (the hypercorn race), and hypercorn's own.
BUG_PHRASES = ("unhandled error", "internal error", "failed inside the HTTP server", "Error in ASGI")


def bug_reports(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(phrase in line for phrase in BUG_PHRASES)]


async def test_a_connection_failing_inside_the_http_server_is_a_bug_report(caplog: pytest.LogCaptureFixture) -> None:
    """The check above must see the line routerd really writes when a connection dies inside
    hypercorn (a broken server object stands in for the race)."""
    ours, theirs = trio.socket.socketpair()
    with theirs:
        await http_server._connection(None, None, None, {}, lambda: None, 1.0, None,  # type: ignore[arg-type]
                                      trio.SocketStream(ours))
    assert bug_reports(caplog.text), caplog.text
