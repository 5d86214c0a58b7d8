"""Forwarding one request to a backend and relaying the answer, streaming included.

Owns the upstream call (headers filtered, body passed through untouched), the response body
that streams chunks as they arrive and, when closed for any reason (end, error, client gone),
closes the upstream connection at once (llama-server then stops generating) and releases the
backend. It must not choose a backend; the caller passes one it acquired.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import httpx
import trio

from routerd.backend import Backend
from routerd.errors import RouterdError, UpstreamFailed

log = logging.getLogger("routerd.proxy")

#: What a dying backend raises at us: httpx errors, and httpx's "client has been closed"
#: RuntimeError when the backend's client closes as its process is reaped.
_BROKEN = (httpx.HTTPError, trio.BrokenResourceError, trio.ClosedResourceError, RuntimeError)

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade", "host", "content-length"})


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers to pass on, without hop-by-hop ones (pure)."""
    return [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]


class UpstreamBody:
    """The backend's response body as an async iterator that owns the backend lease."""

    def __init__(self, response: httpx.Response, backend: Backend) -> None:
        self._response = response
        self._backend = backend
        self._chunks = response.aiter_raw()
        self._closed = False
        self.status = response.status_code
        self.is_event_stream = response.headers.get("content-type", "").startswith("text/event-stream")

    def headers(self) -> list[tuple[str, str]]:
        """Headers for the client: the backend's, plus no-buffering hints on event streams."""
        headers = forward_headers(self._response.headers.multi_items())
        if self.is_event_stream:
            headers += [("X-Accel-Buffering", "no"), ("Cache-Control", "no-cache")]
        return headers

    def __aiter__(self) -> UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except _BROKEN as exc:
            # Headers are sent; the status cannot change. Tell an SSE client in-band, then end.
            log.warning("%s: stream broke: %s", self._backend.name, exc)
            await self.aclose()
            if self.is_event_stream:
                return sse_error(await _failure(self._backend, exc, "mid-stream"))
            raise

    async def read_all(self) -> bytes:
        """The whole body (for answers that are not event streams), or UpstreamFailed (502)."""
        try:
            return await self._response.aread()
        except _BROKEN as exc:
            raise await _failure(self._backend, exc) from None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend.release()
        with trio.CancelScope(shield=True):  # runs during a client-disconnect cancellation too
            await self._response.aclose()


def sse_error(error: RouterdError) -> bytes:
    """An error as one server-sent event, for a stream whose status line is already sent."""
    return b"data: " + json.dumps(error.openai_body()).encode() + b"\n\n"


async def open_upstream(backend: Backend, method: str, path: str, *, headers: Iterable[tuple[str, str]],
                        body: bytes, query: bytes = b"") -> UpstreamBody:
    """Send the request to ``backend`` (already acquired) and return once headers arrive.

    On failure the backend is released and UpstreamFailed raised (the process died or broke
    the connection before answering).
    """
    assert backend.client is not None
    try:
        request = backend.client.build_request(
            method, path, headers=forward_headers(headers), content=body,
            params=query.decode("latin-1") if query else None)
        response = await backend.client.send(request, stream=True)
    except BaseException as exc:
        backend.release()
        if isinstance(exc, _BROKEN):
            raise await _failure(backend, exc) from None
        raise
    return UpstreamBody(response, backend)


async def _failure(backend: Backend, exc: BaseException, when: str = "") -> UpstreamFailed:
    """The 502 for a broken upstream call, with the backend's own reason when it died."""
    with trio.move_on_after(1.0):  # a dying process: wait (briefly) for its exit status, the real reason
        await backend.wait_gone()
    why = backend.error or f"{type(exc).__name__}: {exc}"
    return UpstreamFailed(f"backend for {backend.name!r} failed{' ' + when if when else ''}: {why}",
                          data={"exit_code": backend.exit_code})
