"""HTTP/1.1 for the upstream client: requests out, responses in, as bytes (no sockets here).

Owns the wire format of one client connection: encoding a request's head, and parsing the
server's answers (status line, headers, a body framed by Content-Length, by the chunked
transfer coding with its extensions and trailers, or by the connection's close; 1xx interim
answers; bodiless statuses and HEAD; whether the connection may be reused). It does no I/O and
knows nothing of pools, timeouts, models or clients: ``upstream`` feeds it what the socket reads.

Why not h11: it is general (both roles, an event object per piece, state machines for both
sides) and cost ~0.15 ms of CPU per proxied request here, a seventh of routerd's whole cost;
this parser costs ~0.01 ms. Being lean is not being lenient: anything malformed raises
ProtocolError and the connection is dropped, never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: A response head longer than this is refused (h11's default limit as well).
MAX_HEAD_BYTES = 16 * 1024
#: A chunk-size line (size and extensions) longer than this is refused.
MAX_CHUNK_LINE_BYTES = 4096

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_BAD_TARGET = re.compile(rb"[\x00- \x7f]")  # controls and spaces

# What the reader is waiting for.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ProtocolError(Exception):
    """The server's bytes are not a valid HTTP/1.1 response, or it closed the connection early."""


def encode_request(method: str, target: str, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A request's head: request line and header lines, ending in the blank line.

    ``target`` is sent byte for byte as latin-1 (how ASGI gives a raw query string). The names
    and values come from checked places (the client's request as the front parsed it, routerd's
    config), but a CR or LF in any of them would split the request: the whole head is checked
    once for line breaks where none belong (ValueError).
    """
    request_line = b"%s %s HTTP/1.1" % (method.encode("ascii"), target.encode("latin-1"))
    target_bytes = (len(method) + 1, len(request_line) - len(b" HTTP/1.1"))
    if (not target or not _TOKEN.fullmatch(request_line[:len(method)])
            or _BAD_TARGET.search(request_line, *target_bytes)):
        raise ValueError(f"not a valid request line: {request_line[:80]!r}")
    lines = [request_line, *(name + b": " + value for name, value in headers)]
    head = b"\r\n".join(lines)
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise ValueError(f"a line break inside a header of the request to {target!r}")
    return head + b"\r\n\r\n"


class Head:
    """A response's status line and headers (names lower-cased, in order, repeats kept)."""

    __slots__ = ("status", "reason", "headers", "http_10")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], http_10: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http_10 = http_10

    def values(self, name: bytes) -> list[bytes]:
        """Every comma-separated element of the headers called ``name``, lower-cased."""
        return [item.strip().lower() for key, value in self.headers if key == name
                for item in value.split(b",") if item.strip()]


class ResponseReader:
    """Parses the responses to the requests sent on one connection, one after another.

    Call ``expect(method)`` as each request goes out, ``feed`` what the socket reads (``b""``
    when it closes), then ``head()`` until it returns the final head, then ``body()`` until
    ``done``. Once ``done``, ``reusable`` says whether the next request may use the connection.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._state = _DONE
        self._left = 0  # bytes of body (content-length) or of the current chunk still to come
        self._head_request = False
        self._keep_alive = True
        self.done = True

    @property
    def reusable(self) -> bool:
        """The last response was read whole and neither side asked to close."""
        return self.done and self._keep_alive and not self._buffer and not self._eof

    def expect(self, method: str) -> None:
        """A request was sent: parse the answer to it next."""
        if not self.reusable:
            raise ProtocolError("the connection is not ready for another request")
        self._state, self.done = _HEAD, False
        self._head_request = method == "HEAD"

    def feed(self, data: bytes | bytearray) -> None:
        """Bytes read from the socket; ``b""`` when the server closed its side."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def head(self) -> Head | None:
        """The final response head once it is all here (interim 1xx answers are skipped), else
        None: feed more."""
        while self._state == _HEAD:
            match = _END_OF_HEAD.search(self._buffer)
            if match is None:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError(f"response head longer than {MAX_HEAD_BYTES} bytes")
                if self._eof:
                    raise ProtocolError("the server closed the connection without answering" if not self._buffer
                                        else "the server closed the connection in the middle of a response head")
                return None
            raw = bytes(self._buffer[:match.start()])
            del self._buffer[:match.end()]
            head = _parse_head(raw)
            if head.status < 200:
                if head.status == 101:
                    raise ProtocolError("the server switched protocols, which was not asked for")
                continue  # 100 Continue, 103 Early Hints: the real answer follows
            self._frame_body(head)
            return head
        raise ProtocolError("no response head is awaited")

    def body(self) -> bytes:
        """All of the body that the bytes fed so far hold (b"" if none yet: feed more, unless
        ``done``). Raises ProtocolError on bad framing or a close before the end."""
        out: list[bytes] = []
        buffer = self._buffer
        while True:
            state = self._state
            if state == _CHUNK_DATA or state == _LENGTH:
                if not buffer:
                    break
                taken = min(self._left, len(buffer))
                out.append(bytes(buffer[:taken]))
                del buffer[:taken]
                self._left -= taken
                if self._left == 0:
                    self._state = _CHUNK_END if state == _CHUNK_DATA else self._finish()
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE_BYTES:
                        raise ProtocolError("chunk-size line too long")
                    break
                size = bytes(buffer[:end]).split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise ProtocolError(f"invalid chunk size {size[:20]!r}")
                del buffer[:end + 2]
                self._left = int(size, 16)
                self._state = _CHUNK_DATA if self._left else _TRAILERS
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise ProtocolError("chunk data longer than its size says")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:  # trailer fields, if any, then a blank line: dropped
                if buffer[:2] == b"\r\n":
                    del buffer[:2]
                else:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buffer) > MAX_HEAD_BYTES:
                            raise ProtocolError("trailers too long")
                        break
                    del buffer[:end + 4]
                self._state = self._finish()
            elif state == _UNTIL_CLOSE:
                if buffer:
                    out.append(bytes(buffer))
                    buffer.clear()
                if self._eof:
                    self._state = self._finish()
                break
            else:
                break
        if self._eof and self._state != _DONE:  # nothing more can come
            if out:  # hand over what did arrive first; the next call reports the break
                return b"".join(out)
            raise ProtocolError("the server closed the connection before the end of the response body")
        return b"".join(out)

    @property
    def chunked(self) -> bool:
        """The body of the response being read is chunked and the reader stands at a chunk's
        start (as it does before anything of the body is read: ``whole_chunks`` may then pass
        it on as it is, if ``body`` is never called for it)."""
        return self._state == _CHUNK_SIZE and not self.done

    def whole_chunks(self) -> tuple[bytes, list[bytes]]:
        """The complete chunks the bytes fed so far hold, exactly as they came (size lines,
        extensions, the last chunk and trailers included), and the data they carry. A chunk
        still arriving stays for the next call, so what is returned can be passed on as it is
        and ends on a chunk's boundary. Only for a chunked body, and only if ``body`` has not
        read from it; raises ProtocolError on bad framing or a close before the end."""
        buffer = self._buffer
        position = 0
        data: list[bytes] = []
        while self._state == _CHUNK_SIZE:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                if len(buffer) - position > MAX_CHUNK_LINE_BYTES:
                    raise ProtocolError("chunk-size line too long")
                break
            size = bytes(buffer[position:line_end]).split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise ProtocolError(f"invalid chunk size {size[:20]!r}")
            start = line_end + 2
            length = int(size, 16)
            if length == 0:  # the last chunk: then trailer fields, if any, and a blank line
                if buffer[start:start + 2] == b"\r\n":
                    position = start + 2
                else:
                    trailers_end = buffer.find(b"\r\n\r\n", start)
                    if trailers_end < 0:
                        if len(buffer) - start > MAX_HEAD_BYTES:
                            raise ProtocolError("trailers too long")
                        break
                    position = trailers_end + 4
                self._state = self._finish()
                break
            stop = start + length
            if len(buffer) < stop + 2:
                break
            if buffer[stop:stop + 2] != b"\r\n":
                raise ProtocolError("chunk data longer than its size says")
            data.append(bytes(buffer[start:stop]))
            position = stop + 2
        framed = bytes(buffer[:position])
        del buffer[:position]
        if self._eof and self._state != _DONE and not framed:
            raise ProtocolError("the server closed the connection before the end of the response body")
        return framed, data

    def _frame_body(self, head: Head) -> None:
        """Decide how this response's body ends (RFC 9112, section 6.3)."""
        connection = head.values(b"connection")
        self._keep_alive = not head.http_10 and b"close" not in connection
        if self._head_request or head.status in (204, 304):
            self._state = self._finish()
            return
        codings = head.values(b"transfer-encoding")
        if codings:
            if head.values(b"content-length"):  # a sign of request smuggling: not reused
                self._keep_alive = False
            if codings[-1] == b"chunked":
                self._state = _CHUNK_SIZE
            else:  # the body runs to the close
                self._state, self._keep_alive = _UNTIL_CLOSE, False
            return
        lengths = head.values(b"content-length")
        if lengths:
            if len(set(lengths)) > 1 or not _DIGITS.fullmatch(lengths[0]):
                raise ProtocolError(f"invalid Content-Length {b', '.join(lengths)[:40]!r}")
            self._left = int(lengths[0])
            self._state = _LENGTH if self._left else self._finish()
            return
        self._state, self._keep_alive = _UNTIL_CLOSE, False

    def _finish(self) -> int:
        self.done = True
        return _DONE


def _parse_head(raw: bytes) -> Head:
    status_line, *lines = raw.split(b"\n")
    match = _STATUS_LINE.fullmatch(status_line.rstrip(b"\r"))
    if match is None:
        raise ProtocolError(f"invalid status line {status_line[:60]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the previous value
            if not headers:
                raise ProtocolError("a folded header line with no header before it")
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProtocolError(f"invalid header line {line[:60]!r}")
        if b"\x00" in value:
            raise ProtocolError(f"invalid value in header {name.decode()!r}")
        headers.append((name.lower(), value.strip(b" \t")))
    return Head(int(match[2]), match[3] or b"", headers, match[1] == b"0")
