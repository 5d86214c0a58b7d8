"""The upstream client's HTTP/1.1 codec, without sockets.

It replaced h11 on the relay path, so the first tests hold it to h11's answers: the same
responses, cut into pieces at every possible point (as a socket may deliver them), must give
the same status, headers, body and keep-alive verdict. The rest pin what h11 refused (malformed
framing, early closes) and what a request must never carry (line breaks that would split it).
"""

from __future__ import annotations

import random

import h11
import pytest

from routerd.backends.http1 import MAX_HEAD_BYTES, ProtocolError, ResponseReader, encode_request

LLAMA_JSON = (b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: \r\nContent-Length: 26\r\n"
              b"Content-Type: application/json; charset=utf-8\r\nKeep-Alive: timeout=5, max=100\r\n"
              b"Server: llama.cpp\r\n\r\n" + b'{"tokens":[1,2,3,4,5,6,7]}')
SSE_EVENTS = (b'data: {"content":"Hi"}\n\n', b'data: {"content":" there"}\n\n', b"data: [DONE]\n\n")
LLAMA_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nServer: llama.cpp\r\n"
             b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
             + b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in SSE_EVENTS)
             + b"0\r\n\r\n")
VALID = {
    "llama-server JSON": ("POST", LLAMA_JSON),
    "llama-server SSE": ("POST", LLAMA_SSE),
    "chunk extensions and trailers": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                             b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\n"
                                             b"Checksum: abc\r\nMore: x\r\n\r\n"),
    "interim answers first": ("POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                      + LLAMA_JSON),
    "no content": ("DELETE", b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"),
    "not modified": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    "head request": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    "empty body": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    "connection close": ("GET", b"HTTP/1.1 503 Service Unavailable\r\nConnection: keep-alive, Close\r\n"
                                b"Content-Length: 5\r\n\r\nbusy!"),
    "HTTP/1.0 with a length": ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"),
    "body to the close": ("GET", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, until EOF"),
    "no reason phrase": ("GET", b"HTTP/1.1 404 \r\nContent-Length: 2\r\n\r\nno"),
    "odd spacing and case": ("GET", b"HTTP/1.1 200 OK\r\nCONTENT-length:   4  \r\nX-Empty:\r\n\r\nbody"),
    "repeated headers": ("GET", b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\n"
                                b"Set-Cookie: b=2\r\n\r\nok"),
    "bare line feeds": ("GET", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
}


def with_h11(method: str, wire: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(wire)
    closes = b"until EOF" in wire
    if closes:
        conn.receive_data(b"")  # a body that runs to the close ends with it
    while type(head := conn.next_event()) is h11.InformationalResponse:
        pass
    assert type(head) is h11.Response
    body = b""
    while type(event := conn.next_event()) is h11.Data:
        body += event.data
    assert type(event) is h11.EndOfMessage, event
    reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE and not closes
    return head.status_code, [(bytes(k), bytes(v)) for k, v in head.headers], body, reusable


def with_ours(method: str, pieces: list[bytes], close: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    reader = ResponseReader()
    reader.expect(method)
    feed = iter([*pieces, *([b""] if close else [])])
    while (head := reader.head()) is None:
        reader.feed(next(feed))
    body = reader.body()
    while not reader.done:
        reader.feed(next(feed))
        body += reader.body()
    assert list(feed) in ([], [b""]), "read past the end of the response"
    return head.status, head.headers, body, reader.reusable


def cut(wire: bytes, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(1, 8))))
    return [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]


@pytest.mark.parametrize("case", VALID)
def test_reads_what_h11_reads_however_the_bytes_are_cut(case):
    method, wire = VALID[case]
    close = b"until EOF" in wire
    expected = with_h11(method, wire)
    assert with_ours(method, [wire], close) == expected
    assert with_ours(method, [bytes([b]) for b in wire], close) == expected  # one byte per read
    rng = random.Random(case)
    for _ in range(50):
        assert with_ours(method, cut(wire, rng), close) == expected


def test_responses_follow_one_another_on_a_kept_connection():
    reader = ResponseReader()
    for _ in range(3):
        reader.expect("POST")
        reader.feed(LLAMA_SSE)
        assert reader.head().status == 200
        assert reader.body().count(b"data: ") == 3 and reader.done and reader.reusable


def test_a_server_that_says_more_than_one_answer_leaves_the_connection_unusable():
    reader = ResponseReader()
    reader.expect("GET")
    reader.feed(LLAMA_JSON + b"HTTP/1.1 200 OK\r\n")  # unasked-for bytes: out of step
    reader.head()
    reader.body()
    assert reader.done and not reader.reusable
    with pytest.raises(ProtocolError):
        reader.expect("GET")


def test_the_body_arrives_in_the_pieces_that_are_here_not_one_chunk_at_a_time():
    reader = ResponseReader()
    reader.expect("POST")
    head, _, body = LLAMA_SSE.partition(b"\r\n\r\n")
    reader.feed(head + b"\r\n\r\n" + body[:60])
    reader.head()
    first = reader.body()  # the first event whole and the second's start
    assert first.startswith(b'data: {"content":"Hi"}\n\ndata: ')
    reader.feed(body[60:])
    assert first + reader.body() == b"".join(SSE_EVENTS) and reader.done


MALFORMED = {
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "bad status code": b"HTTP/1.1 2000 OK\r\n\r\n",
    "HTTP/2 preface": b"HTTP/2 200\r\n\r\n",
    "header without a colon": b"HTTP/1.1 200 OK\r\nContent-Length 5\r\n\r\nhello",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    "fold with nothing to fold": b"HTTP/1.1 200 OK\r\n continued\r\n\r\n",
    "conflicting lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "chunk size not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk longer than said": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    "protocol switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_response_is_refused_where_h11_refuses_it(case):
    wire = MALFORMED[case]
    with pytest.raises(h11.RemoteProtocolError):
        with_h11("GET", wire)
    with pytest.raises(ProtocolError):
        with_ours("GET", [wire], close=True)


@pytest.mark.parametrize("wire", [b"", b"HTTP/1.1 200 OK\r\nContent-Le",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
                                  LLAMA_SSE[:-5], LLAMA_SSE[:-2]],
                         ids=["nothing", "mid-head", "mid-body", "mid-chunk", "mid-trailers"])
def test_a_close_before_the_end_is_an_error_after_what_did_arrive(wire):
    reader = ResponseReader()
    reader.expect("POST")
    reader.feed(wire)
    reader.feed(b"")
    with pytest.raises(ProtocolError, match="closed the connection"):
        assert reader.head() is not None
        reader.body()  # what arrived (if any) comes first
        reader.body()


def test_an_endless_head_is_refused_not_buffered():
    reader = ResponseReader()
    reader.expect("GET")
    reader.feed(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * MAX_HEAD_BYTES)
    with pytest.raises(ProtocolError, match="longer than"):
        reader.head()


def test_a_request_head_is_written_as_given():
    head = encode_request("POST", "/v1/chat/completions?x=1",
                          [(b"host", b"127.0.0.1:8080"), (b"content-length", b"2"), (b"x-a", b"b c")])
    assert head == (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n"
                    b"content-length: 2\r\nx-a: b c\r\n\r\n")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"{}")
    request = conn.next_event()
    assert request.target == b"/v1/chat/completions?x=1" and (b"x-a", b"b c") in request.headers


@pytest.mark.parametrize(("method", "target", "headers"), [
    ("POST", "/a b", []), ("POST", "/a\r\nX-Injected: 1", []), ("POST", "", []), ("GE T", "/", []),
    ("POST", "/", [(b"x-a", b"1\r\nx-injected: 1")]), ("POST", "/", [(b"x-a\n", b"1")]),
])
def test_a_request_that_would_split_is_refused(method, target, headers):
    with pytest.raises(ValueError):
        encode_request(method, target, headers)


# -- chunks passed through as they came (the proxy's relay when both sides are chunked) ---------
CHUNKED = {case: wire for case, (method, wire) in VALID.items() if b"Transfer-Encoding: chunked" in wire}


def whole_chunks_only(framed: bytes) -> bool:
    """Whether ``framed`` is a run of whole chunks (the last chunk and trailers included):
    decoded from its start by size lines, it ends exactly at a chunk's end."""
    at = 0
    while at < len(framed):
        line_end = framed.index(b"\r\n", at)
        size = int(framed[at:line_end].split(b";")[0], 16)
        if size == 0:  # the last chunk: then trailer lines, if any, and the blank line
            rest = framed[line_end + 2:]
            return rest == b"\r\n" or (rest.endswith(b"\r\n\r\n") and rest.count(b"\r\n\r\n") == 1)
        at = line_end + 2 + size
        if framed[at:at + 2] != b"\r\n":
            return False
        at += 2
    return at == len(framed)


def passed_through(pieces: list[bytes]) -> tuple[bytes, list[bytes], list[bytes]]:
    """What ``whole_chunks`` hands on, fed ``pieces`` one read at a time: the bytes, the data,
    and each call's bytes."""
    reader = ResponseReader()
    reader.expect("GET")
    feed = iter(pieces)
    while reader.head() is None:
        reader.feed(next(feed))
    assert reader.chunked
    calls, data = [], []
    while True:
        framed, carried = reader.whole_chunks()
        calls.append(framed)
        data += carried
        if reader.done:
            break
        reader.feed(next(feed))
    assert list(feed) == [], "read past the end of the response"
    return b"".join(calls), data, calls


@pytest.mark.parametrize("case", CHUNKED)
def test_whole_chunks_pass_on_the_body_byte_for_byte_and_carry_what_h11_decodes(case):
    wire = CHUNKED[case]
    body_on_the_wire = wire[wire.index(b"\r\n\r\n") + 4:]
    decoded = with_h11("GET", wire)[2]
    rng = random.Random(case)
    for pieces in ([wire], [bytes([b]) for b in wire], *(cut(wire, rng) for _ in range(50))):
        framed, data, calls = passed_through(pieces)
        assert framed == body_on_the_wire and b"".join(data) == decoded
        for call in calls:  # each hand-over is whole chunks: a fresh decoder takes it with nothing left
            assert call == b"" or whole_chunks_only(call)


def test_a_chunk_is_handed_on_only_once_it_is_whole():
    reader = ResponseReader()
    reader.expect("POST")
    head_end = LLAMA_SSE.index(b"\r\n\r\n") + 4
    reader.feed(LLAMA_SSE[:head_end + 10])  # the head and part of the first chunk
    assert reader.head() is not None
    assert reader.whole_chunks() == (b"", [])
    reader.feed(LLAMA_SSE[head_end + 10:])
    framed, data = reader.whole_chunks()
    assert data == list(SSE_EVENTS) and reader.done and reader.reusable


@pytest.mark.parametrize("wire", [LLAMA_SSE.replace(b"\r\n0\r\n", b"\r\nzz\r\n"),
                                  LLAMA_SSE.replace(b'"Hi"}\n\n\r\n', b'"Hi"}\n\nXY')],
                         ids=["bad size", "data longer than its size"])
def test_bad_framing_is_refused_when_passing_chunks_through(wire):
    with pytest.raises(ProtocolError):
        passed_through([wire])


def test_a_close_mid_chunk_is_an_error_when_passing_chunks_through():
    reader = ResponseReader()
    reader.expect("GET")
    reader.feed(LLAMA_SSE[:-8])
    reader.feed(b"")
    assert reader.head() is not None
    framed, _ = reader.whole_chunks()  # what was whole is handed on first
    assert framed
    with pytest.raises(ProtocolError):
        reader.whole_chunks()
