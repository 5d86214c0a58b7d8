"""The two ends of one client request as the handlers see them: its body in, its answer out.

Owns the small interfaces between a connection and a handler (``RequestBody``, ``ResponseSink``),
so that the proxy relays without ASGI on routerd's own HTTP/1.1 connections (``h1_connection``)
and the same code serves hypercorn's HTTP/2 ones through the ASGI adapters here
(``AsgiBody``, ``AsgiSink``); and the ASGI callables made from the interfaces, for the
quart-trio app on routerd's connections (``asgi_receive``, ``asgi_send``). It must not parse
HTTP or know routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
)


class RequestBody(Protocol):
    """The client's request body, and its leaving."""

    async def receive(self) -> tuple[bytes, bool] | None:
        """The next piece of the body and whether more follows; None once the client left."""
        ...

    def watch(self, on_leave: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        """Within the block, the client leaving calls ``on_leave`` (at once if it has left)."""
        ...

    def received(self) -> bytes | None:
        """The whole body if all of it has arrived already (taken: no wait), else None."""
        ...

    @property
    def awaiting_continue(self) -> bool:
        """The client waits for ``100 Continue`` before it sends the body (none was sent)."""
        ...


class ResponseSink(Protocol):
    """Where the answer goes: its start, then its body in order."""

    @property
    def chunked(self) -> bool:
        """Whether the answer goes out in HTTP/1.1 chunks (known once started): then ``raw``
        takes an upstream's chunks as they came, framing included."""
        ...

    def add_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Headers sent with the answer's start whatever the handler says (CORS)."""
        ...

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ...

    async def answer(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        """The whole answer: start and body at once (its Content-Length is the sink's to add)."""
        ...

    async def body(self, data: bytes, more: bool) -> None:
        ...

    async def raw(self, data: bytes, more: bool) -> None:
        """Bytes already framed in the chunked coding (only where ``chunked``)."""
        ...


class AsgiBody:
    """``RequestBody`` over an ASGI ``receive`` (hypercorn's HTTP/2 streams)."""

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive

    async def receive(self) -> tuple[bytes, bool] | None:
        message = await self._receive()
        if message["type"] != "http.request":  # the only other event of an HTTP request: http.disconnect
            return None
        return message.get("body", b""), message.get("more_body", False)

    def received(self) -> bytes | None:
        return None

    awaiting_continue = False  # hypercorn answers Expect itself

    @asynccontextmanager
    async def watch(self, on_leave: Callable[[], None]) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_disconnect, on_leave)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    async def _until_disconnect(self, on_leave: Callable[[], None]) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        on_leave()


class AsgiSink:
    """``ResponseSink`` over an ASGI ``send``."""

    chunked = False

    def __init__(self, send: ASGISendCallable) -> None:
        self._send = send
        self._extra: list[tuple[bytes, bytes]] = []

    def add_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._extra += headers

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers + self._extra})

    async def answer(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        await self.start(status, headers + [(b"content-length", b"%d" % len(data))])
        await self.body(data, False)

    async def body(self, data: bytes, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def raw(self, data: bytes, more: bool) -> None:
        raise NotImplementedError("an ASGI server frames the body itself")

    def asgi_send(self) -> ASGISendCallable:
        """``send`` with the added headers on the start (the original when there are none)."""
        if not self._extra:
            return self._send
        return asgi_send(self)


def asgi_send(sink: ResponseSink) -> ASGISendCallable:
    """An ASGI ``send`` that writes to ``sink`` (for an ASGI app on routerd's own connections)."""
    async def send(message: ASGISendEvent) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            start = cast(HTTPResponseStartEvent, message)
            await sink.start(start["status"], list(start.get("headers", ())))
        elif kind == "http.response.body":
            body = cast(HTTPResponseBodyEvent, message)
            await sink.body(bytes(body.get("body", b"")), body.get("more_body", False))
    return send


def asgi_receive(body: RequestBody, disconnected: Callable[[], trio.Event]) -> ASGIReceiveCallable:
    """An ASGI ``receive`` over ``body``: its pieces, then ``http.disconnect`` once
    ``disconnected()`` is set (the client left, or the connection is done with the request)."""
    ended = False

    async def receive() -> ASGIReceiveEvent:
        nonlocal ended
        if not ended:
            piece = await body.receive()
            if piece is not None:
                data, more = piece
                ended = not more
                return {"type": "http.request", "body": data, "more_body": more}
            ended = True
        await disconnected().wait()
        return {"type": "http.disconnect"}
    return receive


#: How much of a request body no one will use is read and dropped, and for how long, to keep its
#: connection usable (see ``drain``).
DRAIN_LIMIT = 1 << 20
DRAIN_SECONDS = 1.0


async def drain(body: RequestBody) -> bool:
    """Read and drop a request body that will not be used (a refusal, or a handler that did not
    read it); whether it was read to its end.

    A server that answers while the body is still arriving must close the connection after the
    answer (the unread rest would be taken for the next request), and a keep-alive client that
    sent its next request in the meantime sees it fail. Up to ``DRAIN_LIMIT`` bytes, read within
    ``DRAIN_SECONDS``, keep the connection; past that it is closed after the answer. A client
    waiting for ``100 Continue`` is not asked for a body that will not be used (RFC 9110,
    section 10.1.1): the answer goes first and the connection ends after it."""
    if body.awaiting_continue:
        return False
    size = 0
    with trio.move_on_after(DRAIN_SECONDS):
        while size <= DRAIN_LIMIT:
            piece = await body.receive()
            if piece is None:
                return False
            size += len(piece[0])
            if not piece[1]:
                return True
    return False
