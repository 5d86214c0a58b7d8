"""Virtual models: which of a selector's targets serves a request.

Owns the strategies of ``[selectors.NAME]`` as one pure function over a snapshot of the
targets (the supervisor takes the snapshot): ``warm`` prefers what is loaded and has room so a
request never forces a swap while a warm target exists, ``pin`` always takes the first,
``spillover`` fills targets in order up to ``per_target`` requests each. It must not look at
backends, queues or memory itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs


@attrs.frozen
class Target:
    """One target model as a selector sees it now."""

    name: str
    #: "ready" (a local replica is, or its remote is reachable), "starting", or anything else.
    state: str
    #: Requests it holds (in flight and queued), and how many it runs at once.
    outstanding: int = 0
    capacity: int = 1
    #: Whether it could start now without evicting a busy model.
    fits: bool = True

    @property
    def saturated(self) -> bool:
        return self.outstanding >= self.capacity


def choose_target(strategy: str, targets: Sequence[Target], per_target: int = 1) -> str:
    """The target for the next request (pure); ``targets`` in the selector's order."""
    if not targets:
        raise ValueError("a selector has at least one target")
    if strategy == "pin":
        return targets[0].name
    if strategy == "spillover":
        for target in targets:
            if target.outstanding < per_target:
                return target.name
        return min(targets, key=lambda t: t.outstanding).name  # all full: the least loaded queues it
    if strategy == "warm":
        preferences: tuple[Callable[[Target], bool], ...] = (
            lambda t: t.state == "ready" and not t.saturated,
            lambda t: t.state == "starting",
            lambda t: t.state not in ("ready", "starting") and t.fits,
            lambda t: t.state == "ready")  # all busy, nothing fits: queue at a warm one
        for wanted in preferences:
            for target in targets:
                if wanted(target):
                    return target.name
        return targets[0].name
    raise ValueError(f"unknown selector strategy {strategy!r}")
