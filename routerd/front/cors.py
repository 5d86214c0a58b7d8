"""Cross-origin requests from browser pages (chat UIs), allowed only for listed origins.

Owns the CORS headers routerd sends: none at all unless ``server.cors_origins`` lists the
request's ``Origin`` (or ``"*"``), and the answer to a browser's preflight ``OPTIONS``. A
preflight carries no credentials by design, so it is answered before the key check; the real
request that follows must carry its key like any other. It must not decide who may use a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from routerd.front.client_io import ResponseSink

#: What a page may send: JSON bodies, keys both ways, routerd's own request headers.
ALLOWED_HEADERS = b"authorization, content-type, x-api-key, x-request-priority, anthropic-version"
ALLOWED_METHODS = b"GET, POST, OPTIONS"
#: How long a browser may reuse a preflight's answer (seconds).
MAX_AGE = b"600"


def allowed_origin(origin: bytes, allowed: Sequence[str]) -> bytes:
    """The origin to echo back, or b"" when the page's origin is not allowed (pure)."""
    if not origin:
        return b""
    if "*" in allowed or origin.decode("latin-1") in allowed:
        return origin
    return b""


def response_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    # The origin is echoed, never "*": a page's Authorization header is then allowed too, and
    # Vary keeps shared caches from serving one origin's answer to another.
    return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]


async def answer_preflight(sink: ResponseSink, origin: bytes) -> None:
    """204 to a preflight: with the permissions for an allowed origin, bare for any other (the
    browser then blocks the page's request)."""
    headers = []
    if origin:
        headers += [*response_headers(origin), (b"access-control-allow-methods", ALLOWED_METHODS),
                    (b"access-control-allow-headers", ALLOWED_HEADERS), (b"access-control-max-age", MAX_AGE)]
    await sink.answer(204, headers, b"")
