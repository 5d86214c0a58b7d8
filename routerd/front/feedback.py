"""Loading feedback for chat UIs: what a waiting streaming chat request is told, and how.

Owns the words ("loading gemma3-270m: 45%", "evicting X to make room", "queued behind 3
requests") and the chunk that carries them: an OpenAI ``chat.completion.chunk`` whose delta has
only ``reasoning_content``, which chat UIs show as the model's thinking and SDKs parse like any
other chunk. Pure functions; the proxy decides when to send (``scheduler.loading_feedback`` or the
model's own setting) and the supervisor says what is happening (``Supervisor.wait_info``).
"""

from __future__ import annotations

import json
import secrets

from routerd.backends.status import WaitInfo

#: The routes whose streams are OpenAI chat completions.
CHAT_ROUTES = frozenset({"/v1/chat/completions", "/chat/completions"})
#: Loading progress is only said as a percentage below this share of the last load's time.
_MAX_SHOWN_PROGRESS = 0.99


def describe(info: WaitInfo) -> str:
    """One line about what the request waits for (pure)."""
    model = info.model
    if info.phase == "queued":
        ahead = f"{info.ahead} request{'s' if info.ahead != 1 else ''}" if info.ahead else "no one"
        return f"queued for {model}: {info.running} running, behind {ahead}"
    if info.phase == "evicting":
        return f"evicting {', '.join(info.others)} to make room for {model}"
    if info.phase == "busy":
        return f"waiting for room for {model}: {', '.join(info.others) or 'other models'} busy"
    if info.phase == "loading":
        if info.last_load:
            share = min(_MAX_SHOWN_PROGRESS, info.elapsed / info.last_load)
            return f"loading {model}: {share:.0%} ({info.elapsed:.1f} s; its last load took {info.last_load:.1f} s)"
        return f"loading {model}: {info.elapsed:.1f} s"
    if info.phase == "stopping":
        return f"waiting for the previous {model} process to stop"
    if info.phase == "backoff":
        return f"restarting {model} after a failure"
    return f"starting {model}"


def reasoning_chunk(model: str, text: str, *, completion_id: str, created: int) -> bytes:
    """``text`` as one SSE event of a chat completion stream (pure)."""
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": text + "\n"},
                          "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def completion_id() -> str:
    return "chatcmpl-routerd-" + secrets.token_hex(8)
