"""The client's side of one proxied exchange: what has been sent, and what the record says.

Owns sending the answer's start and body to the client (so that an error is told the right way:
a JSON error before anything was sent, an SSE event once a stream has started, nothing after the
end) and the facts the request's record is made of (status, time to first byte, queue wait,
bytes, tokens from the answer's usage), and noticing that the client hung up
(``cancel_on_disconnect``). It must not choose backends or read from them: the proxy hands it
what to send.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import trio
from hypercorn.typing import ASGIReceiveCallable

from routerd.errors import RouterdError
from routerd.front import usage
from routerd.front.client_io import ResponseSink

if TYPE_CHECKING:
    from routerd.front.uploads import Upload


def sse_error(error: RouterdError) -> bytes:
    """An error as one server-sent event, for a stream whose status line is already sent."""
    return b"data: " + json.dumps(error.openai_body()).encode() + b"\n\n"


class Exchange:
    """The client's side of one exchange: what has been sent decides how an error is told, and
    what the request's record (metrics, the request log) says."""

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink
        self.started = False
        self.event_stream = False
        self.finished = False
        self.began = time.monotonic()
        #: The catalog name of the model asked for ("" until known, or for an unknown name).
        self.model = ""
        self.status: int | None = None
        self.first_byte: float | None = None
        self.queue_wait: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.cancelled = False
        self.error: str | None = None
        self.feedback = False
        #: The virtual model asked for, when a selector chose ``model``; the endpoint that served.
        self.selector: str | None = None
        #: The body fields its model's rewriting changed (models.NAME.defaults/override/strip).
        self.rewritten: list[str] = []
        #: An upload relayed as it arrives (its form's first bytes are the request's body).
        self.upload: Upload | None = None
        self.endpoint: str | None = None
        #: Said with the answer: which model served (``x-routerd-model``).
        self.routing_headers: list[tuple[bytes, bytes]] = []
        self.answer: bytes = b""
        #: The backend finishes this request's work even if the client leaves (a batch).
        self.runs_to_end = False
        #: The request has gone out to a backend whole.
        self.sent = False
        self.stream_tail: list[bytes] = []

    async def start(self, status: int, headers: list[tuple[bytes, bytes]], *, event_stream: bool = False) -> None:
        self.started = True
        self.event_stream = event_stream
        self.status = status
        await self._sink.start(status, self._with_routing(headers))

    def _with_routing(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        if self.routing_headers or self.endpoint:
            headers = headers + self.routing_headers
            if self.endpoint:
                headers.append((b"x-routerd-endpoint", self.endpoint.encode()))
        return headers

    async def send_whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole answer at once (one write where the connection allows)."""
        self.started = self.finished = True
        self.status = status
        self.bytes_out += len(body)
        await self._sink.answer(status, self._with_routing(headers), body)

    async def body(self, chunk: bytes, *, more: bool = True) -> None:
        self.finished = not more
        self.bytes_out += len(chunk)
        await self._sink.body(chunk, more)

    async def raw(self, framed: bytes, size: int, *, more: bool = True) -> None:
        """Chunk-framed bytes passed through as they are; ``size`` is the data they carry."""
        self.finished = not more
        self.bytes_out += size
        await self._sink.raw(framed, more)

    @property
    def chunked(self) -> bool:
        """The answer goes out in HTTP/1.1 chunks: an upstream's chunks may pass as they are."""
        return self._sink.chunked

    def answer_began(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic()

    def keep_for_usage(self, chunk: bytes) -> None:
        """Keep what a stream's token counts will be read from: the last chunk that has them
        (kept, not copied), and the next one in case the event was split across reads."""
        if usage.has_marker(chunk):
            self.stream_tail[:] = [chunk]
        elif self.stream_tail and len(self.stream_tail) < 2:
            self.stream_tail.append(chunk)

    def tokens(self) -> tuple[int, int] | None:
        """Token counts of the backend's answer, from its usage or timings (never changed)."""
        if self.answer:
            return usage.from_body(self.answer)
        if self.stream_tail:
            return usage.from_stream_tail(b"".join(self.stream_tail))
        return None

    def was_sent(self) -> None:
        self.sent = True

    def left(self) -> None:
        """The client hung up (before the end of the answer: a cancelled request)."""
        self.cancelled = not self.finished

    async def fail(self, error: RouterdError) -> None:
        self.error = error.code
        if self.finished:
            return
        if not self.started:
            payload = json.dumps(error.openai_body()).encode()
            headers = [(b"content-type", b"application/json")]
            headers += [(k.lower().encode(), v.encode()) for k, v in error.http_headers()]
            await self.send_whole(error.status, headers, payload)
        elif self.event_stream:  # the status line is sent: report in-band, as OpenAI streams do
            await self.body(sse_error(error), more=False)
        else:
            await self.body(b"", more=False)


async def cancel_on_disconnect(receive: ASGIReceiveCallable, scope: trio.CancelScope,
                               client: Exchange | None = None) -> None:
    """Cancel ``scope`` when the client hangs up (noting it on ``client``, if given)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if client is not None:
        client.cancelled = not client.finished
    scope.cancel()
