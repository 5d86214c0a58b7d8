"""Event types are defined once (``EventType``) and every consumer decides about each of them.

A consumer that silently ignores a type it should count is the bug these tests exist for: an
event type added to routerd must be handled or explicitly ignored by the metrics, the request
log and ``routerctl events`` (and named by the page from the same list), or these fail.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from routerctl.output import EVENT_DETAILS, format_event
from routerd import events
from routerd.events import EventType
from routerd.ops import requestlog
from routerd.ops.metrics import Metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALL = frozenset(EventType)


@pytest.mark.parametrize(("consumer", "handled", "ignored"), [
    ("metrics", frozenset(Metrics._handlers), Metrics.IGNORED_EVENTS),
    ("request log", requestlog.HANDLED, requestlog.IGNORED),
])
def test_each_consumer_handles_or_explicitly_ignores_every_type(consumer, handled, ignored):
    assert not handled & ignored, f"{consumer}: both handled and ignored: {sorted(handled & ignored)}"
    assert handled | ignored == ALL, f"{consumer}: no decision for {sorted(ALL - handled - ignored)}"


def test_routerctl_words_every_type():
    assert set(EVENT_DETAILS) == ALL


@pytest.mark.parametrize("kind", sorted(ALL))
def test_routerctl_prints_each_type_as_more_than_its_name(kind):
    fields = {"load_seconds": 1.5, "window": 60.0, "failures": 3, "depth": 4, "max_queue": 8, "remote": "b",
              "line": "loading", "reason": "idle", "cause": "memory", "for": "x", "error": "boom",
              "method": "POST", "route": "/v1/chat/completions", "status": 200, "duration": 0.1, "ok": True}
    event = {"type": str(kind), "model": "m", "time": 0, **fields}
    detail = EVENT_DETAILS[kind](str(kind), event)
    assert detail.strip() and detail.strip() != str(kind)
    line = format_event(event)
    assert line.endswith(f" {detail}") and line.split(None, 2)[2].strip() != str(kind)


def _published_types() -> list[tuple[str, int, ast.expr]]:
    """Every ``.publish(FIRST, ...)`` call in routerd, with its first argument."""
    found = []
    for path in (ROOT / "routerd").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "publish"
                    and node.args):
                found.append((str(path.relative_to(ROOT)), node.lineno, node.args[0]))
    return found


def _names_a_member(first: ast.expr) -> bool:
    """``EventType.NAME`` or ``events.EventType.NAME``, NAME a member: the type is visible where
    it is published (a computed type, ``EventType(f"...")`` or a variable, could be any string)."""
    if not (isinstance(first, ast.Attribute) and first.attr in EventType.__members__):
        return False
    owner = first.value
    return ((isinstance(owner, ast.Name) and owner.id == "EventType")
            or (isinstance(owner, ast.Attribute) and owner.attr == "EventType"
                and isinstance(owner.value, ast.Name) and owner.value.id == "events"))


def test_every_publisher_names_an_event_type():
    published = _published_types()
    assert len(published) >= 10  # the scan sees the publishers (backend, supervisor, proxy, ...)
    for where, line, first in published:
        assert _names_a_member(first), f"{where}:{line} publishes {ast.unparse(first)}, not EventType.MEMBER"


def test_the_bus_carries_the_type_it_was_given():
    bus = events.Bus()
    seen: list[events.Event] = []
    bus.listen(seen.append)
    bus.publish(EventType.MODEL_READY, "m", load_seconds=1.0)
    assert seen[0].type is EventType.MODEL_READY and seen[0].to_dict()["type"] == "model.ready"
