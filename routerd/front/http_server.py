"""Serving the HTTP front: listening sockets, one contained task per connection, shutdown.

Owns the accept loop and which code serves each connection: routerd's own HTTP/1.1 handler
(``h1_connection``) every plain connection, hypercorn's protocol code the TLS ones (HTTP/2 by
ALPN, and HTTP/1.1 over TLS) and a plain connection that opens with HTTP/2's preface. Owns
hypercorn's settings too (``hypercorn_config``, from ``[server]``), which both follow. hypercorn's own
``serve`` runs each connection in a task that lets any exception other than OSError escape (its
issue #203: a protocol state it did not expect), and under trio that ends every connection and
the daemon around them. Here each connection's task contains its failures: the connection is
closed and the failure logged once with the peer; the listener and every other connection go on.

It uses hypercorn's per-connection server (``TCPServer``), worker context and lifespan, the same
pieces ``hypercorn.trio.serve`` wires; the version range is pinned in pyproject.toml. It must not
know about routes, models or backends: the ASGI app does.
"""

from __future__ import annotations

import logging
import math
import os
import select
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypercorn.config
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from routerd.config import ServerConfig
from routerd.front import h1_connection

log = logging.getLogger("routerd.http")


def hypercorn_config(server: ServerConfig) -> hypercorn.config.Config:
    """hypercorn's settings for serving ``server`` (pure)."""
    config = hypercorn.config.Config()
    config.bind = [f"{server.host}:{server.port}"]
    config.graceful_timeout = 1.0  # requests have drained before it applies
    # A connection must finish its headers within header_timeout of opening (hypercorn's
    # keep-alive timer runs until a request's headers are in), so slow clients hold little.
    config.keep_alive_timeout = server.header_timeout
    config.h11_max_incomplete_size = server.max_header_bytes
    config.h2_max_header_list_size = server.max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(app: Any, config: hypercorn.config.Config, *, shutdown_trigger: Callable[[], Awaitable[object]],
                tls: Callable[[], ssl.SSLContext | None] = lambda: None, send_timeout: float = 60.0,
                handler: h1_connection.Handler | None = None, plain_on_hypercorn: bool = False,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``config.bind`` until ``shutdown_trigger`` returns; reports the bound URLs
    to ``task_status``. Open connections then get ``config.graceful_timeout`` to finish.

    ``tls`` gives the TLS context for each new connection (None: plain HTTP); asking per
    connection is what lets a renewed certificate apply without a restart. A connection whose
    client reads nothing for ``send_timeout`` s while routerd writes to it is closed.

    ``handler`` serves each request of a plain HTTP/1.1 connection (default: ``app`` through
    the ASGI bridge); ``plain_on_hypercorn`` gives those connections to hypercorn instead (the
    benchmark's reference)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    front = _Front(handler if handler is not None else h1_connection.asgi_handler(app),
                   h1_connection.Settings(header_timeout=config.keep_alive_timeout, send_timeout=send_timeout,
                                          max_head_bytes=config.h11_max_incomplete_size),
                   plain_on_hypercorn)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            sockets = config.create_sockets()  # OSError here (port in use) reaches the caller
            listeners = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            scheme = "https" if tls() else "http"
            urls = [f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"
                    for sock in sockets.insecure_sockets]
            task_status.started(urls)
            serve_one = partial(_connection, wrapped, config, context, lifespan_state, tls, send_timeout, front)
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, serve_one, listeners, handler_nursery=connections))
                await shutdown_trigger()
                accepting.cancel_scope.cancel()
            await context.terminated.set()  # keep-alive connections close after their request
            front.shutdown_began()
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class _Front:
    """The plain connections routerd serves itself, and how (see ``serve``)."""

    def __init__(self, handler: h1_connection.Handler, settings: h1_connection.Settings,
                 plain_on_hypercorn: bool) -> None:
        self.handler = handler
        self.settings = settings
        self.plain_on_hypercorn = plain_on_hypercorn
        self.terminating = trio.Event()
        self.open: set[h1_connection.Connection] = set()

    def shutdown_began(self) -> None:
        self.terminating.set()
        for connection in self.open:
            connection.shutdown_began()


async def _connection(app: Any, config: hypercorn.config.Config, context: WorkerContext,
                      lifespan_state: dict[str, Any], tls: Callable[[], ssl.SSLContext | None],
                      send_timeout: float, front: _Front | None, stream: trio.SocketStream) -> None:
    """One client connection, from accept to close, whatever the server code raises on the way."""
    ssl_context = tls()
    served: Any = stream
    if ssl_context is not None:  # hypercorn's server does the handshake (bounded by its timeout)
        served = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
    elif front is not None and not front.plain_on_hypercorn:
        connection = h1_connection.Connection(stream, front.handler, front.settings, lifespan_state=lifespan_state,
                                              terminating=front.terminating)
        front.open.add(connection)
        try:
            await connection.serve()
        except* Exception as group:
            log.error("HTTP connection from %s failed inside the HTTP server and was closed",
                      connection.peer, exc_info=group)
            await trio.aclose_forcefully(stream)
        finally:
            front.open.discard(connection)
        if not connection.upgrade:
            return
        served = _Replayed(stream, connection.first_bytes)  # HTTP/2 without TLS: hypercorn's
    try:
        await _Server(app, config, context, ConnectionState(lifespan_state.copy()), served,
                      send_timeout=send_timeout, peer=_peer(stream))
    except* Exception as group:  # Cancelled (shutdown) passes through untouched
        log.error("HTTP connection from %s failed inside the HTTP server and was closed",
                  _peer(stream), exc_info=group)
        await trio.aclose_forcefully(stream)


class _Server(TCPServer):
    """hypercorn's per-connection server with a write timeout, a direct write and one idle timer.

    hypercorn shields each socket write from cancellation (a half-written frame would corrupt
    the connection), so a client that stops reading while keeping its connection open would hold
    the writing task, and whatever it holds (a backend slot, an event subscription), forever.
    Here a write that makes no progress for ``send_timeout`` s closes the connection instead.

    On a plain TCP connection, a write the socket's buffer has room for is made at once, without
    a lock, a cancel scope or a trip through trio's scheduler: that is nearly every write (a
    response, an SSE event), and the awaiting path cost more than the relay around it. Only what
    the buffer does not take goes the awaiting way.

    hypercorn closes a connection idle for ``keep_alive_timeout`` (between requests, or while
    a request's head is still arriving) with a timer task that it starts anew, and waits to
    start, each time the connection goes idle, and cancels when a request begins: two trips
    through the scheduler per request. Here one timer lives as long as the connection and each
    change only moves its deadline. A deadline that passes while the client's bytes already wait
    unread in the socket is routerd's lateness (a busy event loop), not an idle client: the
    connection gets one more timeout to read them (once per idle spell, so a client cannot drip
    its way past the limit).
    """

    def __init__(self, *args: Any, send_timeout: float, peer: str) -> None:
        super().__init__(*args)
        self._send_timeout = send_timeout
        self._peer = peer
        #: The connection's socket when nothing wraps it (not TLS): written to directly.
        stream: trio.abc.Stream = self.stream  # hypercorn annotates an SSLStream; plain HTTP is a SocketStream
        self._plain: trio.socket.SocketType | None = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._idle = True  # no request in progress
        self._became_idle = trio.Event()
        self._idle_timer: trio.CancelScope | None = None
        self._grace_taken = False  # this idle spell's one extension (see the class docstring)

    async def _idle_timeout(self) -> None:
        """Close the connection once idle for ``keep_alive_timeout`` s, or idle after shutdown
        began. hypercorn starts this once, as the connection opens."""
        while True:
            with trio.CancelScope() as self._idle_timer:
                self._set_idle(self._idle)
                await self.context.terminated.wait()
                while not self._idle:  # shutting down: the request in progress is answered first
                    await self._became_idle.wait()
            if self._idle and (self._grace_taken or not self._unread_bytes()):
                break
            # The deadline passed as a request began (before this task ran), or with its bytes
            # unread: it is served.
            self._grace_taken = self._idle
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    def _unread_bytes(self) -> bool:
        """Whether the client's bytes (or its close) wait unread in a plain TCP socket."""
        fd = self._plain.fileno() if self._plain is not None else -1
        return fd >= 0 and bool(select.select([fd], [], [], 0)[0])

    def _set_idle(self, idle: bool) -> None:
        self._idle = idle
        if idle:
            self._became_idle.set()
        else:
            self._grace_taken = False
            if self._became_idle.is_set():
                self._became_idle = trio.Event()
        if self._idle_timer is not None:
            self._idle_timer.deadline = trio.current_time() + self.config.keep_alive_timeout if idle else math.inf

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            self._set_idle(event.idle)
            return
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        data: bytes | memoryview = event.data
        if self._plain is not None and not self.send_lock.locked():
            fd = self._plain.fileno()  # -1 once trio has closed it
            try:
                sent = os.write(fd, data) if fd >= 0 else 0
            except BlockingIOError:
                sent = 0
            except OSError:  # the peer is gone (EPIPE, ECONNRESET)
                await self.protocol.handle(Closed())
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.send_lock.acquire_nowait()  # taken before any yield: nothing can write in between
            try:
                await self._send_slowly(data)
            finally:
                self.send_lock.release()
            return
        async with self.send_lock:
            await self._send_slowly(data)

    async def _send_slowly(self, data: bytes | memoryview) -> None:
        """Write all of ``data``, waiting for room; the send lock is held."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._send_timeout
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
                return
        if scope.cancelled_caught:
            log.info("closing the connection of %s: it read nothing for %g s (server.send_timeout)",
                     self._peer, self._send_timeout)
            await trio.aclose_forcefully(self.stream)
            await self.protocol.handle(Closed())


class _Replayed(trio.abc.HalfCloseableStream):
    """A socket stream whose first read gives back bytes already read from it."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self.socket = stream.socket
        self._stream = stream
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) or "?"  # a Unix socket
