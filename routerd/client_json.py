"""JSON from clients: parsing that turns every way a document can be bad into one error.

Owns the rules both fronts apply to what a client sends (the HTTP bodies routerd reads and the
control socket's lines): invalid UTF-8, invalid JSON, nesting deeper than a limit and integers
longer than Python will convert are all ``InvalidJson``, the client's fault, never an exception
that escapes its connection. It must not know about HTTP, JSON-RPC or models.
"""

from __future__ import annotations

import json
from typing import Any

#: Nesting the parser itself survives: beyond about this many levels CPython's decoder raises
#: RecursionError (its limit depends on the stack in use), which is reported as too deep.
PARSER_DEPTH_LIMIT = 900


class InvalidJson(ValueError):
    """A client's document that routerd will not read; the message says why."""


def loads(data: bytes | str, *, max_depth: int | None = None) -> Any:
    """Parse ``data``; InvalidJson for anything wrong with it, including nesting deeper than
    ``max_depth`` (None: as deep as the parser goes)."""
    try:
        # Explicitly UTF-8 (RFC 8259): json.loads would guess UTF-16 or -32 from the first bytes.
        value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJson(f"nested more than about {PARSER_DEPTH_LIMIT} levels deep") from None
    except ValueError as exc:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise InvalidJson(f"not a JSON value routerd can read: {exc}") from None
    if max_depth is not None and depth_exceeds(value, max_depth):
        raise InvalidJson(f"nested more than {max_depth} levels deep")
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels (pure, iterative)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in item)
    return False
