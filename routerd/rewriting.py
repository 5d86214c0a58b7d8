"""Request rewriting per model, as llama-swap's filters do it: pure functions of a JSON body.

A model's config may set fields on every request for it: ``defaults`` (set where the client did
not), ``override`` (always set) and ``strip`` (removed). Owns the rule (``Rewrite``, hashable, so a
catalog entry holding one stays comparable) and applying it to a body: a body that needs no
change comes back as the same bytes, never re-encoded, so the hot path pays only for the models
that rewrite and the requests they change. No I/O; the proxy calls it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from routerd import client_json


@attrs.frozen
class Rewrite:
    """One model's rule; values are kept as JSON text (hashable, and compared as JSON)."""

    defaults: tuple[tuple[str, str], ...] = ()
    override: tuple[tuple[str, str], ...] = ()
    strip: tuple[str, ...] = ()

    @classmethod
    def of(cls, defaults: Mapping[str, Any], override: Mapping[str, Any], strip: Iterable[str]) -> Rewrite | None:
        """The rule for a model's config, or None when it rewrites nothing."""
        rule = cls(tuple(sorted((k, json.dumps(v)) for k, v in defaults.items())),
                   tuple(sorted((k, json.dumps(v)) for k, v in override.items())), tuple(strip))
        return rule if rule.defaults or rule.override or rule.strip else None

    def view(self) -> dict[str, Any]:
        """The rule as ``/v1/models`` shows it."""
        return {"defaults": {k: json.loads(v) for k, v in self.defaults},
                "override": {k: json.loads(v) for k, v in self.override}, "strip": list(self.strip)}


def rewrite(payload: dict[str, Any], rule: Rewrite) -> list[str]:
    """Apply ``rule`` to a parsed body in place; the fields it changed, in the order applied
    (pure but for ``payload``)."""
    changed = []
    for field in rule.strip:
        if field in payload:
            del payload[field]
            changed.append(field)
    for field, text in rule.defaults:
        if field not in payload:
            payload[field] = json.loads(text)
            changed.append(field)
    for field, text in rule.override:
        value = json.loads(text)
        if field not in payload or payload[field] != value:
            payload[field] = value
            changed.append(field)
    return changed


def rewritten(body: bytes, rule: Rewrite) -> tuple[bytes, list[str]]:
    """``body`` under ``rule`` and the fields changed; the same bytes when nothing changes (a
    body that is not a JSON object is left for the proxy to refuse)."""
    try:
        payload = client_json.loads(body)
    except client_json.InvalidJson:
        return body, []
    if not isinstance(payload, dict):
        return body, []
    changed = rewrite(payload, rule)
    return (json.dumps(payload).encode(), changed) if changed else (body, [])
