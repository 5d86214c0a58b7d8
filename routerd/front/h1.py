"""HTTP/1.1 for the front, as bytes: requests parsed in, response heads and framing out.

Owns the wire format of one client connection on the server side: parsing what the client sends
with llhttp (``httptools``, the parser of Node.js and uvicorn) into request heads, body pieces and
ends; the limits on a head (bytes) and the refusals of anything llhttp or RFC 9112 calls
malformed (a Content-Length beside Transfer-Encoding, duplicate or bad lengths, bad chunk sizes,
obsolete line folding, a version other than 1.0/1.1); whether the connection may serve another
request; and encoding response heads and chunks. It does no I/O and knows nothing of routes,
keys or models: ``h1_connection`` feeds it what the socket reads and writes what it encodes.

Being lean is not being lenient: a malformed request is a 400 (431 for a head over the limit,
501 for a transfer coding other than chunked) and the connection's end, never a guess.
``tests/test_h1_differential.py`` holds the verdicts to hypercorn's (h11's) on the same bytes.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from http import HTTPStatus

import httptools

#: Parsed pieces of the client's stream, in order: a ``RequestHead``, then zero or more body
#: ``bytes``, then ``END_OF_REQUEST``.
END_OF_REQUEST = None


class RequestHead:
    """One request's line and header fields, and what they say about its framing."""

    __slots__ = ("method", "target", "path", "query", "headers", "http_version", "keep_alive",
                 "expect_continue", "content_length", "chunked")

    def __init__(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], http_version: str,
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition(b"?")
        self.path = urllib.parse.unquote(path.decode("latin-1"))
        self.query = query
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.expect_continue = False
        self.content_length: int | None = None
        self.chunked = False
        for name, value in headers:
            if name == b"content-length":
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = True  # llhttp has refused any coding list not ending in chunked
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = http_version == "1.1"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class BadRequest(Exception):
    """The client's bytes are not an acceptable HTTP/1.1 request: answer ``status``, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Upgrade(Exception):
    """The client sent HTTP/2's connection preface on a plain connection (h2c, prior knowledge)."""


class RequestParser:
    """Parses the requests a client sends on one connection, pipelined ones included.

    ``feed`` what the socket reads; it returns the pieces parsed from it, in order (see
    ``END_OF_REQUEST``). Malformed bytes, or a head over ``max_head_bytes``, set ``error``
    (the pieces before them are still returned: a request that came whole before the bad bytes
    is answered first); after that the connection is done.
    """

    def __init__(self, max_head_bytes: int) -> None:
        self._max_head_bytes = max_head_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._pieces: list[RequestHead | bytes | None] = []
        self._in_head = False  # a request line has begun and its head has not ended
        self._head_bytes = 0  # the head's bytes parsed so far (request line, whole fields)
        self._raw_head_bytes = 0  # bytes of reads that began inside an unfinished head
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        #: Why the bytes fed are refused, once they are.
        self.error: BadRequest | None = None

    @property
    def between_requests(self) -> bool:
        """No request's head is partly parsed."""
        return not self._in_head

    def feed(self, data: bytes) -> list[RequestHead | bytes | None]:
        pieces = self._pieces = []
        if self.error is not None:
            return pieces
        if self._in_head:
            self._raw_head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # An Upgrade request (h2c, WebSocket) or CONNECT: llhttp stops at the end of its
            # head, leaving any body unparsed. Without a body it is served as plain HTTP/1.1
            # (RFC 9110 lets a server ignore Upgrade) and the bytes after it are the next
            # request's; with one, those bytes would pass for a request nobody in front saw.
            head = next((piece for piece in reversed(pieces) if isinstance(piece, RequestHead)), None)
            if head is None or head.has_body or head.method == "CONNECT":
                self.error = BadRequest(400, "an Upgrade request with a body, or CONNECT, is not served here")
                while pieces and not isinstance(pieces[-1], RequestHead):
                    pieces.pop()
                if pieces:
                    pieces.pop()
                return pieces
            offset = int(upgrade.args[0])
            self._parser = httptools.HttpRequestParser(self)
            rest = data[offset:]
            if rest:
                pieces.extend(self.feed(rest))
                self._pieces = pieces
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, BadRequest):  # raised by a callback below
                self.error = exc.__context__
            elif "PRI" in str(exc) and not pieces:  # llhttp stops at HTTP/2's preface, "PRI * HTTP/2.0"
                raise Upgrade() from None
            else:
                self.error = BadRequest(400, f"malformed request: {exc}")
        if self._in_head and max(self._head_bytes, self._raw_head_bytes) > self._max_head_bytes:
            self.error = _head_too_large(self._max_head_bytes)
        return pieces

    # llhttp's callbacks
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = self._raw_head_bytes = 0
        self._target = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a chunked body's trailer fields: not the request's headers
            return
        self._headers.append((name.lower(), value.rstrip(b" \t")))
        self._head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        parser = self._parser
        if self._head_bytes > self._max_head_bytes:
            raise _head_too_large(self._max_head_bytes)
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest(400, f"HTTP/{version} is not spoken here (HTTP/1.1 or HTTP/1.0)")
        hosts = 0
        codings: list[bytes] = []
        for name, value in self._headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                codings.append(value)
        if hosts > 1 or (version == "1.1" and not hosts):
            raise BadRequest(400, "an HTTP/1.1 request needs one Host header (RFC 9112, section 3.2)")
        if codings:
            tokens = [token.strip(b" \t").lower() for token in b",".join(codings).split(b",")]
            if tokens[-1] != b"chunked" or tokens.count(b"chunked") > 1:  # RFC 9112, sections 6.3 and 7
                raise BadRequest(400, "the request's length cannot be known: Transfer-Encoding must end in "
                                      "chunked, once")
            if len(tokens) > 1:
                raise BadRequest(501, f"transfer coding {tokens[0].decode('latin-1')[:40]!r} is not supported "
                                      "(only chunked)")
        self._in_head = False
        self._pieces.append(RequestHead(parser.get_method().decode("ascii"), self._target, self._headers,
                                        version, parser.should_keep_alive()))

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        self._pieces.append(END_OF_REQUEST)


def _head_too_large(limit: int) -> BadRequest:
    return BadRequest(431, f"request head longer than {limit} bytes (server.max_header_bytes)")


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus}


class _Clock:
    """The Date header, made once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._line = b""

    def date_line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode() + b"\r\n"
        return self._line


_clock = _Clock()


def encode_head(status: int, headers: list[tuple[bytes, bytes]], extra: bytes = b"") -> bytes:
    """A response's status line and header lines, ending in the blank line; ``extra`` is more
    header lines routerd adds (framing, ``connection: close``), already encoded."""
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
    parts = [line]
    for name, value in headers:
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
            raise ValueError(f"a line break inside the response header {name[:40]!r}")
        parts.append(name + b": " + value + b"\r\n")
    parts.append(_clock.date_line())
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of the chunked transfer coding (empty data encodes nothing)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"

_ERROR_TYPES = {400: "bad_request", 408: "request_timeout", 413: "request_too_large", 431: "headers_too_large",
                501: "not_implemented"}


def error_response(status: int, message: str) -> bytes:
    """A whole answer in the OpenAI error shape that ends the connection (for errors the
    connection itself finds, before any handler: malformed bytes, a head too large)."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "code": _ERROR_TYPES.get(status, "bad_request")}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return encode_head(status, headers, b"connection: close\r\n") + body
