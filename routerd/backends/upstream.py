"""HTTP/1.1 to one server: a small keep-alive connection pool over trio.

Owns the sockets to one backend's loopback port (or a remote endpoint's host, over TLS when its
URL says https): opening them, reusing idle ones, sending requests and reading responses,
timeouts, and closing them; the bytes on the wire are ``http1``'s. It knows nothing of models,
queues or clients; the proxy decides what to send and where the answer goes.

Why not httpx: on this path a general client's per-request machinery (URL and header models,
pool bookkeeping that slows as concurrency rises) cost more than the rest of the relay. The
backend is one known HTTP/1.1 server, so the whole client is a few dozen lines.
"""

from __future__ import annotations

import math
import os
import select
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable

import trio

from routerd.backends.http1 import Head, ProtocolError, ResponseReader, encode_request

#: Bytes asked of the socket per read; llama-server's SSE chunks are far smaller.
READ_SIZE = 65536


class UpstreamError(Exception):
    """The backend refused the connection, closed it early, timed out or spoke invalid HTTP."""


class NotDelivered(UpstreamError):
    """The request never reached the backend whole (no connection, or the send failed), so the
    backend cannot have acted on it: sending it again, elsewhere or later, is safe."""


class _Connection:
    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType,
                 on_close: Callable[[], None] = lambda: None) -> None:
        self.stream = stream
        self.socket = sock
        self._on_close = on_close
        self.reader = ResponseReader()
        self.idle_since = 0.0
        #: Writes may go to the socket directly (no TLS layer in between).
        self.plain = isinstance(stream, trio.SocketStream)

    async def send(self, method: str, head: bytes, body: bytes) -> None:
        self.reader.expect(method)
        if len(body) < READ_SIZE:
            data = head + body  # one write, one packet
            if self.plain:  # nearly always taken whole by the socket's buffer: no trip through trio
                sent = _write_now(self.socket, data)
                if sent == len(data):
                    return
                data = data[sent:]
            await self.stream.send_all(data)
        else:  # a long prompt is not copied just to be joined to its head
            await self.stream.send_all(head)
            await self.stream.send_all(body)

    async def receive(self, read_timeout: float) -> None:
        """Feed the reader the next bytes the server sends (UpstreamError if none come in time)."""
        with trio.move_on_after(read_timeout) as scope:
            await self.receive_untimed()
        if scope.cancelled_caught:
            raise _gap(read_timeout)

    async def receive_untimed(self) -> None:
        """Feed the reader the next bytes the server sends, however long they take. On a plain
        socket: wait until it is readable, then read once (the answer is rarely there yet when
        asked for, and trying first costs a failed read each time)."""
        data: bytes | bytearray
        if self.plain:
            await trio.lowlevel.wait_readable(self.socket)
            data = os.read(self.socket.fileno(), READ_SIZE)
        else:
            data = await self.stream.receive_some(READ_SIZE)
        self.reader.feed(data)  # b"" is EOF: the reader then reports the early close

    async def read_head(self, read_timeout: float) -> Head:
        while (head := self.reader.head()) is None:
            await self.receive(read_timeout)
        return head

    def stale(self) -> bool:
        """An idle keep-alive socket with something to read was closed by the server (or is
        out of step): reusing it would fail the request."""
        poller = select.poll()  # not select(): descriptors past 1024 are normal in a busy daemon
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        if self.socket.fileno() >= 0:
            self.socket.close()
            self._on_close()


class Response:
    """A response whose headers have arrived; iterate it for the body, then (or instead) close it.

    Closing before the end drops the connection, which is how llama-server learns to stop
    generating; a fully read response returns its connection to the pool.
    """

    def __init__(self, pool: ConnectionPool, conn: _Connection, head: Head, read_timeout: float) -> None:
        self.status: int = head.status
        self.headers: list[tuple[bytes, bytes]] = head.headers
        self._pool, self._conn, self._read_timeout = pool, conn, read_timeout
        self._done = False
        #: Called once when the response ends, read to the end or closed early.
        self.on_end: Callable[[], None] | None = None

    def header(self, name: bytes) -> bytes:
        return first_header(self.headers, name)

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """The next part of the body: everything that has arrived (a backend ahead of a slow
        client is relayed in fewer, larger writes)."""
        if self._done:
            raise StopAsyncIteration
        reader = self._conn.reader
        try:
            data = reader.body()
            while not data and not reader.done:
                await self._conn.receive(self._read_timeout)
                data = reader.body()
        except _BROKEN as exc:
            raise self._broke(exc) from None
        except BaseException:
            self.aclose_now()
            raise
        self._give_back_if_done()
        if data:
            return data
        raise StopAsyncIteration

    @property
    def chunked(self) -> bool:
        """The body is chunked and unread: ``pass_chunks`` can pass it on as it came."""
        return not self._done and self._conn.reader.chunked

    async def pass_chunks(self, deliver: Callable[[bytes, list[bytes], bool], Awaitable[None]]) -> None:
        """Hand each run of whole chunks of a chunked body, exactly as they came, to ``deliver``
        (the bytes, the data they carry, whether more follows) as they arrive, to the last. A
        gap of ``read_timeout`` s in the backend's bytes is an UpstreamError. One timer serves
        the whole body, its deadline moved at each read: a stream of thousands of events makes
        no scope per event."""
        conn = self._conn
        reader = conn.reader
        try:
            with trio.CancelScope() as gap:
                while not self._done:
                    framed, data = reader.whole_chunks()
                    if not framed and not reader.done:
                        gap.deadline = trio.current_time() + self._read_timeout
                        await conn.receive_untimed()
                        gap.deadline = math.inf
                        continue
                    self._give_back_if_done()
                    await deliver(framed, data, not reader.done)
            if gap.cancelled_caught:
                raise _gap(self._read_timeout)
        except _BROKEN as exc:
            raise self._broke(exc) from None
        except BaseException:
            self.aclose_now()
            raise

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    def _give_back_if_done(self) -> None:
        """The body was read to its end: the connection goes back to the pool."""
        if self._conn.reader.done and not self._done:
            self._end()
            self._pool.give_back(self._conn)

    def _broke(self, exc: BaseException) -> UpstreamError:
        """The connection failed mid-body: closed, and the error the caller sees."""
        self.aclose_now()
        return UpstreamError(_describe(exc))

    def aclose_now(self) -> None:
        """Stop reading: an unfinished response's connection is closed, not reused."""
        if not self._done:
            self._end()
            self._conn.close()

    def _end(self) -> None:
        self._done = True
        if self.on_end is not None:
            self.on_end()


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to ``host:port`` (loopback by default); ``max_idle`` are
    kept between requests (the backend's slot count: more can never be busy at once)."""

    def __init__(self, port: int, *, max_idle: int, read_timeout: float = math.inf,
                 connect_timeout: float = 10.0, idle_timeout: float = 4.0, authorization: bytes = b"",
                 host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, prefix: str = "",
                 fixed_headers: Iterable[tuple[bytes, bytes]] = (), max_open: int | None = None) -> None:
        self.port = port
        self.host = host
        self._tls = tls
        #: Prepended to every target: a remote served under a path (``https://host/llm``).
        self._prefix = prefix.rstrip("/")
        self._host_header = host.encode("idna") + (b"" if port == (443 if tls else 80) else b":%d" % port)
        # Sent with every request (the backend's own key): callers' credentials never are.
        self._fixed_headers = [(b"authorization", authorization)] if authorization else []
        self._fixed_headers += list(fixed_headers)
        self.max_idle = max_idle
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        # llama-server (cpp-httplib) closes keep-alive sockets idle for 5 s; drop ours first.
        self.idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._closed = False
        #: At most this many connections at once (None: no limit); a request beyond it waits for
        #: one to come back instead of opening a connection the server has no thread to serve.
        self.max_open = max_open
        self._open = 0
        self._returned = trio.lowlevel.ParkingLot()  # requests waiting for a connection

    async def request(self, method: str, target: str, *, headers: Iterable[tuple[bytes, bytes]] = (),
                      body: bytes = b"", read_timeout: float | None = None, limited: bool = True,
                      on_sent: Callable[[], None] | None = None,
                      rest: tuple[int, AsyncIterable[bytes]] | None = None) -> Response:
        """Send a request and return once the response's headers arrive (UpstreamError if the
        backend fails before that). ``read_timeout`` bounds each read (the gap between bytes, not
        the whole exchange: bound that with a cancel scope); the pool's default otherwise.
        ``limited``: the request waits for a connection past ``max_open`` (health checks do not:
        they must not queue behind the traffic whose backend they judge). ``on_sent`` is
        called once the request has gone out whole. ``rest``: (its length, its bytes) still to
        come after ``body`` (an upload relayed as it arrives: sent on a fresh connection, and
        never sent twice once a byte of it went)."""
        read_timeout = self.read_timeout if read_timeout is None else read_timeout
        length = len(body) + (rest[0] if rest is not None else 0)
        head = [(b"host", self._host_header), (b"content-length", b"%d" % length),
                *self._fixed_headers, *headers]
        encoded = encode_request(method, self._prefix + target, head)
        while True:
            conn, reused = (self._take_idle(), True) if rest is None else (None, False)
            while (conn is None and limited and self.max_open is not None and self._open >= self.max_open
                   and not self._closed):
                await self._returned.park()
                conn = self._take_idle()
            if conn is None:
                conn, reused = await self._connect(), False
            try:
                await conn.send(method, encoded, body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                conn.close()
                if reused:
                    continue  # the server closed an idle socket as we reused it
                raise NotDelivered(_describe(exc)) from None
            except BaseException:
                conn.close()
                raise
            if rest is not None:
                await _send_rest(conn, rest[1])
            if on_sent is not None:
                on_sent()
            try:
                response_head = await conn.read_head(read_timeout)
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                    UpstreamError) as exc:
                conn.close()
                if reused and not isinstance(exc, UpstreamError):
                    continue  # the server closed an idle socket as we reused it: nothing was processed
                raise UpstreamError(_describe(exc)) from None
            except BaseException:
                conn.close()
                raise
            return Response(self, conn, response_head, read_timeout)

    async def get(self, target: str) -> tuple[int, bytes]:
        """A whole GET (health checks): status and body. Bound it with a cancel scope."""
        response = await self.request("GET", target, limited=False)
        try:
            return response.status, await response.read()
        finally:
            response.aclose_now()

    def give_back(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle or not conn.reader.reusable:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        self._returned.unpark()

    def close(self) -> None:
        """Close idle connections; ones in use close as their responses end."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        self._returned.unpark_all()

    def _take_idle(self) -> _Connection | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()  # most recent first: the least likely to have timed out
            if now - conn.idle_since < self.idle_timeout and not conn.stale():
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise NotDelivered("the backend's connections are closed (it is stopping)")
        self._open += 1  # counted from the start: others waiting on max_open see it at once
        try:
            stream, sock = await self._open_stream()
        except BaseException:
            self._connection_closed()
            raise
        return _Connection(stream, sock, self._connection_closed)

    async def _open_stream(self) -> tuple[trio.abc.Stream, trio.socket.SocketType]:
        where = f"port {self.port}" if self.host == "127.0.0.1" else f"{self.host}:{self.port}"
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                stream: trio.abc.Stream = tcp
                if self._tls is not None:
                    stream = trio.SSLStream(tcp, self._tls, server_hostname=self.host, https_compatible=True)
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        tcp.socket.close()
                        raise
        except trio.TooSlowError:
            raise NotDelivered(f"timed out connecting to the backend on {where}") from None
        except (OSError, trio.BrokenResourceError) as exc:
            # trio reports each attempt's error in a group behind its own summary
            cause = exc.__cause__
            attempts = cause.exceptions if isinstance(cause, BaseExceptionGroup) else [cause or exc]
            reason = getattr(attempts[-1], "strerror", None) or str(attempts[-1])
            raise NotDelivered(f"cannot reach the backend on {where}: {reason}") from None
        return stream, tcp.socket

    def _connection_closed(self) -> None:
        self._open -= 1
        self._returned.unpark()


#: How a connection breaks under a read: the server's bytes, or the socket.
_BROKEN = (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _gap(read_timeout: float) -> UpstreamError:
    return UpstreamError(f"no data from the backend for {read_timeout:g} s (server.upstream_read_timeout)")


async def _send_rest(conn: _Connection, rest: AsyncIterable[bytes]) -> None:
    """Relay an upload's remaining bytes as they come; a break is the backend's failure (the
    request went out in part: it is never sent again)."""
    try:
        async for chunk in rest:  # the proxy's generator ends (or raises) before this returns
            await conn.stream.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        conn.close()
        raise UpstreamError(f"the upload broke off: {_describe(exc)}") from None
    except BaseException:
        conn.close()
        raise


def _write_now(sock: trio.socket.SocketType, data: bytes) -> int:
    """Write what the socket's buffer takes now, without waiting; how much (OSError: broken)."""
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0


def first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes:
    """The first value of header ``name`` (lower-case, as ``http1`` and ASGI give names), or b""."""
    for key, value in headers:
        if key == name:
            return value
    return b""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return f"the backend broke the connection ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"the backend's connection failed: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
