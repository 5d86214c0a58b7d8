"""Status views of the supervisor: what the HTTP API, the control plane and routerctl show.

Owns ``ModelStatus`` and ``WaitInfo`` and the functions that build them and the other views
(each model's state and pool, the remotes, the virtual models, the memory view with each model's
fit, the counts, and what a waiting request waits for) from a snapshot of the supervisor's state,
read through ``Observed``. Read only: it must not start, stop or admit anything, nor create a
model's record by looking at it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import attrs
import trio

from routerd.backends import admission, scheduler
from routerd.backends.backend import Backend, BackendSpec, State
from routerd.backends.memory import MemoryManager
from routerd.backends.modelstate import SupervisorParts
from routerd.backends.placement import Placement
from routerd.backends.remote import Remotes
from routerd.backends.slots import Saved, SlotStore
from routerd.llama_build import Builds
from routerd.models.catalog import ModelEntry


@attrs.frozen
class ModelStatus:
    """One model as the HTTP API, the control plane and routerctl show it."""

    name: str
    aliases: list[str]
    group: str
    source: str
    #: "manual" (config, imported) or "auto" (discovered).
    catalog: str
    path: str
    available: bool
    state: str
    pid: int | None = None
    port: int | None = None
    in_flight: int = 0
    queued: int = 0
    oldest_wait: float = 0.0
    last_used: float | None = None
    idle_ttl: float = 0.0
    idle_ttl_left: float | None = None
    last_error: str | None = None
    exit_code: int | None = None
    memory: dict[str, object] | None = None
    metadata: dict[str, object] | None = None
    #: Its pool: each local replica and remote serving it, with its state and load.
    endpoints: list[dict[str, object]] = attrs.field(factory=list)
    #: Its llama-server: path, version, the flags routerd adds that it lacks (once asked).
    build: dict[str, object] | None = None
    #: Its conversations saved when it last stopped (slots, tokens, bytes, saved_at), if any.
    saved_slots: Saved | None = None
    #: The fields set, forced or removed on every request for it (defaults, override, strip).
    rewrite: dict[str, object] | None = None


@attrs.frozen
class WaitInfo:
    """Why a request for ``model`` is still waiting, for people (see ``feedback.describe``)."""

    model: str
    #: "queued" (slots busy), "starting" (admission), "evicting", "busy" (room held by busy
    #: models), "loading", "stopping" (the old process must go first), "backoff" (after a failure).
    phase: str
    #: Requests ahead of this one in the queue, and requests the backend is serving.
    ahead: int = 0
    running: int = 0
    #: The models being evicted, or busy in the way.
    others: tuple[str, ...] = ()
    #: Seconds the load has run, and the last load's duration of this model (None: never loaded).
    elapsed: float = 0.0
    last_load: float | None = None


class Observed(SupervisorParts, Protocol):
    """What the views read of the supervisor."""

    @property
    def memory(self) -> MemoryManager: ...

    @property
    def remotes(self) -> Remotes: ...

    @property
    def placement(self) -> Placement: ...

    @property
    def builds(self) -> Builds: ...

    @property
    def slot_store(self) -> SlotStore: ...

    def crash_looping(self, name: str) -> bool: ...


def _wall(monotonic: float | None) -> float | None:
    return None if monotonic is None else time.time() - (trio.current_time() - monotonic)


def wait_info(seen: Observed, name: str, ticket: scheduler.Ticket) -> WaitInfo:
    """What the request holding ``ticket`` waits for now."""
    name = seen.catalog.resolve(name).name
    state = seen.models.get(name)
    if state is not None and state.making_room is not None:
        return WaitInfo(name, state.making_room[0], others=state.making_room[1])
    live = state.sorted_replicas() if state is not None else []
    backend = live[0] if live else None
    last = state.load_seconds if state is not None else None
    if backend is None:
        failed = state is not None and bool(state.failures)
        return WaitInfo(name, "backoff" if failed else "starting", last_load=last)
    if backend.state is State.STARTING:
        return WaitInfo(name, "loading", elapsed=trio.current_time() - backend.started_at, last_load=last)
    if backend.state is State.STOPPING or backend.stop_requested:
        return WaitInfo(name, "stopping")
    return WaitInfo(name, "queued", ahead=seen.queues.ahead_of(name, ticket), running=backend.in_flight)


def status(seen: Observed) -> list[ModelStatus]:
    return [model_status(seen, entry) for entry in seen.catalog]


def model_status(seen: Observed, entry: ModelEntry) -> ModelStatus:
    replicas = seen.models.replicas(entry.name)
    backend = replicas[0] if replicas else None
    record = seen.models.get(entry.name)
    shown = backend or (record.last_failure if record is not None else None)
    history = record.failures if record is not None else None
    state = state_of(seen, entry.name)
    pool = pool_status(seen, entry, replicas)
    queued, oldest_wait = seen.queues.depth(entry.name), seen.queues.oldest_wait(entry.name)
    if entry.remote:
        remote = seen.remotes.get(entry.remote)
        return ModelStatus(
            name=entry.name, aliases=list(entry.aliases), group=entry.group, source=entry.source,
            catalog=entry.state, path=entry.path, available=True, state=state,
            in_flight=remote.in_flight if remote else 0, queued=queued, oldest_wait=oldest_wait,
            last_error=remote.error if remote else "remote not configured", endpoints=pool)
    return ModelStatus(
        name=entry.name, aliases=list(entry.aliases), group=entry.group, source=entry.source,
        catalog=entry.state,
        path=entry.path, available=entry.available, state=state,
        pid=backend.pid if backend else None, port=backend.port if backend else None,
        in_flight=sum(b.in_flight for b in replicas), queued=queued, oldest_wait=oldest_wait,
        last_used=_wall(shown.last_used) if shown else None,
        idle_ttl=entry.idle_ttl,
        idle_ttl_left=backend.idle_ttl_left() if backend else None,
        last_error=history.last_error if history else None,
        exit_code=shown.exit_code if shown else None,
        memory=seen.memory.model_report(entry, spec := seen.placement.spec(entry), backend),
        metadata=seen.catalog.metadata(entry),
        endpoints=pool,
        build=build_view(seen.builds, spec),
        saved_slots=seen.slot_store.saved(entry.name),
        rewrite=entry.rewrite.view() if entry.rewrite else None,
    )


def build_view(builds: Builds, spec: BackendSpec) -> dict[str, object] | None:
    """A model's llama-server as the views show it: what it is, and what routerd turned off
    for the flags it lacks (None until it was asked)."""
    build = builds.known(spec.binary)
    if build is None:
        return None
    return {**build.describe(), "turned_off": spec.lacking(build)}


def pool_status(seen: Observed, entry: ModelEntry, replicas: list[Backend]) -> list[dict[str, object]]:
    """Each endpoint of ``entry``: its replicas, then its remotes."""
    shown: list[dict[str, object]] = [
        {"endpoint": b.key, "kind": "local", "state": b.state.value, "in_flight": b.in_flight,
         "slots": b.slots, "pid": b.pid, "port": b.port} for b in replicas]
    listed = [(entry.remote, entry.remote_model)] if entry.remote else list(entry.remotes)
    for remote_name, there in listed:
        remote = seen.remotes.get(remote_name)
        if remote is None:
            continue
        shown.append({"endpoint": remote.key, "kind": "remote", "remote": remote_name, "model": there,
                      "url": remote.config.url, "state": remote.state, "in_flight": remote.in_flight,
                      "slots": remote.slots, "queued_there": remote.queued.get(there, 0),
                      "error": remote.error})
    return shown


def remotes_status(seen: Observed) -> list[dict[str, object]]:
    """Each remote: where, its state, its load and its models."""
    return [{"name": r.name, "url": r.config.url, "state": r.state, "error": r.error, "in_flight": r.in_flight,
             "max_concurrent": r.slots, "models": list(r.models)} for r in seen.remotes]


def selectors_status(seen: Observed) -> list[dict[str, object]]:
    """Each virtual model: its strategy and targets, with each target's state now."""
    return [{"name": name, "strategy": s.strategy, "per_target": s.per_target,
             "targets": [{"model": t, "state": state_of(seen, t) if t in seen.catalog else "not in catalog"}
                         for t in s.targets]} for name, s in seen.config.selectors.items()]


def memory_view(seen: Observed) -> dict[str, object]:
    """Per device budget and use; per model estimate, measurement and whether it fits."""
    residents = seen.placement.residents()
    models = []
    for entry in seen.catalog:
        if entry.remote:
            continue  # memory on another host is that host's budget
        spec = seen.placement.spec(entry)
        replicas = seen.models.replicas(entry.name)
        backend = replicas[0] if replicas else None
        report = seen.memory.model_report(entry, spec, backend)
        placed: Mapping[str, int]
        if backend is not None:
            fits_now = fits_after = True
            placed = seen.memory.usage(backend)
        else:
            plan, newcomer, _ = seen.placement.best_plan(entry, spec, residents)
            fits_now = admission.starts_now(plan)
            fits_after = isinstance(plan, admission.Admit)
            report["evicts"] = list(plan.evict) if isinstance(plan, admission.Admit) else None
            placed = newcomer.need
        device = [d for d in placed if d != "ram"] or ["ram"]
        models.append({"model": entry.name, "state": state_of(seen, entry.name), "device": device[0],
                       "fits_now": fits_now, "fits_after_eviction": fits_after, **report})
    return {"devices": seen.memory.report(residents), "models": models}


def state_of(seen: Observed, name: str) -> str:
    """A model's state, cheaply (no memory measurement): for counts and summaries. A remote's
    model is ``reachable``, ``unreachable`` or ``unknown`` (not checked yet)."""
    entry = seen.catalog.get(name)
    if entry is not None and entry.remote:
        remote = seen.remotes.get(entry.remote)
        return remote.state if remote is not None else "unreachable"
    replicas = seen.models.replicas(name)
    if replicas:
        states = [b.state for b in replicas]
        return (State.READY if State.READY in states else states[0]).value
    record = seen.models.get(name)
    if seen.crash_looping(name) or (record is not None and record.last_failure is not None):
        return State.FAILED.value
    return State.UNLOADED.value


def counts(seen: Observed) -> dict[str, int]:
    states = [state_of(seen, entry.name) for entry in seen.catalog]
    return {"models": len(states), "ready": states.count("ready"),
            "starting": states.count("starting"), "failed": states.count("failed")}
