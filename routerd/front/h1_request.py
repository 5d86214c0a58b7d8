"""One request on routerd's own HTTP/1.1 connection: its body in, its answer out.

Owns a request's side of the connection (``Request``): handing out the body as it arrives
(``100 Continue`` first when the client waits for it), taking a body that came whole at once,
draining one the handler left unread, and framing the answer (Content-Length, chunks, or to
the close for an HTTP/1.0 client; ``Connection: close`` when either side needs it; nothing
after the head for HEAD). It is the ``client_io.RequestBody`` and ``ResponseSink`` the proxy
relays through, and gives ASGI callables for the quart-trio app. It must not read or write the
socket itself: ``h1_connection.Connection`` does, through ``Wire``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from routerd.front import h1
from routerd.front.client_io import DRAIN_LIMIT, asgi_receive, asgi_send, drain
from routerd.front.h1 import END_OF_REQUEST, RequestHead

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientGone(Exception):
    """The client left (or sent nonsense) before the piece asked for arrived."""


class Wire(Protocol):
    """What a request needs of its connection."""

    #: Parsed pieces not yet taken, in order (``h1.RequestParser.feed``).
    pieces: deque[RequestHead | bytes | None]
    #: Told when the client leaves.
    watchers: list[Callable[[], None]]
    client_gone: bool

    @property
    def closing(self) -> bool: ...

    async def next_piece(self) -> RequestHead | bytes | None: ...

    def took(self, size: int) -> None: ...

    async def write(self, data: bytes) -> None: ...


class Request:
    """One request on a ``Connection``: its body (``client_io.RequestBody``) and the sink of its
    answer (``client_io.ResponseSink``)."""

    def __init__(self, connection: Wire, head: RequestHead) -> None:
        self._connection = connection
        self.head = head
        self.body_done = not head.has_body
        self.started = False
        self._refused = False
        self.finished = False
        self.keep_alive = head.keep_alive
        self._chunked = False  # the answer's framing
        self._no_body = head.method == "HEAD"
        self._continued = False
        self._extra: list[tuple[bytes, bytes]] = []
        self._disconnected: trio.Event | None = None
        self._disconnect_watch: Callable[[], None] | None = None

    # -- the body -----------------------------------------------------------------------------
    async def receive(self) -> tuple[bytes, bool] | None:
        if self.body_done:
            return b"", False
        connection = self._connection
        if self.head.expect_continue and not self._continued and not self.started:
            self._continued = True
            await connection.write(_CONTINUE)
        try:
            piece = await connection.next_piece()
        except ClientGone:
            return None
        if piece is END_OF_REQUEST:
            self.body_done = True
            return b"", False
        assert isinstance(piece, bytes), "a head inside a body: the parser's order is broken"
        pieces = connection.pieces
        if pieces and pieces[0] is END_OF_REQUEST:
            pieces.popleft()
            self.body_done = True
        return piece, not self.body_done

    @property
    def awaiting_continue(self) -> bool:
        return self.head.expect_continue and not self._continued and not self.body_done

    def watch(self, on_leave: Callable[[], None]) -> _Watch:
        return _Watch(self._connection, on_leave)

    def received(self) -> bytes | None:
        if self.body_done:
            return b""
        pieces = self._connection.pieces
        parts: list[bytes] = []
        for piece in pieces:
            if piece is END_OF_REQUEST:
                break
            if not isinstance(piece, bytes):
                return None
            parts.append(piece)
        else:
            return None  # not all here yet
        for _ in range(len(parts) + 1):
            pieces.popleft()
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._connection.took(len(body))
        self.body_done = True
        return body

    async def drain(self) -> bool:
        """Read and drop the rest of an unread body; whether the connection can go on."""
        return await drain(self)

    # -- the answer ---------------------------------------------------------------------------
    def add_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._extra += headers

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> bytes:
        """The answer's head, with the framing and ``connection`` lines routerd decides."""
        self.started = True
        if self._extra:
            headers = headers + self._extra
        extra = b""
        declared = False
        hop_by_hop = False
        for name, value in headers:
            if name == b"content-length":
                declared = True
            elif name == b"transfer-encoding" or name == b"connection":  # framing is the connection's
                hop_by_hop = True
                if name == b"connection" and value.lower() == b"close":
                    self.keep_alive = False  # the handler knows the connection cannot go on
        if hop_by_hop:
            headers = [(n, v) for n, v in headers if n != b"transfer-encoding" and n != b"connection"]
        bodiless = status < 200 or status in (204, 304)
        if not declared and not bodiless:
            if length is not None:
                extra = b"content-length: %d\r\n" % length
            elif self.head.http_version == "1.1":
                self._chunked = True
                extra = b"transfer-encoding: chunked\r\n"
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the close
        if not self.body_done and (self.head.expect_continue and not self._continued
                                   or (self.head.content_length or 0) > DRAIN_LIMIT):
            self.keep_alive = False  # the unread body will not be read: end after this answer
        if self._connection.closing:
            self.keep_alive = False
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        elif self.head.http_version == "1.0":
            extra += b"connection: keep-alive\r\n"
        return h1.encode_head(status, headers, extra)

    def refused(self) -> bool:
        """Whether the connection refused the request (bad bytes in its body) before the handler
        answered: the 400 is sent, whatever the handler sends after it is dropped. Says whether
        it was (an answer already begun cannot be taken back)."""
        if self.started:
            return False
        self.started = self.finished = self._refused = True
        return True

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._refused:
            return
        await self._connection.write(self._head(status, headers, None))

    async def answer(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        """The whole answer in one write."""
        if self._refused:
            return
        head = self._head(status, headers, len(data))
        self.finished = True
        await self._connection.write(head if self._no_body else head + data)

    async def body(self, data: bytes, more: bool) -> None:
        if self.finished:
            return
        self.finished = not more
        if self._no_body:
            return
        if self._chunked:
            data = h1.encode_chunk(data) if more else h1.encode_chunk(data) + h1.LAST_CHUNK
        if data:
            await self._connection.write(data)

    async def raw(self, data: bytes, more: bool) -> None:
        """The upstream's chunked bytes as they are; only for an answer sent chunked."""
        if self.finished:
            return
        self.finished = not more
        if not self._no_body and data:
            await self._connection.write(data)

    @property
    def chunked(self) -> bool:
        """Whether the answer is framed in chunks (so an upstream's chunks may pass through)."""
        return self._chunked

    # -- for ASGI apps ------------------------------------------------------------------------
    def asgi(self) -> tuple[ASGIReceiveCallable, ASGISendCallable]:
        """ASGI callables over this request (the quart-trio app's routes, the do-nothing apps of
        the benchmark): ``http.disconnect`` comes once the client left or the answer ended."""
        return asgi_receive(self, self._disconnected_event), asgi_send(self)

    def _disconnected_event(self) -> trio.Event:
        if self._disconnected is None:
            self._disconnected = event = trio.Event()
            self._disconnect_watch = event.set
            self._connection.watchers.append(self._disconnect_watch)
            if self._connection.client_gone or self.finished:
                event.set()
        return self._disconnected

    def ended(self) -> None:
        """The handler returned: an ASGI app still listening hears ``http.disconnect``."""
        if self._disconnect_watch is not None:
            self._connection.watchers.remove(self._disconnect_watch)
            self._disconnect_watch = None
        if self._disconnected is not None:
            self._disconnected.set()


class _Watch:
    """While entered, the client leaving calls ``on_leave`` (at once if it has left already)."""

    __slots__ = ("_connection", "_on_leave")

    def __init__(self, connection: Wire, on_leave: Callable[[], None]) -> None:
        self._connection = connection
        self._on_leave = on_leave

    async def __aenter__(self) -> None:
        if self._connection.client_gone:
            self._on_leave()
        self._connection.watchers.append(self._on_leave)

    async def __aexit__(self, *exc: object) -> None:
        self._connection.watchers.remove(self._on_leave)
