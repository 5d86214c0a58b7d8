"""Placement: which backends may start where, and what makes way for them.

Owns the process spec of a model (``spec_for``), admission (one admission per model at a time,
one at a time overall), making room (evicting what ``admission`` plans, or waiting for busy
models), fair turns between models that cannot all be resident, and admitting extra replicas.
The decisions are pure functions tested without processes: ``admission.plan_admission`` (the
plan), ``plan_cost`` (which placement is best), ``fair_turn`` (which busy residents yield to a
waiting model, and when to decide again) and ``scaling`` (how many replicas to start, and when
to look again). ``Placement`` carries them out through the narrow ``PlacementOwner`` interface
(the supervisor): it starts backends only through ``start_backend``, and must not choose an
endpoint for a request or touch queues beyond reading their depth.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Set
from typing import Protocol

import attrs
import trio

from routerd import events, llama_args
from routerd.backends import admission, endpoints
from routerd.backends.backend import Backend, BackendSpec
from routerd.backends.memory import MemoryManager
from routerd.backends.modelstate import Admission, SupervisorParts
from routerd.backends.slots import SlotStore, model_folder
from routerd.config import Config
from routerd.errors import ConfigError, InsufficientMemory, RouterdError, Unavailable
from routerd.llama_build import ADDED_FLAGS, KEY_VARIABLE, Build, Builds
from routerd.models.catalog import ModelEntry

log = logging.getLogger("routerd.supervisor")

#: Flags routerd adds when the config does not set them: an explicit context size and no
#: self-shrinking, so a backend never silently sizes itself to whatever a sibling left free.
IMPLIED_FLAGS = (llama_args.Flag("--ctx-size", "4096"), llama_args.Flag("--fit", "off"))


def spec_for(entry: ModelEntry, config: Config, binary: str, slots_root: str = "") -> BackendSpec:
    """The process spec of a model under a config (pure); with ``slots_root``, where it saves
    its KV slots if it keeps them across a swap."""
    flags = llama_args.merge_args(config.backend.args, entry.args)
    extra = [flag for flag in IMPLIED_FLAGS if not llama_args.has_flag(flags, flag.name)]
    extra += [llama_args.Flag("--mmproj", p) for p in entry.mmproj]
    if config.metrics.backends and not llama_args.has_flag(flags, "--metrics"):
        extra.append(llama_args.Flag("--metrics"))  # scraped into routerd's /metrics
    if slots_root and config.saves_slots(entry.name) and not llama_args.has_flag(flags, "--slot-save-path"):
        extra.append(llama_args.Flag("--slot-save-path", os.path.join(slots_root, model_folder(entry.name))))
    env = {**config.backend.env, **dict(entry.env)}
    return BackendSpec(name=entry.name, binary=entry.binary or binary, model_path=entry.path, flags=tuple(flags),
                       ready_timeout=config.backend.ready_timeout, stop_grace=config.backend.stop_grace,
                       extra=tuple(extra), env=tuple(sorted(env.items())))


def describe_shortfall(shortfall: Mapping[str, int]) -> str:
    """What a newcomer lacks, for people (pure): "412.0 MiB more on ram and one more model slot
    (backend.max_loaded_models)"."""
    parts = []
    for device, amount in sorted(shortfall.items()):
        if device == "models":
            parts.append(f"{amount} more model slot{'s' if amount > 1 else ''} (backend.max_loaded_models)")
        else:
            parts.append(f"{amount / (1 << 20):.1f} MiB more on {device}")
    return " and ".join(parts) or "nothing more"


def build_refusal(model: str, build: Build) -> str | None:
    """Why ``model`` must not start on ``build`` (pure), or None. A build that cannot read its
    API key from the environment would need it on the command line, which every local user can
    read: routerd starts no backend it cannot keep to itself."""
    if build.key_from_env:
        return None
    return (f"model {model!r} cannot start: llama-server {build.path} (version {build.version}) does not read "
            f"its API key from {KEY_VARIABLE} (its --help has no 'env: {KEY_VARIABLE}'), and routerd will not put "
            "the key on a command line every local user can read. Use a llama.cpp build that does (any since "
            f"2024), or set models.{model}.binary to one")


# -- pure decisions ----------------------------------------------------------------------------
def plan_cost(plan: admission.Plan) -> tuple[int, int]:
    """Order admission options: start now, then start after the fewest evictions, then wait."""
    if isinstance(plan, admission.Admit):
        return (0, len(plan.evict) - len(plan.group_swap))
    return (1, 0) if isinstance(plan, admission.Wait) else (2, 0)


@attrs.frozen
class FairTurn:
    """What a model waiting for room held by busy residents does next."""

    #: Residents whose turn is over now: they stop taking requests and make way.
    yield_now: tuple[str, ...] = ()
    #: Otherwise, seconds until the decision may change (a turn ends, or the wait gives up).
    wake_in: float = math.inf


def fair_turn(*, waited: float, turn: float, served: Mapping[str, float], yielding: Set[str],
              give_up_in: float) -> FairTurn:
    """Fair turns between models that cannot all be resident (pure).

    ``waited``: seconds the waiting model has waited (its oldest request, or its admission);
    ``turn``: ``scheduler.max_turn_wait``; ``served``: seconds each busy resident in its way has
    been ready; ``yielding``: those already making way; ``give_up_in``: seconds until the
    admission stops waiting. Once the model has waited its turn, every resident in the way that
    has had its own (ready that long) and is not yielding yet yields now; else the answer is
    when to look again.
    """
    if waited >= turn:
        due = tuple(name for name, seconds in served.items() if seconds >= turn and name not in yielding)
        if due:
            return FairTurn(yield_now=due, wake_in=0.0)
    timers = [give_up_in] + [turn - seconds for seconds in served.values() if seconds < turn]
    if waited < turn:
        timers.append(turn - waited)
    return FairTurn(wake_in=max(0.0, min(timers)))


@attrs.frozen
class Scaling:
    """How many replicas of a model to start now, and when waiting requests may earn another."""

    start: int = 0
    #: Seconds until the oldest request has waited ``scale_up_wait`` (inf: no more can start).
    recheck_in: float = math.inf


def scaling(*, keep: int, most: int, live: int, starting: int, in_progress: bool, closing: bool,
            oldest_wait: float, scale_up_wait: float) -> Scaling:
    """The replica decision for one model (pure): ``keep`` run once it is in use, one more (up
    to ``most``) while requests wait ``scale_up_wait`` (see ``endpoints.replicas_to_start``).
    Nothing starts while replicas are being added already, while routerd closes, or before the
    first replica (which starts the way any model does)."""
    recheck_in = math.inf if most <= live or in_progress else max(0.0, scale_up_wait - oldest_wait) + 0.01
    if most <= 1 or in_progress or closing or not live:
        return Scaling(0, recheck_in)
    start = endpoints.replicas_to_start(live=live, starting=starting, keep=keep, most=most,
                                        oldest_wait=oldest_wait, scale_up_wait=scale_up_wait)
    return Scaling(start, recheck_in)


# -- carrying them out -------------------------------------------------------------------------
class PlacementOwner(SupervisorParts, Protocol):
    """What placement needs of the supervisor."""

    @property
    def memory(self) -> MemoryManager: ...

    @property
    def binary(self) -> str: ...

    @property
    def builds(self) -> Builds: ...

    @property
    def probes_builds(self) -> bool: ...

    @property
    def slot_store(self) -> SlotStore: ...

    @property
    def bus(self) -> events.Bus: ...

    @property
    def closing(self) -> bool: ...

    def start_backend(self, entry: ModelEntry, spec: BackendSpec, gpu: str | None, key: str) -> Backend: ...

    def next_key(self, name: str) -> str: ...

    def notify_change(self) -> None: ...

    async def wait_changed(self) -> None: ...


class Placement:
    """Admission and eviction for the supervisor's backends."""

    def __init__(self, owner: PlacementOwner) -> None:
        self._owner = owner
        #: One admission at a time: each plans against what the one before it started.
        self._lock = trio.Lock()

    def spec(self, entry: ModelEntry) -> BackendSpec:
        return spec_for(entry, self._owner.config, self._owner.binary, self._owner.slot_store.root)

    async def admit_and_start(self, entry: ModelEntry) -> Backend:
        """Start ``entry``'s first replica once there is room (or return the live one)."""
        owner = self._owner
        if not entry.available:
            raise Unavailable(f"model {entry.name!r} is unavailable: its file {entry.path} is missing",
                              code="model_unavailable")
        state = owner.models[entry.name]
        pending = state.admitting
        if pending is not None:
            # One request per model goes through admission; the others wait for its outcome
            # here rather than on the lock, so none of them is stuck behind other models' turns.
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error.copy()
            existing = state.live_replicas()
            return existing[0] if existing else await self.admit_and_start(entry)
        admitting = state.admitting = Admission()
        try:
            await self.check_build(entry, self.spec(entry))
            async with self._lock:
                existing = state.live_replicas()
                if existing:
                    return existing[0]
                spec = self.spec(entry)
                need, gpu = await self._make_room(entry, spec)
                backend = owner.start_backend(entry, spec, gpu, owner.next_key(entry.name))
                owner.memory.reserve(backend, need)
                return backend
        except RouterdError as exc:
            admitting.error = exc
            raise
        finally:
            state.admitting = None
            admitting.done.set()

    async def check_build(self, entry: ModelEntry, spec: BackendSpec) -> None:
        """Ask ``spec``'s binary what it knows (once per file), refuse a build that cannot take
        its key safely, and warn once per model for each feature turned off for a missing flag."""
        if not self._owner.probes_builds:
            return
        try:
            build = await trio.to_thread.run_sync(self._owner.builds.get, spec.binary)
        except ConfigError as exc:
            raise Unavailable(f"model {entry.name!r} cannot start: {exc.message}", code="llama_server_unusable") \
                from None
        refusal = build_refusal(entry.name, build)
        if refusal is not None:
            raise Unavailable(refusal, code="llama_server_unsupported")
        for flag in spec.lacking(build):
            if self._owner.builds.first_warning(entry.name, build.path, flag):
                log.warning("%s: llama-server %s (%s) has no %s: routerd turns off %s for this model",
                            entry.name, build.path, build.version, flag, ADDED_FLAGS[flag])

    async def add_replicas(self, entry: ModelEntry, count: int) -> None:
        """Admit and start ``count`` more replicas, each only where it fits without evicting a
        busy model (never waiting for room: the ones running serve meanwhile)."""
        owner = self._owner
        try:
            for _ in range(count):
                async with self._lock:
                    if owner.closing or owner.catalog.get(entry.name) != entry:
                        return
                    spec = self.spec(entry)
                    plan, newcomer, gpu = self.best_plan(entry, spec, self.residents())
                    if not isinstance(plan, admission.Admit) or plan.group_swap:
                        log.info("%s: no room for another replica now (%s)", entry.name,
                                 plan.reason if isinstance(plan, admission.Refuse) else "busy models hold it")
                        return
                    await self._evict(plan, entry.name)
                    await owner.memory.wait_released(newcomer.need)
                    backend = owner.start_backend(entry, spec, gpu, owner.next_key(entry.name))
                    owner.memory.reserve(backend, newcomer.need)
        except RouterdError as exc:
            log.warning("%s: another replica did not start: %s", entry.name, exc.message)
        finally:
            owner.models[entry.name].scaling = False
            owner.notify_change()

    def fits_now(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` could start now without evicting anything (preload asks)."""
        plan, _, _ = self.best_plan(entry, self.spec(entry), self.residents())
        return admission.starts_now(plan)

    async def _make_room(self, entry: ModelEntry, spec: BackendSpec) -> tuple[dict[str, int], str | None]:
        """Evict what the plan says, or wait (bounded) for busy models.

        Returns what the model was admitted with and the GPU chosen for it (None: not routerd's
        choice). Among GPUs, one with room now beats one that needs evictions.
        """
        owner = self._owner
        state = owner.models[entry.name]
        waited_since = trio.current_time()
        made_yield: set[str] = set()
        try:
            while True:
                residents = self.residents()
                plan, newcomer, gpu = self.best_plan(entry, spec, residents)
                if isinstance(plan, admission.Refuse):
                    raise InsufficientMemory(plan.reason, data=owner.memory.explain(newcomer, residents))
                if isinstance(plan, admission.Admit):
                    await self._evict(plan, entry.name)
                    await owner.memory.wait_released(newcomer.need)
                    return dict(newcomer.need), gpu
                now = trio.current_time()
                limit = owner.config.memory.busy_wait if owner.config.memory.when_busy == "wait" else 0.0
                if now - waited_since >= limit:
                    busy = ", ".join(plan.busy) or "nothing"
                    raise InsufficientMemory(
                        f"no room for {entry.name!r}: it needs {describe_shortfall(plan.shortfall)}, and "
                        f"{busy} {'are' if len(plan.busy) > 1 else 'is'} busy",
                        data=owner.memory.explain(newcomer, residents), retry_after=5)
                in_the_way = {key: b for key in plan.busy if (b := owner.models.backend(key)) is not None}
                turn = fair_turn(
                    waited=max(owner.queues.oldest_wait(entry.name), now - waited_since),
                    turn=owner.config.scheduler.max_turn_wait,
                    served={key: now - (b.ready_at or now) for key, b in in_the_way.items()},
                    yielding={key for key, b in in_the_way.items() if owner.models.yielding(b)},
                    give_up_in=waited_since + limit - now)
                if turn.yield_now:  # those held only by queued demand are evictable now: plan again
                    made_yield |= self._take_turn_from(turn.yield_now, entry.name)
                    continue
                state.making_room = ("busy", tuple(plan.busy))
                with trio.move_on_after(turn.wake_in):
                    await owner.wait_changed()
        finally:
            state.making_room = None
            # Models that yielded for a newcomer that gave up (or did not need them) serve again.
            for key in made_yield:
                backend = owner.models.backend(key)
                if backend is not None and not backend.stop_requested:
                    owner.models[backend.name].yielding.discard(key)
            if made_yield:
                owner.notify_change()

    def best_plan(self, entry: ModelEntry, spec: BackendSpec, residents: list[admission.Resident],
                  ) -> tuple[admission.Plan, admission.Newcomer, str | None]:
        """The admission plan on the best placement (see ``plan_cost``), with its newcomer and GPU."""
        owner = self._owner
        budgets = owner.memory.budgets()
        options = []
        for gpu in owner.memory.placements(spec):
            newcomer = admission.Newcomer(entry.name, entry.group, owner.memory.need(spec, gpu))
            plan = admission.plan_admission(newcomer, residents, budgets, owner.config.backend.max_loaded_models)
            options.append((plan, newcomer, gpu))
        # Among equal plans, the GPU with the fewest replicas of this model: replicas spread.
        siblings = [owner.memory.usage(b) for b in owner.models.replicas(entry.name)]
        return min(options, key=lambda option: (plan_cost(option[0]),
                                                sum(1 for used in siblings if option[2] in used)))

    def _take_turn_from(self, keys: tuple[str, ...], waiting: str) -> set[str]:
        """``waiting`` has waited its turn: the replicas in its way stop taking new requests."""
        for key in keys:
            backend = self._owner.models.backend(key)
            if backend is not None:
                log.info("%s yields to %s (it waited scheduler.max_turn_wait)", key, waiting)
                self._owner.models[backend.name].yielding.add(key)
        self._owner.notify_change()
        return set(keys)

    def resident(self, backend: Backend) -> admission.Resident:
        owner = self._owner
        entry = owner.catalog.get(backend.name)
        # Requests waiting for a model count as demand: it is not evicted under them, unless
        # its turn is up (then only what runs keeps it).
        demand = backend.in_flight > 0 or (not owner.models.yielding(backend)
                                           and owner.queues.depth(backend.name) > 0)
        return admission.Resident(
            name=backend.key, group=entry.group if entry else "",
            busy=demand and not backend.stop_requested,
            last_used=backend.last_used, usage=owner.memory.usage(backend), extra=backend.extra,
            pinned=entry is not None and entry.keep_loaded and not backend.extra and not backend.stop_requested,
            priority=entry.priority if entry else 0)

    def residents(self) -> list[admission.Resident]:
        return [self.resident(b) for b in self._owner.models.backends().values()]

    async def _evict(self, plan: admission.Admit, newcomer: str) -> None:
        owner = self._owner
        victims = [b for key in plan.evict if (b := owner.models.backend(key)) is not None]
        if victims:
            owner.models[newcomer].making_room = ("evicting", tuple(victim.key for victim in victims))
        for victim in victims:
            if victim.key in plan.group_swap:
                reason, cause = f"group swap for {newcomer}", "group"
            else:
                reason = f"evicted to make room for {newcomer}"
                cause = "turn" if owner.models.yielding(victim) else "memory"
            if not victim.stop_requested:
                owner.bus.publish(events.EventType.MODEL_EVICTED, victim.name, cause=cause, reason=reason,
                                  **{"for": newcomer})
            victim.request_stop(reason, cause=cause, drain_timeout=victim.spec.stop_grace)
        for victim in victims:
            await victim.wait_gone()
