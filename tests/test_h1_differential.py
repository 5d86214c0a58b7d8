"""Differential test of routerd's own HTTP/1.1 connection handler against hypercorn's (h11's).

The same raw bytes go, in-process over a socketpair, to both servers of plain connections that
``http_server._connection`` can run: routerd's (``h1_connection`` over ``h1``, llhttp) and
hypercorn's, each with routerd's settings from a default ``[server]`` and the same small ASGI
app (``echo_app``: reads the whole body, answers what it saw). A *verdict* is what a client can
tell from the answers: each answer's status and what the app saw (method, path, query, version,
headers, body length and sha256), whether the connection is still open after them, and, if it
is, whether a following request on it is answered as itself (framing: no leftover bytes taken
for a request, no request bytes taken for a body). Each case is also sent with the write side
shut right after it (``eof_verdict``: what a client that sends and hangs up gets).

Cases: valid requests (each also sent one byte at a time, the server reading every piece before
the next: the verdict must not change), and malformed or smuggling ones. Where routerd is
stricter than h11 (refuses bytes h11 accepts), the case is in ``STRICTER_THAN_H11`` with the
reason, and the test holds routerd to a 400 that closes the connection. Where routerd is more
lenient or answers differently, the case is marked ``xfail(strict=True)`` with what differs: a
bug to fix in ``h1``/``h1_connection``, not a verdict to accept.
"""

from __future__ import annotations

import hashlib
import json
import socket
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypercorn.utils import wrap_app

from routerd.config import ServerConfig
from routerd.front import h1_connection, http_server

FOLLOW_UP = b"GET /follow-up?n=1 HTTP/1.1\r\nhost: follow.up\r\n\r\n"
SERVER = ServerConfig()
HYPERCORN_CONFIG = http_server.hypercorn_config(SERVER)
OUR_SETTINGS = h1_connection.Settings(header_timeout=HYPERCORN_CONFIG.keep_alive_timeout,
                                      send_timeout=SERVER.send_timeout,
                                      max_head_bytes=HYPERCORN_CONFIG.h11_max_incomplete_size)
#: Longest a connection may take to go quiet after the client's bytes (a hang is a verdict too).
QUIET_WITHIN = 5.0


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body; answers 200 with what it saw, in the ``x-seen`` header (so a HEAD
    answer carries it too) and as the JSON body."""
    if scope["type"] == "lifespan":
        return
    body = b""
    disconnected = False
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected = True
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    seen = {"method": scope["method"], "path": scope["path"], "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"), "version": scope["http_version"],
            "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]],
            "body_length": len(body), "body_sha256": hashlib.sha256(body).hexdigest()[:16],
            "disconnected": disconnected}
    encoded = json.dumps(seen, sort_keys=True).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-seen", encoded)]})
    await send({"type": "http.response.body", "body": encoded})


@attrs.frozen
class Answer:
    status: int
    seen: dict[str, Any] | None  # None: the server answered by itself (an error), not the app

    def __repr__(self) -> str:
        if self.seen is None:
            return f"<{self.status} from the server>"
        seen = self.seen
        return f"<{self.status} {seen['method']} {seen['raw_path']}?{seen['query']} body={seen['body_length']}>"


@attrs.frozen
class Verdict:
    answers: tuple[Answer, ...]
    open_after: bool  # the connection was still open once the server went quiet
    follow_up: Answer | None  # the answer to FOLLOW_UP sent next, if the connection was open
    hung: bool = False  # the server did not go quiet within QUIET_WITHIN

    @property
    def statuses(self) -> list[int]:
        return [answer.status for answer in self.answers]


class ResponseReader:
    """Splits what a server wrote into answers (status, the app's ``x-seen``) by their framing."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answers: list[Answer] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while self._one():
            pass

    def closed(self) -> None:
        """The server closed: an answer framed by the close ends here."""
        self._one(closing=True)

    def _one(self, closing: bool = False) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self.buffer[:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        seen = json.loads(headers[b"x-seen"]) if b"x-seen" in headers else None
        rest = self.buffer[end + 4:]
        if status < 200 or status in (204, 304) or (seen is not None and seen["method"] == "HEAD"):
            body_end = 0
        elif b"content-length" in headers:
            body_end = int(headers[b"content-length"])
            if len(rest) < body_end:
                return False
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body_end = rest.find(b"0\r\n\r\n")  # the app's JSON has no such bytes
            if body_end < 0:
                return False
            body_end += 5
        elif closing:
            body_end = len(rest)  # framed by the close
        else:
            return False
        self.buffer = rest[body_end:]
        self.answers.append(Answer(status, seen))
        return True


async def _quiet() -> None:
    await trio.testing.wait_all_tasks_blocked()


def _read_available(client: socket.socket, reader: ResponseReader) -> bool:
    """Reads what the server has written so far; whether it closed."""
    while True:
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            reader.closed()
            return True
        if not data:
            reader.closed()
            return True
        reader.feed(data)


async def _send(client: socket.socket, data: bytes) -> bool:
    """Writes all of ``data``; False if the server closed first."""
    view = memoryview(data)
    while view:
        try:
            view = view[client.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(client)
        except OSError:  # EPIPE, ECONNRESET
            return False
    return True


def _connected() -> tuple[trio.SocketStream, socket.socket]:
    """The server's end (a trio stream) and the client's (a non-blocking socket)."""
    server_end, client = socket.socketpair()
    client.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(server_end)), client


def _our_server(stream: trio.SocketStream) -> Any:
    front = http_server._Front(h1_connection.asgi_handler(echo_app), OUR_SETTINGS, plain_on_hypercorn=False)
    return partial(http_server._connection, None, HYPERCORN_CONFIG, http_server.WorkerContext(None), {},
                   lambda: None, SERVER.send_timeout, front, stream)


def _hypercorn_server(stream: trio.SocketStream) -> Any:
    wrapped = wrap_app(echo_app, HYPERCORN_CONFIG.wsgi_max_body_size, "asgi")
    return partial(http_server._connection, wrapped, HYPERCORN_CONFIG, http_server.WorkerContext(None), {},
                   lambda: None, SERVER.send_timeout, None, stream)


SERVERS = {"routerd": _our_server, "hypercorn": _hypercorn_server}


async def verdict(server: str, pieces: list[bytes]) -> Verdict:
    """Sends ``pieces`` one at a time (the server reading each before the next), then, if the
    connection is still open, ``FOLLOW_UP``."""
    server_end, client = _connected()
    reader = ResponseReader()
    closed = False
    follow_up = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(SERVERS[server](server_end))
        with trio.move_on_after(QUIET_WITHIN) as waited:
            for piece in pieces:
                sent = await _send(client, piece)
                await _quiet()
                closed = _read_available(client, reader)
                if closed or not sent:
                    closed = True
                    break
            answers = tuple(reader.answers)
            if not closed:
                reader.answers.clear()
                sent = await _send(client, FOLLOW_UP)
                await _quiet()
                closed = _read_available(client, reader) or not sent
                if reader.answers:
                    follow_up = reader.answers[-1]
                    answers += tuple(reader.answers[:-1])
        client.close()
        await _quiet()
        nursery.cancel_scope.cancel()  # hypercorn's connection lingers on its timers
    return Verdict(answers, not closed, follow_up, waited.cancelled_caught)


async def eof_verdict(server: str, data: bytes) -> Verdict:
    """Sends ``data``, shuts the write side, and reads until the server closes."""
    server_end, client = _connected()
    reader = ResponseReader()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(SERVERS[server](server_end))
        with trio.move_on_after(QUIET_WITHIN) as waited:
            if await _send(client, data):
                client.shutdown(socket.SHUT_WR)
            while not _read_available(client, reader):
                await trio.lowlevel.wait_readable(client)
        client.close()
        await _quiet()
        nursery.cancel_scope.cancel()  # hypercorn's connection lingers on its timers
    return Verdict(tuple(reader.answers), False, None, waited.cancelled_caught)


# -- the cases ---------------------------------------------------------------------------------
def _request(head: bytes, body: bytes = b"") -> bytes:
    return head.replace(b"\n", b"\r\n") + b"\r\n" + body


VALID = {
    "get_with_query": _request(b"GET /v1/models?limit=2&x=%20y HTTP/1.1\nHost: x\nUser-Agent: t/1\n"),
    "post_with_content_length": _request(b"POST /v1/chat HTTP/1.1\nhost: x\ncontent-length: 11\n", b'{"a": "bc"}'),
    "post_with_empty_body": _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: 0\n"),
    "chunked_with_extensions": _request(b"POST /c HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n",
                                        b'5;name=value\r\nhello\r\n6;quoted="a b"\r\n world\r\n0\r\n\r\n'),
    "chunked_with_trailers": _request(b"POST /c HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n",
                                      b"5\r\nhello\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n"),
    "head": _request(b"HEAD /health HTTP/1.1\nhost: x\n"),
    "pipelined_get_post_get": (_request(b"GET /1 HTTP/1.1\nhost: x\n")
                               + _request(b"POST /2 HTTP/1.1\nhost: x\ncontent-length: 2\n", b"hi")
                               + _request(b"GET /3?q HTTP/1.1\nhost: x\n")),
    "expect_100_continue": _request(b"POST /e HTTP/1.1\nhost: x\nexpect: 100-continue\ncontent-length: 3\n", b"abc"),
    "http10_without_keep_alive": _request(b"GET /10 HTTP/1.0\n"),
    "http10_with_keep_alive": _request(b"GET /10 HTTP/1.0\nconnection: keep-alive\n"),
    "http10_post": _request(b"POST /10 HTTP/1.0\ncontent-length: 4\n", b"1234"),
    "connection_close": _request(b"GET /c HTTP/1.1\nhost: x\nconnection: close\n"),
    "percent_encoded_path": _request(b"GET /a%20b/%2Fc/%C3%A9?q=%20&r=%2F HTTP/1.1\nhost: x\n"),
    "absolute_form_target": _request(b"GET http://x/a?b HTTP/1.1\nhost: x\n"),
    "options_asterisk": _request(b"OPTIONS * HTTP/1.1\nhost: x\n"),
    "mixed_case_names_and_empty_value": _request(b"GET / HTTP/1.1\nHOST: x\nX-Mixed-Case: v\nx-empty:\n"),
    "whitespace_around_values": _request(b"GET / HTTP/1.1\nHost:   x  \nx-tab:\tv\t\n"),
    "uppercase_chunked": _request(b"POST /c HTTP/1.1\nhost: x\ntransfer-encoding: CHUNKED\n", b"2\r\nhi\r\n0\r\n\r\n"),
    "head_just_under_max_header_bytes": _request(
        b"GET /big HTTP/1.1\nhost: x\n" + b"".join(b"x-big-%02d: %s\n" % (i, b"v" * 950) for i in range(16))),
}

#: Valid requests where routerd answers differently: bugs to fix (see the report in each reason).
VALID_BUGS: dict[str, str] = {}

#: Bytes h11 accepts (or answers otherwise) that routerd refuses with a 400 (431 for size) and the
#: connection's end, and why refusing is right.
STRICTER_THAN_H11 = {
    "content_length_with_transfer_encoding": (
        _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: 5\ntransfer-encoding: chunked\n", b"0\r\n\r\n"),
        400, "the classic smuggling pair; RFC 9112 section 6.3 lets a server reject it, and h11 even keeps "
             "the connection open after it (the RFC says close)"),
    "duplicate_identical_content_length": (
        _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: 5\ncontent-length: 5\n", b"hello"),
        400, "llhttp refuses any duplicate Content-Length; RFC 9112 section 6.3 allows rejecting it"),
    "content_length_list": (
        _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: 5, 5\n", b"hello"),
        400, "a list of lengths, same as duplicates; RFC 9112 section 6.3 allows rejecting it"),
    "obsolete_line_folding": (
        _request(b"GET /f HTTP/1.1\nhost: x\nx-a: 1\n  2\n"),
        400, "obs-fold: RFC 9112 section 5.2 lets a server reject it with 400; folding is a smuggling vector"),
    "bare_lf_line_ends": (
        b"GET /lf HTTP/1.1\nhost: x\n\n",
        400, "bare LF line ends: RFC 9112 section 2.2 allows a recipient to refuse them; they smuggle past "
             "proxies that split on CRLF only"),
    "http_2_0_request_line": (
        _request(b"GET / HTTP/2.0\nhost: x\n"),
        400, "HTTP/2.0 is not an HTTP/1 version; h11 serves any digit.digit as HTTP/1.1"),
    "http_1_2_request_line": (
        _request(b"GET / HTTP/1.2\nhost: x\n"),
        400, "no such HTTP/1 version; h11 serves it as HTTP/1.1"),
    "head_over_max_header_bytes_in_one_read": (
        _request(b"GET / HTTP/1.1\nhost: x\nx-big: " + b"a" * 17000 + b"\n"),
        431, "h11 checks max_incomplete_event_size only while a head is incomplete, so the same head is "
             "431 or 200 depending on how TCP cut it; routerd applies the limit whatever the reads"),
    "lowercase_method": (
        _request(b"get / HTTP/1.1\nhost: x\n"),
        400, "llhttp knows only the registered methods, exactly as written; routerd serves none other"),
    "unknown_method": (
        _request(b"FOO / HTTP/1.1\nhost: x\n"),
        400, "llhttp knows only the registered methods; routerd serves none other"),
    "chunk_size_overflowing_64_bits": (
        _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n", b"fffffffffffffffffff\r\nhello\r\n"),
        400, "a chunk size past 2**64 is nonsense; h11 waits for its data forever (until the timeout)"),
    "bare_lf_in_chunked_framing": (
        _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n", b"5\nhello\n0\n\n"),
        400, "bare LF in chunk framing (RFC 9112 section 7.1 says CRLF); h11 takes the size line and then "
             "waits, answering 400 only to the next bytes"),
    "transfer_coding_not_chunked": (
        _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: gzip\n"),
        400, "h11 says 501; RFC 9112 section 6.3 says a request whose final coding is not chunked MUST be "
             "answered 400 and the connection closed (both close)"),
    "upgrade_with_a_body": (
        _request(b"POST /p HTTP/1.1\nhost: x\nconnection: upgrade\nupgrade: foo\ncontent-length: 38\n",
                 b"GET /hidden HTTP/1.1\r\nhost: x\r\n\r\n"),
        400, "llhttp stops at the head of an Upgrade request and leaves its body unparsed: taken as the "
             "next request, it would be one that nothing in front of routerd saw; h11 reads it as a body"),
    "connect_method": (
        _request(b"CONNECT example.com:443 HTTP/1.1\nhost: example.com:443\n"),
        400, "routerd is not a tunnel; llhttp hands over the connection after CONNECT's head"),
    "chunked_twice": (
        _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked, chunked\n", b"0\r\n\r\n"),
        400, "h11 says 501; RFC 9112 section 7 forbids chunked twice, so the framing is unknown: 400 and close"),
    "two_transfer_encoding_lines": (
        _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked\ntransfer-encoding: chunked\n",
                 b"0\r\n\r\n"),
        400, "the same as chunked twice (h11 says 501)"),
}

MALFORMED = {
    "duplicate_differing_content_length": _request(
        b"POST /p HTTP/1.1\nhost: x\ncontent-length: 5\ncontent-length: 6\n", b"hello!"),
    "content_length_not_a_number": _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: 5x\n", b"hello"),
    "content_length_negative": _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: -1\n"),
    "content_length_with_plus": _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: +5\n", b"hello"),
    "chunk_size_not_hex": _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n",
                                   b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk_data_longer_than_its_size": _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n",
                                                b"3\r\nhello\r\n0\r\n\r\n"),
    "missing_host_in_http11": _request(b"GET / HTTP/1.1\n"),
    "two_host_fields": _request(b"GET / HTTP/1.1\nhost: x\nhost: y\n"),
    "request_line_without_space": _request(b"GET/ HTTP/1.1\nhost: x\n"),
    "lowercase_version": _request(b"GET / http/1.1\nhost: x\n"),
    "space_in_header_name": _request(b"GET / HTTP/1.1\nhost: x\nx y: 1\n"),
    "space_before_colon": _request(b"GET / HTTP/1.1\nhost: x\nx-a : 1\n"),
    "nul_in_header_value": _request(b"GET / HTTP/1.1\nhost: x\nx-a: a\x00b\n"),
    "cr_in_header_value": _request(b"GET / HTTP/1.1\nhost: x\nx-a: a\rb\n"),
    "non_ascii_target": _request(b"GET /caf\xc3\xa9 HTTP/1.1\nhost: x\n"),
    "gzip_then_chunked": _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: gzip, chunked\n", b"0\r\n\r\n"),
    "body_end_and_garbage_in_one_read": _request(b"POST /p HTTP/1.1\nhost: x\ncontent-length: 3\n",
                                                 b"abcNOT A REQUEST\r\n\r\n"),
}

MALFORMED_BUGS: dict[str, str] = {}

#: Bytes routerd takes where h11 refuses them, because the RFC asks a server to.
LENIENT_AS_RFC_ASKS = {
    "blank_line_before_request_line": (
        b"\r\n" + _request(b"GET /lead HTTP/1.1\nhost: x\n"),
        "RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before a request line "
        "(llhttp does; h11 answers 400)"),
}

#: Valid requests that routerd answers differently only when they come in pieces: bugs.
CUT_BUGS: dict[str, str] = {}

#: Malformed requests that routerd answers differently when they come in pieces: bugs.
MALFORMED_CUT_BUGS: dict[str, str] = {}
#: Bugs that need the bytes in one read.
ONLY_IN_ONE_READ = {"body_end_and_garbage_in_one_read"}


def _cut(data: bytes) -> list[bytes]:
    """``data`` one byte at a time (a head near the size limit: 256 bytes at a time, for speed)."""
    size = 1 if len(data) <= 1024 else 256
    return [data[i:i + size] for i in range(0, len(data), size)]


def _comparable(verdict: Verdict) -> Verdict:
    """The verdict less what h11 rewrites without changing the meaning: Transfer-Encoding's
    value lowercased."""
    def answer(one: Answer | None) -> Answer | None:
        if one is None or one.seen is None:
            return one
        seen = dict(one.seen)
        seen["headers"] = [[name, value.lower() if name == "transfer-encoding" else value]
                           for name, value in seen["headers"]]
        return Answer(one.status, seen)
    return attrs.evolve(verdict, answers=tuple(answer(one) for one in verdict.answers),
                        follow_up=answer(verdict.follow_up))


async def both(pieces: list[bytes]) -> tuple[Verdict, Verdict]:
    ours, theirs = await verdict("routerd", pieces), await verdict("hypercorn", pieces)
    return _comparable(ours), _comparable(theirs)


def _params(cases: dict[str, bytes], bugs: dict[str, str]) -> list[Any]:
    return [pytest.param(data, id=name, marks=[pytest.mark.xfail(strict=True, reason=bugs[name])]
                         if name in bugs else []) for name, data in cases.items()]


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data", _params(VALID, VALID_BUGS))
async def test_a_valid_request_gets_hypercorns_verdict(data: bytes) -> None:
    ours, theirs = await both([data])
    assert theirs.answers and not theirs.hung, f"hypercorn did not serve a valid request: {theirs}"
    assert ours == theirs


@pytest.mark.parametrize("data", _params(VALID, {**VALID_BUGS, **CUT_BUGS}))
async def test_a_valid_request_cut_at_every_byte_gets_the_verdict_it_gets_whole(data: bytes) -> None:
    ours_whole, theirs_whole = await both([data])
    ours_cut, theirs_cut = await both(_cut(data))
    assert theirs_cut == theirs_whole  # the harness's own check: h11 does not care how bytes come
    assert ours_cut == ours_whole
    assert ours_cut == theirs_whole


async def test_valid_requests_then_a_hang_up_are_answered_as_by_hypercorn() -> None:
    """The client sends whole requests and shuts its write side (``printf ... | nc -N``): hypercorn
    answers them; routerd must too, every time (tried 8 times each: its answer was a coin toss)."""
    for name, data in VALID.items():
        theirs = await eof_verdict("hypercorn", data)
        assert theirs.answers and not theirs.hung, name
        for _ in range(8):
            assert _comparable(await eof_verdict("routerd", data)) == _comparable(theirs), name


@pytest.mark.parametrize("data", _params(MALFORMED, MALFORMED_BUGS))
async def test_malformed_bytes_get_hypercorns_verdict(data: bytes) -> None:
    ours, theirs = await both([data])
    assert ours == theirs
    assert _comparable(await eof_verdict("routerd", data)) == _comparable(await eof_verdict("hypercorn", data))


@pytest.mark.parametrize("data", _params(MALFORMED, {**{name: reason for name, reason in MALFORMED_BUGS.items()
                                                        if name not in ONLY_IN_ONE_READ}, **MALFORMED_CUT_BUGS}))
async def test_malformed_bytes_cut_at_every_byte_get_hypercorns_verdict(data: bytes) -> None:
    ours, theirs = await both(_cut(data))
    assert ours == theirs


@pytest.mark.parametrize(("data", "status"), [pytest.param(data, status, id=name)
                                              for name, (data, status, _) in STRICTER_THAN_H11.items()])
async def test_where_routerd_is_stricter_than_h11_it_refuses_and_closes(data: bytes, status: int) -> None:
    ours, theirs = await both([data])
    assert ours == Verdict((Answer(status, None),), open_after=False, follow_up=None)
    assert theirs != ours, "h11 refuses these bytes the same way now: the entry is no longer needed"
    assert await eof_verdict("routerd", data) == Verdict((Answer(status, None),), False, None)


@pytest.mark.parametrize("data", [pytest.param(data, id=name) for name, (data, _) in LENIENT_AS_RFC_ASKS.items()])
async def test_where_routerd_is_lenient_as_the_rfc_asks_it_serves_the_request(data: bytes) -> None:
    ours, theirs = await both([data])
    assert [answer.status for answer in ours.answers] == [200] and ours.open_after
    assert theirs != ours, "h11 takes these bytes too now: the entry is no longer needed"


async def test_the_verdicts_tell_a_broken_handler_from_hypercorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: routerd's parser made to lose a body's last byte, or to close
    after every answer, no longer gets hypercorn's verdict."""
    from routerd.front import h1

    data = VALID["pipelined_get_post_get"]
    ours, theirs = await both([data])
    assert ours == theirs
    on_body = h1.RequestParser.on_body
    monkeypatch.setattr(h1.RequestParser, "on_body", lambda self, body: on_body(self, body[:-1]))
    assert (await both([data]))[0] != theirs
    monkeypatch.undo()
    init = h1.RequestHead.__init__

    def closing(self: Any, *args: Any) -> None:
        init(self, *args)
        self.keep_alive = False
    monkeypatch.setattr(h1.RequestHead, "__init__", closing)
    assert (await both([VALID["get_with_query"]]))[0] != (await both([VALID["get_with_query"]]))[1]


async def test_a_connection_refusing_a_bad_chunk_mid_body_ends_even_before_the_client_leaves() -> None:
    server_end, client = _connected()
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_our_server(server_end))
            await _send(client, _request(b"POST /p HTTP/1.1\nhost: x\ntransfer-encoding: chunked\n", b"5\r\nhello\r\n"))
            await _quiet()
            await _send(client, b"zz\r\n")
            await _quiet()
            reader = ResponseReader()
            assert _read_available(client, reader), "still open after a bad chunk size"
            assert [answer.status for answer in reader.answers] == [400]
    client.close()
