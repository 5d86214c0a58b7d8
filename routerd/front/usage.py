"""Token counts of an answer, read from what llama-server already sends.

Owns finding ``prompt`` and ``completion`` tokens in a response body or a stream's last events:
the OpenAI ``usage`` object (``prompt_tokens``/``completion_tokens``), the Anthropic and
Responses API spellings (``input_tokens``/``output_tokens``), and llama-server's ``timings``
(``prompt_n`` + ``cache_n``, ``predicted_n``) where there is no ``usage`` (its streams carry
``usage`` only when the client asked for it). Pure functions: the proxy keeps the bytes it relays
unchanged and hands them here.
"""

from __future__ import annotations

import json
from typing import Any

#: Markers worth parsing a body or an event for; most stream events have neither.
MARKERS = (b'"usage"', b'"timings"')


def has_marker(data: bytes) -> bool:
    return b'"usage"' in data or b'"timings"' in data


def from_payload(payload: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of one JSON document, or None when it has no counts (pure)."""
    if not isinstance(payload, dict):
        return None
    for holder in (payload, payload.get("response"), payload.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            usage = holder["usage"]
            prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
            completion = usage.get("completion_tokens", usage.get("output_tokens"))
            if isinstance(prompt, int) or isinstance(completion, int):
                return (prompt if isinstance(prompt, int) else 0, completion if isinstance(completion, int) else 0)
    timings = payload.get("timings")
    if isinstance(timings, dict):
        prompt = _int(timings.get("prompt_n")) + _int(timings.get("cache_n"))
        return prompt, _int(timings.get("predicted_n"))
    return None


def from_body(body: bytes) -> tuple[int, int] | None:
    """Counts of a whole JSON answer (pure)."""
    if not has_marker(body):
        return None
    try:
        return from_payload(json.loads(body))
    except ValueError:
        return None


def from_stream_tail(tail: bytes) -> tuple[int, int] | None:
    """Counts from the last events of an SSE stream (pure): the last event that has them."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data:") and has_marker(line):
            try:
                found = from_payload(json.loads(line[5:]))
            except ValueError:
                continue
            if found is not None:
                return found
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
