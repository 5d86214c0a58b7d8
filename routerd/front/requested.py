"""What a proxied request asks for, and what of it is passed on: pure functions of its bytes.

Owns reading a request body's ``model``, ``stream`` and ``user`` (400 for a body that is not a
JSON object or names no model), a body renamed for a remote that knows the model by another
name, which model a passthrough path or query names (``split_model_path``, ``model_in_query``),
and which headers go on to a backend and back (``forward_headers``). No I/O and no decisions
about backends: the proxy reads the bytes and calls these.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable
from typing import Any

import attrs

from routerd import client_json
from routerd.errors import BadRequest

#: Never passed on: hop-by-hop headers, and credentials (a backend has its own key, and a
#: client's key is for routerd alone).
_NOT_FORWARDED = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                            b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
                            b"authorization", b"x-api-key", b"cookie", b"set-cookie"})
#: CORS is routerd's decision (server.cors_origins), never a backend's: llama-server allows every
#: origin by default. A remote routerd's routing headers are its own: ours say what we chose.
_DROPPED_PREFIXES = (b"access-control-", b"x-routerd-")


def forward_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers to pass on, either way: without hop-by-hop ones, credentials and CORS (pure;
    names are lower-case bytes)."""
    return [(k, v) for k, v in headers
            if (name := k.lower()) not in _NOT_FORWARDED and not name.startswith(_DROPPED_PREFIXES)]


@attrs.frozen
class Requested:
    """What a proxied request's JSON body asks for."""

    model: str
    stream: bool = False
    #: The body's ``user`` (a session key when there is no X-Session-Id header).
    user: str | None = None


def read_request(body: bytes) -> Requested:
    """The ``model`` field of a JSON request body (400 when missing or malformed), whether it
    asks for a stream, and its ``user``."""
    payload = _json_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the request has no 'model' field: name the model to use (GET /v1/models lists them)",
                         code="missing_model")
    user = payload.get("user")
    return Requested(model, payload.get("stream") is True, user if isinstance(user, str) and user else None)


#: POST routes whose body is ``multipart/form-data`` (an upload), with ``model`` a form field.
FORM_POST = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})


def form_boundary(content_type: bytes) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type (pure), or None for another type."""
    kind, _, params = content_type.partition(b";")
    if kind.strip().lower() != b"multipart/form-data":
        return None
    for param in params.split(b";"):
        name, _, value = param.strip().partition(b"=")
        if name.strip().lower() == b"boundary" and value.strip(b' "'):
            return value.strip(b' "')
    return None


def form_model(data: bytes, boundary: bytes) -> str | None:
    """The ``model`` field of a multipart body's first bytes ``data`` (pure): None while it has
    not arrived whole; BadRequest when the form ended without one."""
    delimiter = b"--" + boundary
    position = data.find(delimiter)
    while position >= 0:
        start = position + len(delimiter)
        if data[start:start + 2] == b"--":  # the closing delimiter: no model field
            raise BadRequest("the form has no 'model' field: name the model to use (GET /v1/models lists them)",
                             code="missing_model")
        head_end = data.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        following = data.find(b"\r\n" + delimiter, head_end + 4)
        if following < 0:
            return None
        headers = data[start:head_end].decode("latin-1").lower()
        if 'name="model"' in headers.replace(" ", "") or "name=model" in headers.replace(" ", ""):
            value = data[head_end + 4:following].decode("utf-8", "replace").strip()
            if not value:
                raise BadRequest("the form's 'model' field is empty", code="missing_model")
            return value
        position = following + 2
    return None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = client_json.loads(body)
    except client_json.InvalidJson as exc:
        raise BadRequest(f"request body is {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return payload


def renamed(body: bytes, model: str) -> bytes:
    """``body`` asking for ``model`` instead (for a remote that knows the model by another name)."""
    payload = _json_object(body)
    payload["model"] = model
    return json.dumps(payload).encode()


#: POST routes whose work runs in one of llama-server's slots and may take ``id_slot``: a
#: sticky session's conversation goes back to the slot that holds it.
SLOTTED_POST = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
                          "/completion"})


def with_slot(body: bytes, slot: int) -> bytes:
    """``body`` sent to llama-server's slot ``slot`` (``id_slot``), unless it names one itself."""
    payload = _json_object(body)
    if "id_slot" in payload:
        return body
    payload["id_slot"] = slot
    return json.dumps(payload).encode()


#: GET paths whose ``?model=`` query names the backend they go to (router mode's convention);
#: without one, routerd answers them itself.
MODEL_QUERY_GET = frozenset({"/props", "/metrics"})


def model_in_query(query: bytes) -> str | None:
    """The ``model`` a query string names (``?model=M``, router mode's way for ``/props`` and
    ``/metrics``), or None (pure)."""
    for value in urllib.parse.parse_qs(query.decode("latin-1")).get("model", []):
        if value:
            return value
    return None


def split_model_path(rest: str, names: Iterable[str]) -> tuple[str, str]:
    """Split ``{model}/{path}`` (pure): the longest known model name or alias that prefixes it
    wins, so names with ``/`` and ``:`` (``org/repo:Q4_K_M``) are unambiguous; otherwise the
    first segment."""
    best = max((name for name in names if rest.startswith(name + "/")), key=len, default="")
    if not best:
        best = rest.split("/", 1)[0]
    return best, rest[len(best) + 1:]
