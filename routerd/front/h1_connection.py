"""routerd's own HTTP/1.1 connections on trio: one client connection from accept to close.

Owns the I/O of a plain HTTP/1.1 connection: reading (one reader task per connection, which also
notices the client leaving), the header timer (a connection must send a request's head within
``header_timeout`` of opening or of its last answer, once more if its bytes were already
waiting unread when the time was up), pipelined requests served in order (at most
``MAX_PIPELINED`` read ahead), the send timeout (a client that reads nothing for
``send_timeout`` s is dropped), and graceful shutdown (idle connections close, busy ones answer
the requests they have sent and then close). Each request goes to
``handler(scope, request)``; ``request`` (``h1_request.Request``) is both its body and its
answer's sink, and frames the answer.

It knows nothing of routes, keys or models, and parses nothing itself (``h1`` does). Why not
hypercorn here: its per-request task, queues and h11 event objects cost ~0.2 ms of CPU per
request on this machine kind, more than everything else routerd does for a proxied request.
"""

from __future__ import annotations

import logging
import math
import os
import select
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from hypercorn.typing import ConnectionState, HTTPScope

from routerd.front import h1
from routerd.front.h1 import END_OF_REQUEST, RequestHead
from routerd.front.h1_request import ClientGone, Request

log = logging.getLogger("routerd.http")

#: The reader stops reading while this much request body waits unread, or this many pipelined
#: requests wait behind the one being answered (flow control: a flood of requests that reads no
#: answers holds what one read brings, not the whole stream).
READ_AHEAD = 256 * 1024
MAX_PIPELINED = 16


@attrs.frozen
class Settings:
    """What a connection needs from ``[server]``."""

    header_timeout: float = 10.0
    send_timeout: float = 60.0
    max_head_bytes: int = 16 * 1024


Handler = Callable[[HTTPScope, Request], Awaitable[None]]


class Connection:
    """One client connection (see the module docstring). ``serve`` runs it to its close."""

    def __init__(self, stream: trio.SocketStream, handler: Handler, settings: Settings, *,
                 lifespan_state: dict[str, Any] | None = None, terminating: trio.Event | None = None) -> None:
        self._stream = stream
        self._fd_source = stream.socket
        #: Read from the socket directly (a SocketStream itself, not a wrapper around one).
        self._plain = type(stream) is trio.SocketStream
        self._handler = handler
        self._settings = settings
        self._state = lifespan_state if lifespan_state is not None else {}
        self._terminating = terminating if terminating is not None else trio.Event()
        self._parser = h1.RequestParser(settings.max_head_bytes)
        self.pieces: deque[RequestHead | bytes | None] = deque()
        self._buffered = 0  # body bytes in pieces
        self._heads_waiting = 0  # request heads in pieces
        self._arrived = trio.Event()  # set when pieces come, the client leaves or shutdown begins
        self._read_more = trio.Event()  # the reader waits on it while too much is queued
        self.client_gone = False
        self.bad_request: h1.BadRequest | None = None
        self.upgrade = False  # the client sent HTTP/2's preface: hypercorn takes the connection
        self.first_bytes = b""  # what was read before telling that
        self._until_first_head: bytearray | None = bytearray()  # kept for that hand-over
        self._send_lock = trio.StrictFIFOLock()
        self._broken = False  # a write did not finish: nothing more may be written
        self.watchers: list[Callable[[], None]] = []  # told when the client leaves
        self._header_timer: trio.CancelScope | None = None  # the reader's (see _read_loop)
        self._header_deadline = trio.current_time() + settings.header_timeout
        self.timed_out = False
        self._grace = True  # this idle spell may still get one more header_timeout
        self._current: Request | None = None  # the request being served
        self.peer, self._client, self._server = _addresses(stream)

    async def serve(self) -> None:
        """Serve requests until either side ends the connection; the socket is closed after
        (unless ``upgrade``: then the caller hands it over)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                await self._serve_requests()
                nursery.cancel_scope.cancel()
        finally:
            if not self.upgrade:
                await trio.aclose_forcefully(self._stream)

    @property
    def closing(self) -> bool:
        """routerd is shutting down: the answer in progress is the connection's last."""
        return self._terminating.is_set()

    def shutdown_began(self) -> None:
        """routerd is stopping: an idle connection closes now, a busy one after its answer."""
        self._arrived.set()

    # -- reading ------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        """Read and parse until the client leaves or sends nonsense, or the header timer fires.

        The header timer is this task's cancel scope, made once per idle spell at most: while
        the connection waits for a request's head its deadline is ``header_timeout`` away, and
        inf while a request is served (see ``_arm_header_timer``). Moving a deadline costs far
        less than a scope per request."""
        while True:
            with trio.CancelScope(deadline=self._header_deadline) as timer:
                self._header_timer = timer
                await self._read_until_done(timer)
                return
            # The header timer fired. A head parsed as it fired has moved the deadline on
            # already. Bytes still waiting in the socket were routerd's lateness (a busy loop),
            # not the client's: they get one more header_timeout.
            if self._header_deadline > trio.current_time():
                continue
            if self.pieces or (self._grace and self._unread_bytes()):
                self._grace = False  # once per idle spell: a client cannot drip past the limit
                self._header_deadline = trio.current_time() + self._settings.header_timeout
                continue
            self.timed_out = True
            self._arrived.set()
            return

    async def _read_until_done(self, timer: trio.CancelScope) -> None:
        while True:
            while self._buffered > READ_AHEAD or self._heads_waiting > MAX_PIPELINED:
                self._read_more = trio.Event()
                await self._read_more.wait()
            try:
                if self._plain:  # wait, then read once: the next request is rarely there already
                    await trio.lowlevel.wait_readable(self._fd_source)
                    data = os.read(self._fd_source.fileno(), 65536)
                else:
                    data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self._leave()
                return
            if self._until_first_head is not None:
                self._until_first_head += data
            try:
                pieces = self._parser.feed(data)
            except h1.Upgrade:
                self.upgrade, self.first_bytes = True, bytes(self._until_first_head or data)
                self._arrived.set()
                return
            if pieces:
                self._until_first_head = None
                for piece in pieces:
                    if isinstance(piece, bytes):
                        self._buffered += len(piece)
                    elif piece.__class__ is RequestHead:  # a head is here: the timer rests
                        self._heads_waiting += 1
                        self._header_deadline = timer.deadline = math.inf
                        self._grace = True
                self.pieces.extend(pieces)
                self._arrived.set()
            if self._parser.error is not None:
                # What came whole before the bad bytes is still served. A request whose body
                # they cut short is refused now (as hypercorn does): the 400 goes out at once and
                # its handler is told the client left.
                self.bad_request = error = self._parser.error
                self._arrived.set()
                current = self._current
                if current is not None and not current.body_done and current.refused():
                    await self.write(h1.error_response(error.status, str(error)))
                    self._broken = True  # nothing more is written on this connection
                    self._leave()
                else:
                    self._drop_unfinished_request()  # the 400 answers it when its turn comes
                return

    def _drop_unfinished_request(self) -> None:
        """Take back the last parsed request if its body was cut short by bad bytes."""
        pieces = self.pieces
        for index in range(len(pieces) - 1, -1, -1):
            piece = pieces[index]
            if piece is END_OF_REQUEST:
                return
            if isinstance(piece, RequestHead):
                for _ in range(len(pieces) - index):
                    self._taken(pieces.pop())
                return

    def _arm_header_timer(self) -> None:
        """The connection now waits for a request's head: it must come within header_timeout."""
        self._header_deadline = trio.current_time() + self._settings.header_timeout
        if self._header_timer is not None:
            self._header_timer.deadline = self._header_deadline

    def _leave(self) -> None:
        """The client closed (or half-closed) its side, or reset the connection: the request in
        progress is told (the proxy cancels its upstream call; an ASGI app hears
        ``http.disconnect``), and no new one is read. Answers are still written until a write
        fails: a half-closed client reads those its handlers still give."""
        self.client_gone = True
        self._arrived.set()
        for on_leave in list(self.watchers):
            on_leave()

    async def next_piece(self) -> RequestHead | bytes | None:
        """The next parsed piece (raises ClientGone once the client left with none waiting)."""
        while not self.pieces:
            if self.client_gone or self.bad_request is not None or self.upgrade:
                raise ClientGone()
            self._arrived = trio.Event()
            await self._arrived.wait()
        piece = self.pieces.popleft()
        self._taken(piece)
        return piece

    def _taken(self, piece: RequestHead | bytes | None) -> None:
        """``piece`` left the queue: the reader may read again once little enough waits."""
        if isinstance(piece, bytes):
            self._buffered -= len(piece)
        elif piece is not None:
            self._heads_waiting -= 1
        if self._buffered <= READ_AHEAD and self._heads_waiting <= MAX_PIPELINED:
            self._read_more.set()

    async def _next_head(self) -> RequestHead | None:
        """The next request's head, or None when the connection should close: the client left
        or sent nonsense, shutdown began while idle, or no whole head came within
        ``header_timeout`` (the reader's header timer)."""
        pieces = self.pieces
        if pieces and pieces[0].__class__ is RequestHead:  # pipelined: already here
            head: RequestHead = pieces.popleft()  # type: ignore[assignment]
            self._taken(head)
            return head
        self._arm_header_timer()
        while True:
            if pieces:
                piece = await self.next_piece()
                if isinstance(piece, RequestHead):
                    return piece
                continue  # the rest of a body no handler read (dropped)
            if self.client_gone or self.bad_request is not None or self.upgrade or self.timed_out:
                return None
            if self._terminating.is_set() and self._parser.between_requests:
                return None
            self._arrived = trio.Event()
            await self._arrived.wait()

    def _unread_bytes(self) -> bool:
        fd = self._fd_source.fileno()
        if fd < 0:
            return False
        poller = select.poll()  # not select(): descriptors past 1024 are normal in a busy daemon
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    # -- requests -----------------------------------------------------------------------------
    async def _serve_requests(self) -> None:
        while True:
            head = await self._next_head()
            if head is None:
                if self.bad_request is not None and not self._broken:
                    await self.write(h1.error_response(self.bad_request.status, str(self.bad_request)))
                return
            request = self._current = Request(self, head)
            scope = self._scope(head)
            try:
                await self._handler(scope, request)
            except Exception:
                log.exception("unhandled error on %s %s from %s", head.method, head.path, self.peer)
                if not request.started:
                    await request.answer(500, [(b"content-type", b"application/json")],
                                         b'{"error": {"message": "internal error", "type": "server_error", '
                                         b'"code": "internal_error"}}')
                self._broken = True
            finally:
                request.ended()
                self._current = None
            if self.bad_request is not None and not request.started:  # its body was bad
                await self.write(h1.error_response(self.bad_request.status, str(self.bad_request)))
                return
            if not request.finished or not request.keep_alive or self._broken:
                return
            if not request.body_done and not await request.drain():
                return

    def _scope(self, head: RequestHead) -> HTTPScope:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": head.http_version, "method": head.method, "scheme": "http",
                "path": head.path, "raw_path": head.target.partition(b"?")[0], "query_string": head.query,
                "root_path": "", "headers": head.headers, "client": self._client, "server": self._server,
                "extensions": {}, "state": ConnectionState(self._state.copy())}

    # -- writing ------------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Write ``data`` whole: at once when the socket's buffer takes it (nearly always), else
        waiting for room for at most ``send_timeout`` s. A client that is gone is not an error
        here: its request's watchers have been told."""
        if self._broken:
            return
        view: bytes | memoryview = data
        if not self._send_lock.locked():
            fd = self._fd_source.fileno()
            try:
                sent = os.write(fd, data) if fd >= 0 else 0
            except BlockingIOError:
                sent = 0
            except OSError:  # EPIPE, ECONNRESET: the client is gone
                self._broken = True
                self._leave()
                return
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
        try:
            await self._write_slowly(view)
        except BaseException:  # cancelled before or during the rest: the answer's framing is cut
            self._broken = True
            raise

    async def _write_slowly(self, data: bytes | memoryview) -> None:
        async with self._send_lock:  # another task's write waiting for room goes first
            if self._broken:
                return
            try:
                with trio.move_on_after(self._settings.send_timeout) as waited:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True
                self._leave()
            except BaseException:  # cancelled mid-write: the answer's framing is cut
                self._broken = True
                raise
        if waited.cancelled_caught:
            log.info("closing the connection of %s: it read nothing for %g s (server.send_timeout)",
                     self.peer, self._settings.send_timeout)
            self._broken = True
            self._leave()

    def took(self, size: int) -> None:
        """``size`` bytes of body were taken from the pieces at once (``Request.received``)."""
        self._buffered -= size
        if self._buffered <= READ_AHEAD and self._heads_waiting <= MAX_PIPELINED:
            self._read_more.set()


def _addresses(stream: trio.SocketStream) -> tuple[str, tuple[str, int] | None, tuple[str, int] | None]:
    try:
        peer = stream.socket.getpeername()
        local = stream.socket.getsockname()
    except OSError:
        return "?", None, None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}", (peer[0], peer[1]), (local[0], local[1])
    return str(peer) or "?", None, None  # a Unix socket


def asgi_handler(app: Any) -> Handler:
    """A ``Handler`` that runs a plain ASGI app (the benchmark's do-nothing apps)."""
    async def handle(scope: HTTPScope, request: Request) -> None:
        receive, send = request.asgi()
        await app(scope, receive, send)
    return handle
