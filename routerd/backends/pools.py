"""Pools: getting an endpoint of a model's pool for a request, and keeping the pool filled.

A model's pool is its local replicas and the remotes that serve it. This module owns taking a
slot there for a request (when its queue ticket's turn comes, or at once for requests that take
no slot), the sticky-session map, loading a model's first replica in the background while
remotes serve it, preloading models at boot, starting more replicas when ``placement.scaling``
says so, and the snapshot a virtual model's strategy chooses from (``select``). The choices
themselves are pure functions in ``endpoints`` and ``selectors``. It reaches the supervisor
only through ``PoolOwner``, and must not start or stop a backend itself: the first replica
comes from ``ready_backend`` or ``load_quietly``, extra ones from ``Placement.add_replicas``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from routerd.backends import admission, endpoints, placement, scheduler, selectors
from routerd.backends.backend import Backend, State
from routerd.backends.endpoints import Endpoint, Lease
from routerd.backends.modelstate import SupervisorParts
from routerd.backends.remote import Remote, Remotes
from routerd.config import Config
from routerd.errors import RouterdError, Unavailable
from routerd.models.catalog import ModelEntry

log = logging.getLogger("routerd.supervisor")

#: An endpoint of a pool, with the model's name there when it differs from the catalog's.
Member = tuple[Endpoint, str | None]


class PoolOwner(SupervisorParts, Protocol):
    """What the pools need of the supervisor."""

    @property
    def remotes(self) -> Remotes: ...

    @property
    def placement(self) -> placement.Placement: ...

    @property
    def closing(self) -> bool: ...

    def crash_looping(self, name: str) -> bool: ...

    def state_of(self, name: str) -> str: ...

    async def ready_backend(self, entry: ModelEntry) -> Backend: ...

    async def load_quietly(self, name: str) -> RouterdError | None: ...

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None: ...


class Pools:
    """Every model's pool, as requests see it."""

    def __init__(self, owner: PoolOwner) -> None:
        self._owner = owner
        scheduling = owner.config.scheduler
        self._sessions = endpoints.SessionMap(scheduling.sticky_sessions, scheduling.sticky_ttl)

    def configure(self, config: Config) -> None:
        self._sessions.capacity, self._sessions.ttl = config.scheduler.sticky_sessions, config.scheduler.sticky_ttl

    async def acquire_ticket(self, name: str, ticket: scheduler.Ticket, session: str | None = None) -> Lease:
        """See ``Supervisor.acquire_ticket``."""
        entry = self._owner.catalog.resolve(name)
        queue = self._owner.queues.queue(entry.name)
        with trio.move_on_at(ticket.deadline):
            while True:
                pool = await self._pool(entry)
                if queue.is_next(ticket):
                    lease = self._take(entry, pool, session)
                    if lease is not None:
                        return lease
                with trio.move_on_after(self._scaling(entry).recheck_in):
                    await queue.changed(ticket)
        waited = trio.current_time() - ticket.enqueued
        raise Unavailable(f"waited {waited:.0f} s for {entry.name!r} without a free slot "
                          f"(scheduler.max_queue_wait); retry later", code="queue_timeout", retry_after=5)

    async def acquire_unqueued(self, name: str, session: str | None = None) -> Lease:
        """See ``Supervisor.acquire_unqueued``."""
        entry = self._owner.catalog.resolve(name)
        max_wait = self._owner.config.scheduler.max_queue_wait
        with trio.move_on_after(max_wait):
            lease = self._take(entry, await self._pool(entry), session, needs_slot=False)
            if lease is not None:  # None: an empty pool (it changed meanwhile)
                return lease
        raise Unavailable(f"{entry.name!r} was not ready within {max_wait:.0f} s "
                          "(scheduler.max_queue_wait); retry later", code="queue_timeout", retry_after=5)

    def acquire_now(self, name: str, ticket: scheduler.Ticket | None, session: str | None = None) -> Lease | None:
        """What ``acquire_ticket`` (or with no ticket ``acquire_unqueued``) would give without
        waiting, or None (then call it): the common case of a local model with a ready replica,
        no failures to account for, ``ticket`` first in its queue and a free slot. It takes no
        task, timer or checkpoint, which is most of what a request costs when nothing waits."""
        owner = self._owner
        entry = owner.catalog.resolve(name)
        if entry.remote or entry.remotes or owner.closing:
            return None
        state = owner.models.get(entry.name)
        if state is None or state.failures is not None:
            return None
        if ticket is not None and not owner.queues.queue(entry.name).is_next(ticket):
            return None
        pool: list[Member] = [(b, None) for b in state.replicas.values()
                              if b.state is State.READY and b.accepting and not b.suspect and not b.stop_requested
                              and not owner.models.yielding(b)]
        if not pool:
            return None
        if len(state.replicas) < entry.replicas:  # a free slot now: only the floor can want more
            self.scale(entry)
        return self._take(entry, pool, session, needs_slot=ticket is not None)

    async def _pool(self, entry: ModelEntry) -> list[Member]:
        """``entry``'s accepting endpoints, each with the model's name there when it differs.

        A remote's model is served by its remote alone: unreachable, a clear 503 at once. A
        local model waits for a ready replica (starting one, with all of admission's errors),
        unless remotes serve it too: then a reachable remote is used while the local replica
        loads in the background.
        """
        owner = self._owner
        if entry.remote:
            remote = await self._reachable(entry.remote, entry.name)
            return [(remote, entry.remote_model if entry.remote_model != entry.name else None)]
        remotes: list[Member] = []
        for remote_name, there in entry.remotes:
            found = owner.remotes.get(remote_name)
            if found is not None and found.accepting:
                remotes.append((found, there if there != entry.name else None))
        if not remotes:
            await owner.ready_backend(entry)  # which also scales
        else:
            if not owner.models.live_replicas(entry.name):
                self._load_in_background(entry)
            self.scale(entry)
        local: list[Member] = [(b, None) for b in owner.models.replicas(entry.name)
                               if b.accepting and not owner.models.yielding(b)]
        return local + remotes

    async def _reachable(self, remote_name: str, model: str) -> Remote:
        remote = self._owner.remotes.get(remote_name)
        if remote is not None and remote.state == "unknown":  # just configured: its first check
            with trio.move_on_after(remote.check_timeout):
                await remote.checked.wait()
        if remote is None or not remote.accepting:
            why = remote.error if remote is not None else "it is no longer configured"
            raise Unavailable(f"model {model!r} is served by remote {remote_name!r}, which is unreachable: {why}",
                              code="remote_unreachable", retry_after=5)
        return remote

    def _take(self, entry: ModelEntry, pool: list[Member], session: str | None,
              needs_slot: bool = True) -> Lease | None:
        """Choose from ``pool`` (see ``endpoints.choose``) and take a slot there; None if all are
        full (only when ``needs_slot``)."""
        by_key = {endpoint.key: (endpoint, there) for endpoint, there in pool}
        candidates = [endpoints.Candidate(endpoint.key, _outstanding(endpoint, entry, there),
                                          not needs_slot or endpoint.in_flight < endpoint.slots)
                      for endpoint, there in pool]
        now = trio.current_time()
        last = self._sessions.get(entry.name, session, now) if session is not None else None
        chosen = endpoints.choose(candidates, last=last, slack=self._owner.config.scheduler.sticky_slack,
                                  session=session)
        if chosen is None:
            return None
        endpoint, there = by_key[chosen]
        if session is not None:
            self._sessions.put(entry.name, session, chosen, now)
        endpoint.acquire()
        return Lease(endpoint, entry.name, there)

    def select(self, selector: str) -> str:
        """See ``Supervisor.select``: a snapshot of the targets, and the strategy's choice."""
        owner = self._owner
        config = owner.config.selectors[selector]
        targets = []
        residents = None
        for name in config.targets:
            entry = owner.catalog.get(name)
            if entry is None:
                continue  # not in the catalog (a remote that was never reached): not a choice
            state = owner.state_of(entry.name)
            state = "ready" if state == "reachable" else state
            replicas = [b for b in owner.models.replicas(entry.name) if b.accepting]
            remote = owner.remotes.get(entry.remote) if entry.remote else None
            capacity = remote.slots if remote is not None else sum(b.slots for b in replicas)
            outstanding = (remote.in_flight if remote is not None else sum(b.in_flight for b in replicas))
            fits = True
            if config.strategy == "warm" and state not in ("ready", "starting") and not entry.remote:
                residents = owner.placement.residents() if residents is None else residents
                plan, _, _ = owner.placement.best_plan(entry, owner.placement.spec(entry), residents)
                busy = {r.name for r in residents if r.busy}
                fits = isinstance(plan, admission.Admit) and not busy & set(plan.group_swap)
            targets.append(selectors.Target(entry.name, state, outstanding + owner.queues.depth(entry.name),
                                            max(1, capacity), fits))
        if not targets:
            raise Unavailable(f"none of selector {selector!r}'s targets ({', '.join(config.targets)}) is in the "
                              "catalog: check the names (`routerctl models`)", code="selector_empty")
        return selectors.choose_target(config.strategy, targets, config.per_target)

    async def preload(self, names: list[str]) -> None:
        """Load ``scheduler.preload``'s models one by one (see ``scheduler.preload_order``),
        skipping any that runs already or would need an eviction."""
        owner = self._owner
        wanted: list[str] = []
        for name in names:  # aliases become catalog names, so "*" does not start them twice
            try:
                wanted.append(name if name == "*" else owner.catalog.resolve(name).name)
            except RouterdError as exc:
                log.warning("preload: %s", exc.message)
        for name in scheduler.preload_order(wanted, [entry.name for entry in owner.catalog]):
            entry = owner.catalog.get(name)
            if entry is None or entry.remote or owner.models.replicas(entry.name):
                continue
            if not owner.placement.fits_now(entry):  # never evict to preload
                log.warning("preload: skipping %s: it does not fit beside the models already loaded", entry.name)
                continue
            await owner.load_quietly(entry.name)

    def _load_in_background(self, entry: ModelEntry) -> None:
        """Start ``entry``'s first replica without waiting for it (a failure is logged, and not
        tried again for a while: the remotes serve meanwhile)."""
        owner = self._owner
        state = owner.models[entry.name]
        retry = state.background_retry
        if (retry is not None and retry > trio.current_time()) or owner.crash_looping(entry.name):
            return
        state.background_retry = math.inf  # one at a time

        async def load() -> None:
            if await owner.load_quietly(entry.name) is None:
                state.background_retry = None
            else:
                state.background_retry = trio.current_time() + owner.config.scheduler.restart_backoff_max

        owner.start_soon(load, name=f"load {entry.name}")

    def scale(self, entry: ModelEntry) -> None:
        """Start more replicas of ``entry`` if its policy says so now (in the background)."""
        more = self._scaling(entry).start
        if more:
            self._owner.models[entry.name].scaling = True
            self._owner.start_soon(self._owner.placement.add_replicas, entry, more, name=f"scale {entry.name}")

    def _scaling(self, entry: ModelEntry) -> placement.Scaling:
        owner = self._owner
        state = owner.models.get(entry.name)
        live = owner.models.live_replicas(entry.name)
        in_progress = state is not None and state.scaling
        # The oldest wait (a scan of the queue) matters only while another replica may start.
        may_grow = len(live) < entry.max_replicas and not in_progress
        return placement.scaling(
            keep=entry.replicas, most=entry.max_replicas, live=len(live),
            starting=sum(b.state is State.STARTING for b in live), in_progress=in_progress, closing=owner.closing,
            oldest_wait=owner.queues.oldest_wait(entry.name) if may_grow else 0.0,
            scale_up_wait=owner.config.scheduler.scale_up_wait)


def _outstanding(endpoint: Endpoint, entry: ModelEntry, there: str | None) -> int:
    """What an endpoint holds: a remote routerd's own queue for the model counts too."""
    if isinstance(endpoint, Remote):
        return endpoint.outstanding(there or entry.remote_model or entry.name)
    return endpoint.in_flight
