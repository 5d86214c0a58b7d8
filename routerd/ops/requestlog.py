"""The request log: one line per finished proxied request, on the ``routerd.requests`` logger.

Owns the line's words. It listens on the event bus (``EventType.REQUEST``); a text line is short
enough for the journal to stay readable, and under ``logging.format = "json"`` the same fields
ride on the record (``logs.JsonFormatter`` writes them out). It must not count anything (metrics
do) or touch requests.
"""

from __future__ import annotations

import logging
from typing import Any

from routerd import events

log = logging.getLogger("routerd.requests")
#: The attribute of a log record that carries the request's fields.
FIELDS = "request"


def line(model: str, data: dict[str, Any]) -> str:
    """The text of one request's line (pure)."""
    parts = [model or "-", data["method"], data["route"], str(data["status"]), f"{data['duration']:.3f}s"]
    if data.get("selector"):
        parts.append(f"via={data['selector']}")
    if data.get("endpoint") and data["endpoint"] != model:
        parts.append(f"endpoint={data['endpoint']}")
    if data.get("ttfb") is not None:
        parts.append(f"ttfb={data['ttfb']:.3f}s")
    if data.get("queue_wait") is not None:
        parts.append(f"queue={data['queue_wait']:.3f}s")
    if data.get("prompt_tokens") is not None:
        parts.append(f"tokens={data['prompt_tokens']}/{data['completion_tokens']}")
    parts.append(f"in={data['bytes_in']}B out={data['bytes_out']}B")
    parts.append(f"client={data['client']}")
    if data.get("key"):
        parts.append(f"key={data['key']}")
    if data.get("stream"):
        parts.append("stream")
    if data.get("rewritten"):
        parts.append(f"rewritten={','.join(data['rewritten'])}")
    if data.get("error"):
        parts.append(f"error={data['error']}")
    if data.get("cancelled"):
        parts.append("cancelled")
    return " ".join(parts)


#: The event types this log writes, and those it leaves to others (tests hold the two to
#: ``EventType`` whole, so a new type is a decision, not an omission).
HANDLED = frozenset({events.EventType.REQUEST})
#: Model and daemon events: routerd's own log already says them in its words.
IGNORED = frozenset({
    events.EventType.MODEL_LOADING, events.EventType.MODEL_PROGRESS, events.EventType.MODEL_LOG,
    events.EventType.MODEL_READY, events.EventType.MODEL_STOPPING, events.EventType.MODEL_STOPPED,
    events.EventType.MODEL_FAILED, events.EventType.MODEL_EVICTED, events.EventType.MODEL_CRASH_LOOP,
    events.EventType.QUEUE_HIGH, events.EventType.QUEUE_NORMAL, events.EventType.REMOTE_REACHABLE,
    events.EventType.REMOTE_UNREACHABLE, events.EventType.CATALOG_RESCAN, events.EventType.CONFIG_RELOAD,
    events.EventType.DROPPED, events.EventType.PULL_PROGRESS, events.EventType.PULL_DONE,
    events.EventType.PULL_FAILED, events.EventType.MODEL_REMOVED, events.EventType.MODEL_LOAD_REFUSED,
    events.EventType.SLOTS_SAVED, events.EventType.SLOTS_RESTORED, events.EventType.SLOTS_REMOVED})


def observe(event: events.Event) -> None:
    """A bus listener: log ``event`` if it is a finished request."""
    if event.type in HANDLED and log.isEnabledFor(logging.INFO):
        log.info("%s", line(event.model or "", event.data),
                 extra={FIELDS: {"model": event.model or None, **event.data}})
