"""Uploads: request bodies relayed as they arrive (OpenAI's audio routes send ``multipart/form-data``).

A JSON request is small and read whole; an upload may be tens of MiB. For a form, the proxy
needs only the ``model`` field, which clients send before the file (the OpenAI SDKs and curl
``-F`` in order do): ``read_upload`` reads the body only until that field has arrived whole and
hands the rest over as ``Upload.rest``, which the upstream pool sends on as the client sends it,
so routerd holds one piece at a time. A form whose ``model`` comes after its file is read whole
first; either way the body is bounded by ``server.max_body_bytes`` (413) and
``server.body_timeout`` (408), as every body is. Owns that reading; no routing decisions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import trio

from routerd.backends.upstream import first_header
from routerd.errors import BadRequest, PayloadTooLarge, RequestTimeout
from routerd.front.access import Scope
from routerd.front.client_io import RequestBody
from routerd.front.requested import form_boundary, form_model


@attrs.define
class Upload:
    """A form on its way: its model, what was read of it, and how many bytes are still to come."""

    model: str
    head: bytes
    remaining: int
    body: RequestBody
    timeout: float

    async def rest(self) -> AsyncIterator[bytes]:
        """The body's remaining bytes as the client sends them (exactly ``remaining``), all of
        them within ``timeout`` (checked around each receive: no cancel scope spans a yield)."""
        left = self.remaining
        deadline = trio.current_time() + self.timeout
        while left > 0:
            piece = await self._receive(deadline)
            if piece is None:  # not the backend's failure: nothing is held against it
                raise BadRequest("the client left during its upload", code="upload_abandoned")
            chunk, more = piece
            chunk = chunk[:left]
            left -= len(chunk)
            yield chunk
            if not more:
                break
        if left:
            raise BadRequest(f"the upload ended {left} bytes short of its Content-Length", code="truncated_body")

    async def _receive(self, deadline: float) -> tuple[bytes, bool] | None:
        with trio.move_on_at(deadline):
            return await self.body.receive()
        raise RequestTimeout(f"the upload did not arrive within {self.timeout:g} s (server.body_timeout)")


async def read_upload(scope: Scope, body: RequestBody, limit: int, within: float) -> Upload | None:
    """The ``model`` of a form and what was read to learn it, the rest left to stream; None when
    the client left. BadRequest for a body that is not a form with a ``model`` field."""
    headers = scope["headers"]
    boundary = form_boundary(first_header(headers, b"content-type"))
    if boundary is None:
        raise BadRequest("this route takes multipart/form-data (a file and a 'model' field)", code="invalid_body")
    declared = first_header(headers, b"content-length").decode("latin-1")
    total = int(declared) if declared.isdigit() else None
    if total is not None and total > limit:
        raise PayloadTooLarge(f"request body is {total} bytes; the limit is {limit} (server.max_body_bytes)")
    head = body.received() or b""
    model = form_model(head, boundary) if head else None
    done = bool(head) and total is not None and len(head) >= total
    with trio.move_on_after(within) as waited:
        # Until the model is known; without a length to forward, the whole body (bounded).
        while (model is None or total is None) and not done:
            piece = await body.receive()
            if piece is None:
                return None
            chunk, more = piece
            head += chunk
            if len(head) > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (server.max_body_bytes)")
            if model is None:
                model = form_model(head, boundary)
            done = not more
    if waited.cancelled_caught:
        raise RequestTimeout(f"the request body did not arrive within {within:g} s (server.body_timeout)")
    if model is None:
        raise BadRequest("the form has no 'model' field: name the model to use (GET /v1/models lists them)",
                         code="missing_model")
    return Upload(model, head, max(0, total - len(head)) if total is not None else 0, body, within)
