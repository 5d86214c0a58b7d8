"""What the supervisor knows about each model: one record per model, and the table of them.

Owns ``ModelState`` (a model's replicas by key, its failure history and last failed process,
its admission in progress, which of its replicas are yielding their turn, what its admission
waits on, how long its last load took, its background-load retry time and whether replicas are
being added) and ``ModelStates``, the table of records by model name. Records are plain data
with small queries over it: they decide nothing and must not start, stop or wait on a backend
(the supervisor, ``placement`` and ``pools`` act and update them). Queues are not here: they
belong to ``scheduler.Queues``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import attrs
import trio

from routerd.backends import scheduler
from routerd.backends.backend import Backend, State
from routerd.config import Config, SchedulerConfig
from routerd.errors import RouterdError, Unavailable
from routerd.models.catalog import Catalog, ModelEntry


@attrs.define
class Admission:
    """A model's admission in progress, for the other requests that want it to await."""

    done: trio.Event = attrs.field(factory=trio.Event)
    error: RouterdError | None = None


@attrs.define(eq=False)
class ModelState:
    """One model's live state (by its catalog name; it may have left the catalog since)."""

    name: str
    #: Its backends by key: the model's name for its first replica, ``name#N`` after.
    replicas: dict[str, Backend] = attrs.field(factory=dict)
    #: Its recent failures (None: it never failed, or was reset or changed since).
    failures: scheduler.FailureHistory | None = None
    #: Its last process, while that one failed (for status: exit code, last used).
    last_failure: Backend | None = None
    #: The admission under way, which other requests for it wait on.
    admitting: Admission | None = None
    #: Keys of its replicas whose turn is up: they take no new requests, finish theirs, and
    #: make way for a model that waited ``scheduler.max_turn_wait``.
    yielding: set[str] = attrs.field(factory=set)
    #: What its admission is waiting on now: ("evicting" | "busy", the models in the way).
    making_room: tuple[str, tuple[str, ...]] | None = None
    #: Seconds its last load took: the yardstick for "loading X: 45%".
    load_seconds: float | None = None
    #: A background load (a pool with remotes does not wait for it): inf while one runs, else
    #: the earliest time a failed one may be tried again; None when none is pending.
    background_retry: float | None = None
    #: Extra replicas are being admitted.
    scaling: bool = False

    def sorted_replicas(self) -> list[Backend]:
        """Its backends in any state, first replica first."""
        return sorted(self.replicas.values(), key=lambda b: replica_index(b.key))

    def live_replicas(self) -> list[Backend]:
        """Those not asked to stop."""
        return [b for b in self.sorted_replicas() if live(b)]

    def next_key(self) -> str:
        """The key of its next replica: its name, else the lowest free ``name#N``."""
        if self.name not in self.replicas:
            return self.name
        return next(key for i in range(2, len(self.replicas) + 3)
                    if (key := f"{self.name}#{i}") not in self.replicas)

    def record_failure(self, backend: Backend, now: float) -> None:
        self.last_failure = backend
        history = self.failures = self.failures or scheduler.FailureHistory()
        history.record(now, backend.error or "", backend.exit_code, backend.log.text_tail(40))

    def crash_looping(self, now: float, policy: SchedulerConfig) -> bool:
        return self.failures is not None and self.failures.broken(now, policy.crash_loop_failures,
                                                                  policy.crash_loop_window)

    def refuse_if_crash_looping(self, now: float, policy: SchedulerConfig) -> None:
        """Raise a 503 naming the last failure while it is in a crash loop."""
        history = self.failures
        if history is not None and self.crash_looping(now, policy):
            raise Unavailable(
                f"model {self.name!r} is failed: {history.recent(now, policy.crash_loop_window)} "
                f"failures within {policy.crash_loop_window:g} s, the last: {history.last_error}. "
                f"Fix the cause, then `routerctl reset {self.name}`",
                code="model_failed", data={"exit_code": history.exit_code, "log_tail": history.log_tail})

    def forget_failures(self) -> bool:
        """Forget its failures (the crash-loop breaker and backoff); True if there were any."""
        had = self.failures is not None or self.last_failure is not None
        self.failures = self.last_failure = None
        return had


class ModelStates:
    """Every model's record, made on first use, and every backend in the order they started."""

    def __init__(self) -> None:
        self._by_name: dict[str, ModelState] = {}
        #: Each live backend's key in start order: eviction ties (equal last use) go by it.
        self._order: dict[str, None] = {}

    def add(self, backend: Backend) -> None:
        self[backend.name].replicas[backend.key] = backend
        self._order[backend.key] = None

    def remove(self, backend: Backend) -> None:
        """Forget ``backend`` (if it is still the one under its key) and its turn."""
        state = self[backend.name]
        if state.replicas.get(backend.key) is backend:
            del state.replicas[backend.key]
            self._order.pop(backend.key, None)
        state.yielding.discard(backend.key)

    def __getitem__(self, name: str) -> ModelState:
        state = self._by_name.get(name)
        if state is None:
            state = self._by_name[name] = ModelState(name)
        return state

    def get(self, name: str) -> ModelState | None:
        """Its record if it has one (looking makes none)."""
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[ModelState]:
        return iter(list(self._by_name.values()))

    def backends(self) -> dict[str, Backend]:
        """Every live backend by key, in start order."""
        return {key: backend for key in self._order if (backend := self.backend(key)) is not None}

    def backend(self, key: str) -> Backend | None:
        """The backend with replica key ``key``, if it still runs."""
        for state in self._by_name.values():
            if key in state.replicas:
                return state.replicas[key]
        return None

    def replicas(self, name: str) -> list[Backend]:
        """``name``'s backends in any state, first replica first."""
        state = self._by_name.get(name)
        return state.sorted_replicas() if state is not None else []

    def live_replicas(self, name: str) -> list[Backend]:
        state = self._by_name.get(name)
        return state.live_replicas() if state is not None else []

    def yielding(self, backend: Backend) -> bool:
        state = self._by_name.get(backend.name)
        return state is not None and backend.key in state.yielding


def live(backend: Backend) -> bool:
    """Not asked to stop: it serves, or will once loaded."""
    return not backend.stop_requested and backend.state is not State.STOPPING


def replica_index(key: str) -> int:
    """1 for a model's first replica (keyed by its name), N for ``name#N``."""
    _, sep, number = key.rpartition("#")
    return int(number) if sep and number.isdigit() else 1


def idle_ttl(entry: ModelEntry, key: str, scale_down_idle: float) -> float:
    """A replica's idle TTL: those an "auto" model added go after ``scale_down_idle``; the rest
    follow the model."""
    if replica_index(key) <= entry.replicas:
        return entry.idle_ttl
    return scale_down_idle if entry.idle_ttl <= 0 else min(entry.idle_ttl, scale_down_idle)


class SupervisorParts(Protocol):
    """What every part of the supervisor (placement, pools, the views) reads of it: the running
    config and catalog, the per-model records and the queues. Each part's own protocol adds the
    little more it needs."""

    @property
    def config(self) -> Config: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def models(self) -> ModelStates: ...

    @property
    def queues(self) -> scheduler.Queues: ...
