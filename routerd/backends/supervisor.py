"""The supervisor: which backends run, and getting an endpoint for a request.

Owns the backends table (keyed by replica: ``smollm2``, ``smollm2#2``) and the nursery every
backend runs in, the admission of new backends (group rules, ``max_loaded_models`` and the
memory budget, decided by ``admission``; fair turns between models that cannot all be
resident), each model's request queue and failure history (policies in ``scheduler``), each
model's pool of endpoints (its replicas and the remotes that serve it; the choice among them
and how many replicas to run are decided by ``endpoints``), unloads, preload, applying a new
catalog (restart what changed, keep what did not), and status snapshots. The remotes
themselves live in ``remote``. The HTTP API and the control plane both call it; it must not
parse HTTP or JSON-RPC, and nothing but the supervisor may start or stop a backend.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping

import attrs
import trio

from routerd import events, llama_args
from routerd.backends import admission, endpoints, scheduler, selectors
from routerd.backends.backend import Backend, BackendSpec, HealthPolicy, State
from routerd.backends.endpoints import Endpoint, Lease
from routerd.backends.memory import MemoryManager
from routerd.backends.remote import Remote, Remotes
from routerd.config import Config
from routerd.errors import InsufficientMemory, LoadFailed, RouterdError, Unavailable
from routerd.models.catalog import Catalog, ModelEntry

log = logging.getLogger("routerd.supervisor")

#: Flags routerd adds when the config does not set them: an explicit context size and no
#: self-shrinking, so a backend never silently sizes itself to whatever a sibling left free.
IMPLIED_FLAGS = (llama_args.Flag("--ctx-size", "4096"), llama_args.Flag("--fit", "off"))


def spec_for(entry: ModelEntry, config: Config, binary: str) -> BackendSpec:
    """The process spec of a model under a config (pure)."""
    flags = llama_args.merge_args(config.backend.args, entry.args)
    extra = [flag for flag in IMPLIED_FLAGS if not llama_args.has_flag(flags, flag.name)]
    extra += [llama_args.Flag("--mmproj", p) for p in entry.mmproj]
    if config.metrics.backends and not llama_args.has_flag(flags, "--metrics"):
        extra.append(llama_args.Flag("--metrics"))  # scraped into routerd's /metrics
    env = {**config.backend.env, **dict(entry.env)}
    return BackendSpec(name=entry.name, binary=binary, model_path=entry.path, flags=tuple(flags),
                       ready_timeout=config.backend.ready_timeout, stop_grace=config.backend.stop_grace,
                       extra=tuple(extra), env=tuple(sorted(env.items())))


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


def _wall(monotonic: float | None) -> float | None:
    return None if monotonic is None else time.time() - (trio.current_time() - monotonic)


class Supervisor:
    def __init__(self, config: Config, catalog: Catalog, binary: str, *, memory: MemoryManager,
                 env: Mapping[str, str] | None = None, bus: events.Bus | None = None) -> None:
        self.config = config
        self.bus = bus if bus is not None else events.Bus()
        self.catalog = catalog
        self.binary = binary
        self.memory = memory
        self._env = dict(os.environ if env is None else env)
        #: Every live backend by key: the model's name for its first replica, ``name#N`` after.
        self._backends: dict[str, Backend] = {}
        self.remotes = Remotes(bus=self.bus, on_change=self._notify_change)
        self._sessions = endpoints.SessionMap(config.scheduler.sticky_sessions, config.scheduler.sticky_ttl)
        #: Models with extra replicas being admitted, or local loads running in the background
        #: (a pool with remotes does not wait for them), and when a failed one may be tried again.
        self._scaling: set[str] = set()
        self._background: dict[str, float] = {}
        self._last_failure: dict[str, Backend] = {}
        self._failures: dict[str, scheduler.FailureHistory] = {}
        self._queues: dict[str, scheduler.ModelQueue] = {}
        self._admitting: dict[str, _Admission] = {}
        #: Models whose turn is up: they take no new requests, finish theirs, and make way.
        self._yielding: set[str] = set()
        #: What each admission is waiting on now: ("evicting" | "busy", the models in the way).
        self._making_room: dict[str, tuple[str, tuple[str, ...]]] = {}
        #: Models whose queue is past its high mark (an event said so; one more when it drains).
        self._queue_high: set[str] = set()
        #: Seconds each model's last load took: the yardstick for "loading X: 45%".
        self._load_seconds: dict[str, float] = {}
        self._admission_lock = trio.Lock()
        self._changed = trio.Event()
        #: Bumped on every change of state, load, queue or catalog: lets views cache.
        self.version = 0
        self._nursery: trio.Nursery | None = None
        self._closing = False

    # -- lifetime ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the backends' nursery until cancelled; cancelling stops every backend."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.remotes.run)
            task_status.started()
            await trio.sleep_forever()

    async def shutdown(self, drain_timeout: float) -> None:
        """Refuse new work, let in-flight requests finish (bounded), stop every backend."""
        self._closing = True
        for backend in list(self._backends.values()):
            backend.request_stop("shutdown", cause="shutdown", drain_timeout=drain_timeout)
        for backend in list(self._backends.values()):
            await backend.wait_gone()

    # -- requests ---------------------------------------------------------------------------
    def enqueue(self, name: str, priority: int = scheduler.PRIORITIES["normal"]) -> scheduler.Ticket:
        """Join ``name``'s queue (429 at once when full); pass the ticket to ``acquire_ticket``."""
        entry = self.catalog.resolve(name)
        ticket = self._queue(entry.name).enter(priority, self.config.scheduler.max_queue_wait)
        self._watch_queue_depth(entry.name)
        self._signal_watchers()
        return ticket

    def dequeue(self, ticket: scheduler.Ticket) -> None:
        """Leave the ticket's queue (its model may have left the catalog since)."""
        queue = self._queues.get(ticket.model)
        if queue is not None:
            queue.leave(ticket)
            self._watch_queue_depth(ticket.model)
        self._signal_watchers()

    def _watch_queue_depth(self, name: str) -> None:
        """``queue.high`` once a queue reaches half its limit, ``queue.normal`` once it is back
        under a quarter (the gap keeps a queue hovering at the mark from flooding consumers)."""
        depth, limit = self.queued(name), self.config.scheduler.max_queue
        if name not in self._queue_high and limit and depth >= max(1, limit // 2):
            self._queue_high.add(name)
            self.bus.publish("queue.high", name, depth=depth, max_queue=limit)
        elif name in self._queue_high and depth <= limit // 4:
            self._queue_high.discard(name)
            self.bus.publish("queue.normal", name, depth=depth, max_queue=limit)

    def requeue(self, ticket: scheduler.Ticket) -> None:
        """Put a dequeued ticket back in its place (its request never reached a backend)."""
        self._queue(ticket.model).rejoin(ticket)
        self._signal_watchers()

    async def acquire_ticket(self, name: str, ticket: scheduler.Ticket, session: str | None = None) -> Lease:
        """An endpoint of ``name``'s pool with one request counted in flight (release it with
        ``lease.endpoint.release()``), once ``ticket``'s turn comes (priority, aging, a free
        slot); 503 at its deadline. ``session`` keeps a conversation on one endpoint (see
        ``endpoints.choose``). Safe to cancel and call again: the ticket keeps its place until
        ``dequeue``."""
        entry = self.catalog.resolve(name)
        queue = self._queue(entry.name)
        with trio.move_on_at(ticket.deadline):
            while True:
                pool = await self._pool(entry)
                if queue.is_next(ticket):
                    lease = self._take(entry, pool, session)
                    if lease is not None:
                        return lease
                with trio.move_on_after(self._scale_timer(entry)):
                    await queue.changed(ticket)
        waited = trio.current_time() - ticket.enqueued
        raise Unavailable(f"waited {waited:.0f} s for {entry.name!r} without a free slot "
                          f"(scheduler.max_queue_wait); retry later", code="queue_timeout", retry_after=5)

    async def acquire_unqueued(self, name: str, session: str | None = None) -> Lease:
        """An endpoint of ``name``'s pool for a request that takes no slot there (llama-server
        answers /tokenize and the like on its HTTP threads): no queue and no wait for a free
        slot, only for a ready endpoint (503 after ``scheduler.max_queue_wait``)."""
        entry = self.catalog.resolve(name)
        with trio.move_on_after(self.config.scheduler.max_queue_wait):
            lease = self._take(entry, await self._pool(entry), session, needs_slot=False)
            if lease is not None:  # None: an empty pool (it changed meanwhile)
                return lease
        raise Unavailable(f"{entry.name!r} was not ready within {self.config.scheduler.max_queue_wait:.0f} s "
                          "(scheduler.max_queue_wait); retry later", code="queue_timeout", retry_after=5)

    def wait_info(self, name: str, ticket: scheduler.Ticket) -> WaitInfo:
        """What the request holding ``ticket`` waits for now."""
        entry = self.catalog.resolve(name)
        name = entry.name
        room = self._making_room.get(name)
        if room is not None:
            return WaitInfo(name, room[0], others=room[1])
        live = self._replicas(name)
        backend = live[0] if live else None
        last = self._load_seconds.get(name)
        if backend is None:
            return WaitInfo(name, "backoff" if self._failures.get(name) else "starting", last_load=last)
        if backend.state is State.STARTING:
            return WaitInfo(name, "loading", elapsed=trio.current_time() - backend.started_at, last_load=last)
        if backend.state is State.STOPPING or backend.stop_requested:
            return WaitInfo(name, "stopping")
        queue = self._queues.get(name)
        return WaitInfo(name, "queued", ahead=queue.ahead_of(ticket) if queue else 0, running=backend.in_flight)

    # -- pools ------------------------------------------------------------------------------
    async def _pool(self, entry: ModelEntry) -> list[tuple[Endpoint, str | None]]:
        """``entry``'s accepting endpoints, each with the model's name there when it differs.

        A remote's model is served by its remote alone: unreachable, a clear 503 at once. A
        local model waits for a ready replica (starting one, with all of admission's errors),
        unless remotes serve it too: then a reachable remote is used while the local replica
        loads in the background.
        """
        if entry.remote:
            remote = await self._reachable(entry.remote, entry.name)
            return [(remote, entry.remote_model if entry.remote_model != entry.name else None)]
        remotes: list[tuple[Endpoint, str | None]] = []
        for remote_name, there in entry.remotes:
            remote = self.remotes.get(remote_name)
            if remote is not None and remote.accepting:
                remotes.append((remote, there if there != entry.name else None))
        if not remotes:
            await self._ready_backend(entry)  # which also scales
        else:
            if not self._live_replicas(entry.name):
                self._load_in_background(entry)
            self._scale(entry)
        local: list[tuple[Endpoint, str | None]] = [
            (b, None) for b in self._replicas(entry.name) if b.accepting and b.key not in self._yielding]
        return local + remotes

    async def _reachable(self, remote_name: str, model: str) -> Remote:
        remote = self.remotes.get(remote_name)
        if remote is not None and remote.state == "unknown":  # just configured: its first check
            with trio.move_on_after(remote.check_timeout):
                await remote.checked.wait()
        if remote is None or not remote.accepting:
            why = remote.error if remote is not None else "it is no longer configured"
            raise Unavailable(f"model {model!r} is served by remote {remote_name!r}, which is unreachable: {why}",
                              code="remote_unreachable", retry_after=5)
        return remote

    def _take(self, entry: ModelEntry, pool: list[tuple[Endpoint, str | None]], session: str | None,
              needs_slot: bool = True) -> Lease | None:
        """Choose from ``pool`` (see ``endpoints.choose``) and take a slot there; None if all are
        full (only when ``needs_slot``)."""
        by_key = {endpoint.key: (endpoint, there) for endpoint, there in pool}
        candidates = [endpoints.Candidate(endpoint.key, _outstanding(endpoint, entry, there),
                                          not needs_slot or endpoint.in_flight < endpoint.slots)
                      for endpoint, there in pool]
        now = trio.current_time()
        last = self._sessions.get(entry.name, session, now) if session is not None else None
        chosen = endpoints.choose(candidates, last=last, slack=self.config.scheduler.sticky_slack, session=session)
        if chosen is None:
            return None
        endpoint, there = by_key[chosen]
        if session is not None:
            self._sessions.put(entry.name, session, chosen, now)
        endpoint.acquire()
        return Lease(endpoint, entry.name, there)

    def select(self, selector: str) -> str:
        """The model a request for virtual model ``selector`` goes to now (see ``selectors``)."""
        config = self.config.selectors[selector]
        targets = []
        residents = None
        for name in config.targets:
            entry = self.catalog.get(name)
            if entry is None:
                continue  # not in the catalog (a remote that was never reached): not a choice
            state = self.state_of(entry.name)
            state = "ready" if state == "reachable" else state
            replicas = [b for b in self._replicas(entry.name) if b.accepting]
            remote = self.remotes.get(entry.remote) if entry.remote else None
            capacity = remote.slots if remote is not None else sum(b.slots for b in replicas)
            outstanding = (remote.in_flight if remote is not None else sum(b.in_flight for b in replicas))
            fits = True
            if config.strategy == "warm" and state not in ("ready", "starting") and not entry.remote:
                residents = self.residents() if residents is None else residents
                plan, _, _ = self._best_plan(entry, spec_for(entry, self.config, self.binary), residents)
                busy = {r.name for r in residents if r.busy}
                fits = isinstance(plan, admission.Admit) and not busy & set(plan.group_swap)
            targets.append(selectors.Target(entry.name, state, outstanding + self.queued(entry.name),
                                            max(1, capacity), fits))
        if not targets:
            raise Unavailable(f"none of selector {selector!r}'s targets ({', '.join(config.targets)}) is in the "
                              "catalog: check the names (`routerctl models`)", code="selector_empty")
        return selectors.choose_target(config.strategy, targets, config.per_target)

    def _replicas(self, name: str) -> list[Backend]:
        """``name``'s backends in any state, first replica first."""
        return sorted((b for b in self._backends.values() if b.name == name), key=lambda b: _replica_index(b.key))

    def _live_replicas(self, name: str) -> list[Backend]:
        """Those not asked to stop."""
        return [b for b in self._replicas(name) if _live(b)]

    def _load_in_background(self, entry: ModelEntry) -> None:
        """Start ``entry``'s first replica without waiting for it (a failure is logged, and not
        tried again for a while: the remotes serve meanwhile)."""
        now = trio.current_time()
        if self._background.get(entry.name, -math.inf) > now or self.crash_looping(entry.name):
            return
        self._background[entry.name] = math.inf  # one at a time
        assert self._nursery is not None, "Supervisor.run() is not running"

        async def load() -> None:
            if await self._load_quietly(entry.name):
                self._background.pop(entry.name, None)
            else:
                self._background[entry.name] = trio.current_time() + self.config.scheduler.restart_backoff_max

        self._nursery.start_soon(load, name=f"load {entry.name}")

    def _scale(self, entry: ModelEntry) -> None:
        """Start more replicas of ``entry`` if its policy says so now (in the background)."""
        if entry.max_replicas <= 1 or entry.name in self._scaling or self._closing:
            return
        live = self._live_replicas(entry.name)
        if not live:
            return  # the first replica comes first, the way any model starts
        more = endpoints.replicas_to_start(
            live=len(live), starting=sum(b.state is State.STARTING for b in live), keep=entry.replicas,
            most=entry.max_replicas, oldest_wait=self.oldest_wait(entry.name),
            scale_up_wait=self.config.scheduler.scale_up_wait)
        if more:
            assert self._nursery is not None, "Supervisor.run() is not running"
            self._scaling.add(entry.name)
            self._nursery.start_soon(self._add_replicas, entry, more, name=f"scale {entry.name}")

    def _scale_timer(self, entry: ModelEntry) -> float:
        """Seconds until waiting requests would earn ``entry`` another replica (inf: never)."""
        if entry.max_replicas <= len(self._live_replicas(entry.name)) or entry.name in self._scaling:
            return math.inf
        return max(0.0, self.config.scheduler.scale_up_wait - self.oldest_wait(entry.name)) + 0.01

    async def _add_replicas(self, entry: ModelEntry, count: int) -> None:
        """Admit and start ``count`` more replicas, each only where it fits without evicting a
        busy model (never waiting for room: the ones running serve meanwhile)."""
        try:
            for _ in range(count):
                async with self._admission_lock:
                    if self._closing or self.catalog.get(entry.name) != entry:
                        return
                    spec = spec_for(entry, self.config, self.binary)
                    plan, newcomer, gpu = self._best_plan(entry, spec, self.residents())
                    if not isinstance(plan, admission.Admit) or plan.group_swap:
                        log.info("%s: no room for another replica now (%s)", entry.name,
                                 plan.reason if isinstance(plan, admission.Refuse) else "busy models hold it")
                        return
                    await self._evict(plan, entry.name)
                    await self.memory.wait_released(newcomer.need)
                    backend = self._start(entry, spec, gpu, key=self._next_key(entry.name))
                    self.memory.reserve(backend, newcomer.need)
        except RouterdError as exc:
            log.warning("%s: another replica did not start: %s", entry.name, exc.message)
        finally:
            self._scaling.discard(entry.name)
            self._notify_change()

    def _next_key(self, name: str) -> str:
        if name not in self._backends:
            return name
        return next(f"{name}#{i}" for i in range(2, len(self._backends) + 3) if f"{name}#{i}" not in self._backends)

    def _queue(self, name: str) -> scheduler.ModelQueue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = scheduler.ModelQueue(
                name, limit=self.config.scheduler.max_queue, aging=self.config.scheduler.aging)
        return queue

    def queued(self, name: str) -> int:
        queue = self._queues.get(name)
        return len(queue.tickets) if queue else 0

    def oldest_wait(self, name: str) -> float:
        """Seconds the longest-waiting request for ``name`` has waited (0 when none)."""
        queue = self._queues.get(name)
        if not queue or not queue.tickets:
            return 0.0
        return trio.current_time() - min(t.enqueued for t in queue.tickets)

    # -- failures ---------------------------------------------------------------------------
    def crash_looping(self, name: str) -> bool:
        history = self._failures.get(name)
        policy = self.config.scheduler
        return history is not None and history.broken(trio.current_time(), policy.crash_loop_failures,
                                                      policy.crash_loop_window)

    def _refuse_if_crash_looping(self, name: str) -> None:
        if self.crash_looping(name):
            history = self._failures[name]
            policy = self.config.scheduler
            raise Unavailable(
                f"model {name!r} is failed: {history.recent(trio.current_time(), policy.crash_loop_window)} "
                f"failures within {policy.crash_loop_window:g} s, the last: {history.last_error}. "
                f"Fix the cause, then `routerctl reset {name}`",
                code="model_failed", data={"exit_code": history.exit_code, "log_tail": history.log_tail})

    def reset(self, name: str) -> bool:
        """Forget ``name``'s failures (the crash-loop breaker and backoff); True if there were any."""
        entry = self.catalog.resolve(name)
        had_history = self._failures.pop(entry.name, None) is not None  # a history exists only after a failure
        had = had_history | (self._last_failure.pop(entry.name, None) is not None)
        self._notify_change()
        return had

    async def load(self, name: str) -> Backend:
        """Start ``name`` (if needed) and wait until it is ready."""
        return await self._ready_backend(self.catalog.resolve(name))

    async def _ready_backend(self, entry: ModelEntry) -> Backend:
        """A ready replica of ``entry``, its first started (after any restart backoff) if none runs."""
        if entry.remote:
            raise Unavailable(f"model {entry.name!r} is served by remote {entry.remote!r}; routerd does not "
                              "load it", code="remote_model")
        while True:
            if self._closing:
                raise Unavailable("routerd is shutting down", code="shutting_down")
            self._refuse_if_crash_looping(entry.name)
            replicas = self._replicas(entry.name)
            live = [b for b in replicas if _live(b)]
            ready = [b for b in live if b.state is State.READY and not b.suspect]
            backend = (ready or live or replicas or [None])[0]
            if backend is None:
                history = self._failures.get(entry.name)
                if history is not None:  # restart backoff
                    policy = self.config.scheduler
                    await trio.sleep_until(history.next_start(policy.restart_backoff, policy.restart_backoff_max))
                backend = await self._admit_and_start(entry)
            if backend.state is State.STOPPING or backend.stop_requested:
                await backend.wait_gone()
                continue
            try:
                await backend.wait_ready()
            except LoadFailed:
                if backend.exit_code is not None and backend.exit_code < 0 and not self.crash_looping(entry.name):
                    continue  # killed from outside while loading (the OOM killer, an operator): try again
                raise
            if backend.suspect:  # a call to it just broke: healthy again, or gone (then a new one)
                await backend.wait_trusted()
                continue
            if entry.name in self._failures:
                self._failures[entry.name].loaded()
            if backend.ready_at is not None:
                self._load_seconds[entry.name] = backend.ready_at - backend.started_at
            self._scale(entry)  # replicas = N: the rest follow the first
            return backend

    def unload(self, name: str, *, force: bool = False) -> Backend | None:
        """Ask ``name`` to stop; in-flight requests finish first unless ``force``."""
        entry = self.catalog.resolve(name)
        replicas = self._replicas(entry.name)
        for backend in replicas:
            backend.request_stop("unloaded" if not force else "unloaded (forced)", cause="operator",
                                 drain_timeout=0.0 if force else math.inf)
        return replicas[0] if replicas else None

    def load_soon(self, name: str) -> None:
        """Start loading ``name`` in the background (failures show in status and logs)."""
        assert self._nursery is not None, "Supervisor.run() is not running"
        self._nursery.start_soon(self._load_quietly, name, name=f"load {name}")

    def preload_soon(self) -> None:
        """Start ``scheduler.preload`` in the background, in order, within the memory budget."""
        assert self._nursery is not None, "Supervisor.run() is not running"
        if self.config.scheduler.preload:
            self._nursery.start_soon(self._preload, list(self.config.scheduler.preload), name="preload")

    async def _preload(self, names: list[str]) -> None:
        wanted: list[str] = []
        for name in names:  # aliases become catalog names, so "*" does not start them twice
            try:
                wanted.append(name if name == "*" else self.catalog.resolve(name).name)
            except RouterdError as exc:
                log.warning("preload: %s", exc.message)
        for name in scheduler.preload_order(wanted, [entry.name for entry in self.catalog]):
            entry = self.catalog.get(name)
            if entry is None or entry.remote or self._replicas(entry.name):
                continue
            plan, _, _ = self._best_plan(entry, spec_for(entry, self.config, self.binary), self.residents())
            if not isinstance(plan, admission.Admit) or plan.evict:  # never evict to preload
                log.warning("preload: skipping %s: it does not fit beside the models already loaded", entry.name)
                continue
            await self._load_quietly(entry.name)

    async def _load_quietly(self, name: str) -> bool:
        """Load ``name``; a failure is logged, not raised. Whether it loaded."""
        try:
            await self.load(name)
        except RouterdError as exc:
            log.warning("background load of %s failed: %s", name, exc.message)
            return False
        return True

    def running(self, name: str) -> Backend | None:
        """The first live replica of ``name`` (starting, ready or stopping), if any."""
        replicas = self._replicas(self.catalog.resolve(name).name)
        return replicas[0] if replicas else None

    async def wait_changed(self) -> None:
        """Return after the next change of any backend's state or load."""
        await self._changed.wait()

    def backend(self, name: str) -> Backend | None:
        entry = self.catalog.resolve(name)
        return self.running(entry.name) or self._last_failure.get(entry.name)

    # -- admission --------------------------------------------------------------------------
    async def _admit_and_start(self, entry: ModelEntry) -> Backend:
        if not entry.available:
            raise Unavailable(f"model {entry.name!r} is unavailable: its file {entry.path} is missing",
                              code="model_unavailable")
        pending = self._admitting.get(entry.name)
        if pending is not None:
            # One request per model goes through admission; the others wait for its outcome
            # here rather than on the lock, so none of them is stuck behind other models' turns.
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error.copy()
            existing = self._live_replicas(entry.name)
            return existing[0] if existing else await self._admit_and_start(entry)
        admission_ = self._admitting[entry.name] = _Admission()
        try:
            async with self._admission_lock:
                existing = self._live_replicas(entry.name)
                if existing:
                    return existing[0]
                spec = spec_for(entry, self.config, self.binary)
                need, gpu = await self._make_room(entry, spec)
                backend = self._start(entry, spec, gpu, key=self._next_key(entry.name))
                self.memory.reserve(backend, need)
                return backend
        except RouterdError as exc:
            admission_.error = exc
            raise
        finally:
            del self._admitting[entry.name]
            admission_.done.set()

    async def _make_room(self, entry: ModelEntry, spec: BackendSpec) -> tuple[dict[str, int], str | None]:
        """Evict what the plan says, or wait (bounded) for busy models.

        Returns what the model was admitted with and the GPU chosen for it (None: not routerd's
        choice). Among GPUs, one with room now beats one that needs evictions.
        """
        waited_since = trio.current_time()
        made_yield: set[str] = set()
        try:
            while True:
                residents = self.residents()
                plan, newcomer, gpu = self._best_plan(entry, spec, residents)
                if isinstance(plan, admission.Refuse):
                    raise InsufficientMemory(plan.reason, data=self.memory.explain(newcomer, residents))
                if isinstance(plan, admission.Admit):
                    await self._evict(plan, entry.name)
                    await self.memory.wait_released(newcomer.need)
                    return dict(newcomer.need), gpu
                now = trio.current_time()
                limit = self.config.memory.busy_wait if self.config.memory.when_busy == "wait" else 0.0
                if now - waited_since >= limit:
                    raise InsufficientMemory(
                        f"no room for {entry.name!r}: needs {dict(plan.shortfall)} more and "
                        f"{', '.join(plan.busy) or 'nothing'} is busy",
                        data=self.memory.explain(newcomer, residents), retry_after=5)
                # Fair turns: once this model's oldest request has waited max_turn_wait, residents
                # in its way that have had their own turn (ready that long) stop taking requests.
                turn = self.config.scheduler.max_turn_wait
                waited = max(self.oldest_wait(entry.name), now - waited_since)
                turn_over = {name: now - (self._backends[name].ready_at or now) for name in plan.busy
                             if name in self._backends}
                due = [name for name, served in turn_over.items() if served >= turn]
                if waited >= turn and due:
                    newly = self._take_turn_from(tuple(due), entry.name)
                    if newly:  # those held only by queued demand are evictable now: plan again
                        made_yield |= newly
                        continue
                self._making_room[entry.name] = ("busy", tuple(plan.busy))
                timers = [waited_since + limit - now] + [turn - served for served in turn_over.values() if served < turn]
                if waited < turn:
                    timers.append(turn - waited)
                with trio.move_on_after(max(0.0, min(timers))):
                    await self._changed.wait()
        finally:
            self._making_room.pop(entry.name, None)
            # Models that yielded for a newcomer that gave up (or did not need them) serve again.
            for name in made_yield:
                backend = self._backends.get(name)
                if backend is not None and not backend.stop_requested:
                    self._yielding.discard(name)
            if made_yield:
                self._notify_change()

    def _best_plan(self, entry: ModelEntry, spec: BackendSpec, residents: list[admission.Resident],
                   ) -> tuple[admission.Plan, admission.Newcomer, str | None]:
        """The admission plan on the best placement (see ``_plan_cost``), with its newcomer and GPU."""
        budgets = self.memory.budgets()
        options = []
        for gpu in self.memory.placements(spec):
            newcomer = admission.Newcomer(entry.name, entry.group, self.memory.need(spec, gpu))
            plan = admission.plan_admission(newcomer, residents, budgets, self.config.backend.max_loaded_models)
            options.append((plan, newcomer, gpu))
        # Among equal plans, the GPU with the fewest replicas of this model: replicas spread.
        siblings = [self.memory.usage(b) for b in self._replicas(entry.name)]
        return min(options, key=lambda option: (_plan_cost(option[0]),
                                                sum(1 for used in siblings if option[2] in used)))

    def _take_turn_from(self, busy: tuple[str, ...], waiting: str) -> set[str]:
        """``waiting`` has waited its turn: the models in its way stop taking new requests."""
        added = {name for name in busy if name not in self._yielding}
        for name in added:
            log.info("%s yields to %s (it waited scheduler.max_turn_wait)", name, waiting)
        self._yielding |= added
        self._notify_change()
        return added

    def _resident(self, backend: Backend) -> admission.Resident:
        entry = self.catalog.get(backend.name)
        # Requests waiting for a model count as demand: it is not evicted under them, unless
        # its turn is up (then only what runs keeps it).
        demand = backend.in_flight > 0 or (backend.key not in self._yielding and self.queued(backend.name) > 0)
        return admission.Resident(
            name=backend.key, group=entry.group if entry else "",
            busy=demand and not backend.stop_requested,
            last_used=backend.last_used, usage=self.memory.usage(backend), extra=backend.extra)

    async def _evict(self, plan: admission.Admit, newcomer: str) -> None:
        victims = [self._backends[name] for name in plan.evict if name in self._backends]
        if victims:
            self._making_room[newcomer] = ("evicting", tuple(victim.key for victim in victims))
        for victim in victims:
            if victim.key in plan.group_swap:
                reason, cause = f"group swap for {newcomer}", "group"
            else:
                reason = f"evicted to make room for {newcomer}"
                cause = "turn" if victim.key in self._yielding else "memory"
            if not victim.stop_requested:
                self.bus.publish("model.evicted", victim.name, cause=cause, reason=reason, **{"for": newcomer})
            victim.request_stop(reason, cause=cause, drain_timeout=victim.spec.stop_grace)
        for victim in victims:
            await victim.wait_gone()

    def _start(self, entry: ModelEntry, spec: BackendSpec, gpu: str | None, key: str = "") -> Backend:
        assert self._nursery is not None, "Supervisor.run() is not running"
        env = self._env
        if gpu is not None:  # NVML numbers GPUs in PCI bus order; make CUDA agree
            env = {**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpu.removeprefix("gpu")}
        policy = self.config.scheduler
        key = key or entry.name
        backend = Backend(spec, idle_ttl=self._idle_ttl(entry, key),
                          upstream_read_timeout=self.config.server.upstream_read_timeout,
                          env=env, on_change=self._notify_change, bus=self.bus, key=key,
                          health=HealthPolicy(policy.health_interval, policy.health_timeout, policy.health_failures))
        self._backends[key] = backend
        self.bus.publish("model.loading", entry.name, restart=entry.name in self._failures, device=gpu or "ram",
                         replica=key)
        self._nursery.start_soon(self._run_backend, backend, name=f"backend {key}")
        self._notify_change()
        return backend

    def _idle_ttl(self, entry: ModelEntry, key: str) -> float:
        """Replicas an "auto" model added go after ``scale_down_idle``; the rest follow the model."""
        if _replica_index(key) <= entry.replicas:
            return entry.idle_ttl
        scale_down = self.config.scheduler.scale_down_idle
        return scale_down if entry.idle_ttl <= 0 else min(entry.idle_ttl, scale_down)

    async def _run_backend(self, backend: Backend) -> None:
        try:
            await backend.run()
        finally:
            if self._backends.get(backend.key) is backend:
                del self._backends[backend.key]
            self._yielding.discard(backend.key)
            if backend.error:
                self._last_failure[backend.name] = backend
                was_looping = self.crash_looping(backend.name)
                history = self._failures.setdefault(backend.name, scheduler.FailureHistory())
                history.record(trio.current_time(), backend.error, backend.exit_code, backend.log.text_tail(40))
                if not was_looping and self.crash_looping(backend.name):
                    policy = self.config.scheduler
                    log.error("%s is failed: %d failures within %g s; `routerctl reset %s` once fixed",
                              backend.name, policy.crash_loop_failures, policy.crash_loop_window, backend.name)
                    self.bus.publish("model.crash_loop", backend.name, failures=policy.crash_loop_failures,
                                     window=policy.crash_loop_window, last_error=backend.error)
            else:
                self._last_failure.pop(backend.name, None)
            self._notify_change()

    def _notify_change(self) -> None:
        """A backend changed (state, load): wake every queue and every watcher."""
        self._signal_watchers()
        for queue in self._queues.values():
            queue.wake()

    def _signal_watchers(self) -> None:
        """Wake ``wait_changed()`` callers (status updates, admission waiting for room)."""
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    # -- reload -----------------------------------------------------------------------------
    def apply(self, config: Config, catalog: Catalog) -> dict[str, list[str]]:
        """Switch to a new config and catalog; restart only backends whose process spec changed.

        Removed models stop after their in-flight requests; changed ones restart once idle (the
        next request starts the new spec); the rest keep running, with new TTLs applied.
        """
        old_catalog = self.catalog
        self.config, self.catalog = config, catalog
        self.memory.forget_estimates()  # files may have changed under the same names
        self._sessions.capacity, self._sessions.ttl = config.scheduler.sticky_sessions, config.scheduler.sticky_ttl
        outcome: dict[str, list[str]] = {"restarted": [], "stopped": [], "kept": []}
        for key, backend in list(self._backends.items()):
            entry = catalog.get(backend.name)
            if entry is None or entry.name != backend.name or entry.remote:
                backend.request_stop("removed from config", cause="reload")
                outcome["stopped"].append(key)
            elif spec_for(entry, config, self.binary) != backend.spec:
                backend.request_stop("config changed", cause="reload")
                outcome["restarted"].append(key)
            elif _replica_index(key) > entry.max_replicas:
                backend.request_stop("fewer replicas configured", cause="reload")
                outcome["stopped"].append(key)
            else:
                backend.set_idle_ttl(self._idle_ttl(entry, key))
                outcome["kept"].append(key)
        for name in set(self._last_failure) | set(self._failures):
            old, new = old_catalog.get(name), catalog.get(name)
            if new is None or old != new:  # a changed model gets a fresh start
                self._last_failure.pop(name, None)
                self._failures.pop(name, None)
        for queue in self._queues.values():
            queue.limit, queue.aging = config.scheduler.max_queue, config.scheduler.aging
        self._notify_change()
        return outcome

    # -- status -----------------------------------------------------------------------------
    def status(self) -> list[ModelStatus]:
        return [self.model_status(entry) for entry in self.catalog]

    def model_status(self, entry: ModelEntry) -> ModelStatus:
        replicas = self._replicas(entry.name)
        backend = replicas[0] if replicas else None
        shown = backend or self._last_failure.get(entry.name)
        history = self._failures.get(entry.name)
        state = self.state_of(entry.name)
        pool = self._pool_status(entry, replicas)
        if entry.remote:
            remote = self.remotes.get(entry.remote)
            return ModelStatus(
                name=entry.name, aliases=list(entry.aliases), group=entry.group, source=entry.source,
                catalog=entry.state, path=entry.path, available=True, state=state,
                in_flight=remote.in_flight if remote else 0,
                queued=self.queued(entry.name), oldest_wait=self.oldest_wait(entry.name),
                last_error=remote.error if remote else "remote not configured", endpoints=pool)
        return ModelStatus(
            name=entry.name, aliases=list(entry.aliases), group=entry.group, source=entry.source,
            catalog=entry.state,
            path=entry.path, available=entry.available, state=state,
            pid=backend.pid if backend else None, port=backend.port if backend else None,
            in_flight=sum(b.in_flight for b in replicas),
            queued=self.queued(entry.name), oldest_wait=self.oldest_wait(entry.name),
            last_used=_wall(shown.last_used) if shown else None,
            idle_ttl=entry.idle_ttl,
            idle_ttl_left=backend.idle_ttl_left() if backend else None,
            last_error=history.last_error if history else None,
            exit_code=shown.exit_code if shown else None,
            memory=self.memory.model_report(entry, spec_for(entry, self.config, self.binary), backend),
            metadata=self.catalog.metadata(entry),
            endpoints=pool,
        )

    def _pool_status(self, entry: ModelEntry, replicas: list[Backend]) -> list[dict[str, object]]:
        """Each endpoint of ``entry``: its replicas, then its remotes."""
        shown: list[dict[str, object]] = [
            {"endpoint": b.key, "kind": "local", "state": b.state.value, "in_flight": b.in_flight,
             "slots": b.slots, "pid": b.pid, "port": b.port} for b in replicas]
        listed = [(entry.remote, entry.remote_model)] if entry.remote else list(entry.remotes)
        for remote_name, there in listed:
            remote = self.remotes.get(remote_name)
            if remote is None:
                continue
            shown.append({"endpoint": remote.key, "kind": "remote", "remote": remote_name, "model": there,
                          "url": remote.config.url, "state": remote.state, "in_flight": remote.in_flight,
                          "slots": remote.slots, "queued_there": remote.queued.get(there, 0),
                          "error": remote.error})
        return shown

    def remotes_status(self) -> list[dict[str, object]]:
        """Each remote: where, its state, its load and its models."""
        return [{"name": r.name, "url": r.config.url, "state": r.state, "error": r.error, "in_flight": r.in_flight,
                 "max_concurrent": r.slots, "models": list(r.models)} for r in self.remotes]

    def selectors_status(self) -> list[dict[str, object]]:
        """Each virtual model: its strategy and targets, with each target's state now."""
        return [{"name": name, "strategy": s.strategy, "per_target": s.per_target,
                 "targets": [{"model": t, "state": self.state_of(t) if t in self.catalog else "not in catalog"}
                             for t in s.targets]} for name, s in self.config.selectors.items()]

    def residents(self) -> list[admission.Resident]:
        return [self._resident(b) for b in self._backends.values()]

    def memory_view(self) -> dict[str, object]:
        """Per device budget and use; per model estimate, measurement and whether it fits."""
        residents = self.residents()
        models = []
        for entry in self.catalog:
            if entry.remote:
                continue  # memory on another host is that host's budget
            spec = spec_for(entry, self.config, self.binary)
            backend = self.running(entry.name)
            report = self.memory.model_report(entry, spec, backend)
            if backend is not None:
                fits_now = fits_after = True
                placed = self.memory.usage(backend)
            else:
                plan, newcomer, _ = self._best_plan(entry, spec, residents)
                fits_now = isinstance(plan, admission.Admit) and not plan.evict
                fits_after = isinstance(plan, admission.Admit)
                report["evicts"] = list(plan.evict) if isinstance(plan, admission.Admit) else None
                placed = newcomer.need
            device = [d for d in placed if d != "ram"] or ["ram"]
            models.append({"model": entry.name, "state": self.state_of(entry.name), "device": device[0],
                           "fits_now": fits_now, "fits_after_eviction": fits_after, **report})
        return {"devices": self.memory.report(residents), "models": models}

    def state_of(self, name: str) -> str:
        """A model's state, cheaply (no memory measurement): for counts and summaries. A
        remote's model is ``reachable``, ``unreachable`` or ``unknown`` (not checked yet)."""
        entry = self.catalog.get(name)
        if entry is not None and entry.remote:
            remote = self.remotes.get(entry.remote)
            return remote.state if remote is not None else "unreachable"
        replicas = self._replicas(name)
        if replicas:
            states = [b.state for b in replicas]
            return (State.READY if State.READY in states else states[0]).value
        if self.crash_looping(name) or name in self._last_failure:
            return State.FAILED.value
        return State.UNLOADED.value

    def counts(self) -> dict[str, int]:
        states = [self.state_of(entry.name) for entry in self.catalog]
        return {"models": len(states), "ready": states.count("ready"),
                "starting": states.count("starting"), "failed": states.count("failed")}


@attrs.define
class _Admission:
    """A model's admission in progress, for the other requests that want it to await."""

    done: trio.Event = attrs.field(factory=trio.Event)
    error: RouterdError | None = None


def _live(backend: Backend) -> bool:
    """Not asked to stop: it serves, or will once loaded."""
    return not backend.stop_requested and backend.state is not State.STOPPING


def _replica_index(key: str) -> int:
    """1 for a model's first replica (keyed by its name), N for ``name#N``."""
    _, sep, number = key.rpartition("#")
    return int(number) if sep and number.isdigit() else 1


def _outstanding(endpoint: Endpoint, entry: ModelEntry, there: str | None) -> int:
    """What an endpoint holds: a remote routerd's own queue for the model counts too."""
    if isinstance(endpoint, Remote):
        return endpoint.outstanding(there or entry.remote_model or entry.name)
    return endpoint.in_flight


def _plan_cost(plan: admission.Plan) -> tuple[int, int]:
    """Order admission options: start now, then start after the fewest evictions, then wait."""
    if isinstance(plan, admission.Admit):
        return (0, len(plan.evict) - len(plan.group_swap))
    return (1, 0) if isinstance(plan, admission.Wait) else (2, 0)


def error_for(exc: BaseException) -> RouterdError:
    """Any exception as a RouterdError, for the edges."""
    if isinstance(exc, RouterdError):
        return exc
    return RouterdError(f"internal error: {type(exc).__name__}: {exc}")
