"""Admission planning: may a model start now, and what must stop first?

Pure functions over plain data, so the policy is tested without processes: group rules, the
``max_loaded_models`` cap and the memory budget are all decided here. The supervisor carries
out the plan; this module must not touch backends, clocks or devices.

The policy:
* running models of *other explicit groups* always make way (they drain, bounded by the stop
  grace); models without a group are never touched by group rules;
* then, if the newcomer does not fit (by count or by memory on any device), idle models are
  evicted in least-recently-used order (a model's extra replicas before any first one),
  skipping those whose eviction frees nothing that is short, and only as many as needed;
* a busy model (request in flight) is never evicted for room: the plan says Wait;
* a model that cannot fit even on an empty device is Refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

Usage = Mapping[str, int]  # bytes per device name ("ram", "gpu0", ...)


@attrs.frozen
class Resident:
    name: str
    group: str
    busy: bool
    last_used: float
    usage: Usage = attrs.field(factory=dict)
    #: A replica beyond its model's first: evicted before any model's first.
    extra: bool = False
    #: ``keep_loaded``: never stopped for room (nor for another group).
    pinned: bool = False
    #: Eviction priority: among idle models, lower priorities go first (LRU within one).
    priority: int = 0


@attrs.frozen
class Newcomer:
    name: str
    group: str
    need: Usage = attrs.field(factory=dict)


@attrs.frozen
class Admit:
    #: Models to stop before starting, in order; ``group_swap`` ones may be busy (they drain).
    evict: tuple[str, ...] = ()
    group_swap: tuple[str, ...] = ()


@attrs.frozen
class Wait:
    """Not now: these busy models hold what is needed."""

    busy: tuple[str, ...]
    shortfall: Mapping[str, int]


@attrs.frozen
class Refuse:
    reason: str


Plan = Admit | Wait | Refuse


def group_conflicts(newcomer: Newcomer, residents: Sequence[Resident]) -> list[Resident]:
    if not newcomer.group:
        return []
    return [r for r in residents if r.group and r.group != newcomer.group]


def shortfall(newcomer: Newcomer, staying: Sequence[Resident], budgets: Mapping[str, int],
              max_loaded: int) -> dict[str, int]:
    """What is missing for the newcomer beside ``staying``: bytes per device, and "models"."""
    short: dict[str, int] = {}
    for device, need in newcomer.need.items():
        used = sum(r.usage.get(device, 0) for r in staying)
        missing = used + need - budgets.get(device, 0)
        if need and missing > 0:
            short[device] = missing
    if max_loaded and len(staying) + 1 > max_loaded:
        short["models"] = len(staying) + 1 - max_loaded
    return short


def plan_admission(newcomer: Newcomer, residents: Sequence[Resident], budgets: Mapping[str, int],
                   max_loaded: int = 0) -> Plan:
    """Decide how ``newcomer`` may start beside ``residents`` within ``budgets``: idle models are
    evicted extras first, then by priority (lowest first), then least recently used; pinned
    ones never, and a newcomer that does not fit beside them is refused, naming them."""
    for device, need in newcomer.need.items():
        if need > budgets.get(device, 0):
            budget = budgets.get(device, 0)
            return Refuse(f"{newcomer.name} needs {need} bytes on {device}, more than its whole budget "
                          f"of {budget} bytes")
    swapped = group_conflicts(newcomer, residents)
    pinned_in_the_way = [r.name for r in swapped if r.pinned]
    if pinned_in_the_way:
        return Refuse(f"{newcomer.name} (group {newcomer.group!r}) cannot run beside {', '.join(pinned_in_the_way)} "
                      "of another group, which stay loaded (keep_loaded)")
    staying = [r for r in residents if r not in swapped]
    pinned = [r for r in staying if r.pinned]
    beside_pinned = shortfall(newcomer, pinned, budgets, max_loaded)
    if beside_pinned:
        return Refuse(f"{newcomer.name} does not fit beside the models kept loaded (keep_loaded): "
                      f"{', '.join(r.name for r in pinned)}; it would need {beside_pinned} more")
    evicted: list[str] = []
    idle = sorted((r for r in staying if not r.busy and not r.pinned),
                  key=lambda r: (not r.extra, r.priority, r.last_used))
    for candidate in idle:
        short = shortfall(newcomer, staying, budgets, max_loaded)
        if not short:
            break
        if "models" in short or any(candidate.usage.get(d, 0) > 0 for d in short):
            staying.remove(candidate)
            evicted.append(candidate.name)
    short = shortfall(newcomer, staying, budgets, max_loaded)
    if short:
        busy = tuple(r.name for r in staying if r.busy and not r.pinned)
        return Wait(busy=busy, shortfall=short)
    return Admit(evict=tuple(r.name for r in swapped) + tuple(evicted),
                 group_swap=tuple(r.name for r in swapped))


def starts_now(plan: Plan) -> bool:
    """Whether ``plan`` starts the newcomer without evicting anything (pure)."""
    return isinstance(plan, Admit) and not plan.evict
