"""The supervisor: which backends run, and getting an endpoint for a request.

Owns the nursery every backend runs in, each model's record (``modelstate``: its replicas,
failure history, admission and turn), starting and watching backends, the first-replica
lifecycle (load with restart backoff and the crash-loop breaker, unload, reset, preload),
applying a new catalog (restart what changed, keep what did not), and the public surface the
HTTP API and the control plane call. The parts live beside it, each reaching it through a narrow
interface: ``scheduler.Queues`` (every model's request queue), ``placement`` (admission,
eviction, fair turns, extra replicas), ``pools`` (an endpoint for each request, background
loads, scaling, virtual models) and ``status`` (the views). The remotes themselves live in
``remote``. It must not parse HTTP or JSON-RPC; nothing outside the supervisor and its parts may
start or stop a backend (placement stops the ones it evicts, through their ``request_stop``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from routerd import events, paths
from routerd.backends import admission, scheduler, slots, status
from routerd.backends.backend import Backend, BackendSpec, Spawn, State
from routerd.backends.endpoints import Lease
from routerd.backends.health import HealthPolicy
from routerd.backends.memory import MemoryManager
from routerd.backends.modelstate import ModelStates, idle_ttl, live, replica_index
from routerd.backends.placement import Placement, spec_for
from routerd.backends.pools import Pools
from routerd.backends.remote import Remotes
from routerd.backends.slots import SlotStore
from routerd.backends.status import ModelStatus, WaitInfo
from routerd.config import Config, parse_size
from routerd.errors import LoadFailed, RouterdError, Unavailable
from routerd.llama_build import Builds
from routerd.models.catalog import Catalog, ModelEntry

log = logging.getLogger("routerd.supervisor")


class Supervisor:
    """Every backend's life, and the one door requests and operators go through to them."""

    def __init__(self, config: Config, catalog: Catalog, binary: str, *, memory: MemoryManager,
                 env: Mapping[str, str] | None = None, bus: events.Bus | None = None,
                 spawn: Spawn | None = None) -> None:
        self.config = config
        #: How each backend's process is started (None: ``child.spawn``; the timer tests run
        #: in-process stand-ins on MockClock).
        self._spawn = spawn
        self.bus = bus if bus is not None else events.Bus()
        self.catalog = catalog
        self.binary = binary
        #: What each llama-server binary is and knows, asked once per file; not asked when the
        #: processes are in-process stand-ins (there is no binary to ask).
        self.builds = Builds()
        self.probes_builds = spawn is None
        #: The saved conversations (KV slots) of every model.
        self.slot_store = SlotStore(config.slots.directory or os.path.join(paths.state_dir(env), "slots"),
                                    parse_size(config.slots.disk_budget), self.bus)
        self.memory = memory
        self._env = dict(os.environ if env is None else env)
        self.remotes = Remotes(bus=self.bus, on_change=self.notify_change)
        self.models = ModelStates()
        self.queues = scheduler.Queues(limit=config.scheduler.max_queue, aging=config.scheduler.aging, bus=self.bus)
        self.placement = Placement(self)
        self.pools = Pools(self)
        self._changed = trio.Event()
        #: Bumped on every change of state, load, queue or catalog: lets views cache.
        self.version = 0
        self._nursery: trio.Nursery | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        """Shutting down: no new backends, no new work."""
        return self._closing

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
        for backend in list(self.models.backends().values()):
            backend.request_stop("shutdown", cause="shutdown", drain_timeout=drain_timeout)
        for backend in list(self.models.backends().values()):
            await backend.wait_gone()

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        """Run a task in the backends' nursery (it lives as long as they do)."""
        assert self._nursery is not None, "Supervisor.run() is not running"
        self._nursery.start_soon(async_fn, *args, name=name)

    # -- requests ---------------------------------------------------------------------------
    def enqueue(self, name: str, priority: int = scheduler.PRIORITIES["normal"]) -> scheduler.Ticket:
        """Join ``name``'s queue (429 at once when full); pass the ticket to ``acquire_ticket``."""
        ticket = self.queues.enter(self.catalog.resolve(name).name, priority, self.config.scheduler.max_queue_wait)
        self._signal_watchers()
        return ticket

    def dequeue(self, ticket: scheduler.Ticket) -> None:
        """Leave the ticket's queue (its model may have left the catalog since)."""
        self.queues.leave(ticket)
        self._signal_watchers()

    def requeue(self, ticket: scheduler.Ticket) -> None:
        """Put a dequeued ticket back in its place (its request never reached a backend)."""
        self.queues.rejoin(ticket)
        self._signal_watchers()

    async def acquire_ticket(self, name: str, ticket: scheduler.Ticket, session: str | None = None) -> Lease:
        """An endpoint of ``name``'s pool with one request counted in flight (release it with
        ``lease.endpoint.release()``), once ``ticket``'s turn comes (priority, aging, a free
        slot); 503 at its deadline. ``session`` keeps a conversation on one endpoint (see
        ``endpoints.choose``). Safe to cancel and call again: the ticket keeps its place until
        ``dequeue``."""
        return await self.pools.acquire_ticket(name, ticket, session)

    def acquire_now(self, name: str, ticket: scheduler.Ticket | None, session: str | None = None) -> Lease | None:
        """The lease ``acquire_ticket`` (no ticket: ``acquire_unqueued``) gives at once when
        nothing has to wait, else None (see ``Pools.acquire_now``)."""
        return self.pools.acquire_now(name, ticket, session)

    async def acquire_unqueued(self, name: str, session: str | None = None) -> Lease:
        """An endpoint of ``name``'s pool for a request that takes no slot there (llama-server
        answers /tokenize and the like on its HTTP threads): no queue and no wait for a free
        slot, only for a ready endpoint (503 after ``scheduler.max_queue_wait``)."""
        return await self.pools.acquire_unqueued(name, session)

    def wait_info(self, name: str, ticket: scheduler.Ticket) -> WaitInfo:
        """What the request holding ``ticket`` waits for now."""
        return status.wait_info(self, name, ticket)

    def select(self, selector: str) -> str:
        """The model a request for virtual model ``selector`` goes to now (see ``selectors``)."""
        return self.pools.select(selector)

    def queued(self, name: str) -> int:
        return self.queues.depth(name)

    # -- failures ---------------------------------------------------------------------------
    def crash_looping(self, name: str) -> bool:
        state = self.models.get(name)
        return state is not None and state.crash_looping(trio.current_time(), self.config.scheduler)

    def reset(self, name: str) -> bool:
        """Forget ``name``'s failures (the crash-loop breaker and backoff); True if there were any."""
        had = self.models[self.catalog.resolve(name).name].forget_failures()
        self.notify_change()
        return had

    # -- the first replica: load, unload, preload ---------------------------------------------
    async def load(self, name: str) -> Backend:
        """Start ``name`` (if needed) and wait until it is ready."""
        return await self.ready_backend(self.catalog.resolve(name))

    async def ready_backend(self, entry: ModelEntry) -> Backend:
        """A ready replica of ``entry``, its first started (after any restart backoff) if none runs."""
        if entry.remote:
            raise Unavailable(f"model {entry.name!r} is served by remote {entry.remote!r}; routerd does not "
                              "load it", code="remote_model")
        state = self.models[entry.name]
        while True:
            if self._closing:
                raise Unavailable("routerd is shutting down", code="shutting_down")
            state.refuse_if_crash_looping(trio.current_time(), self.config.scheduler)
            replicas = state.sorted_replicas()
            running = [b for b in replicas if live(b)]
            ready = [b for b in running if b.state is State.READY and not b.suspect]
            found = ready or running or replicas
            backend = found[0] if found else None
            if backend is None:
                if state.failures is not None:  # restart backoff
                    policy = self.config.scheduler
                    await trio.sleep_until(state.failures.next_start(policy.restart_backoff,
                                                                     policy.restart_backoff_max))
                backend = await self.placement.admit_and_start(entry)
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
            if state.failures is not None:
                state.failures.loaded()
            if backend.ready_at is not None:
                state.load_seconds = backend.ready_at - backend.started_at
            self.pools.scale(entry)  # replicas = N: the rest follow the first
            return backend

    def unload(self, name: str, *, force: bool = False) -> list[Backend]:
        """Ask every replica of ``name`` to stop (in-flight requests finish first unless
        ``force``); returns them, first replica first, to await."""
        replicas = self.models.replicas(self.catalog.resolve(name).name)
        for backend in replicas:
            backend.request_stop("unloaded" if not force else "unloaded (forced)", cause="operator",
                                 drain_timeout=0.0 if force else math.inf)
        return replicas

    def load_soon(self, name: str) -> None:
        """Start loading ``name`` in the background (failures show in status and logs)."""
        self.start_soon(self.load_quietly, name, name=f"load {name}")

    def preload_soon(self) -> None:
        """Start ``scheduler.preload`` in the background, in order, within the memory budget."""
        assert self._nursery is not None, "Supervisor.run() is not running"
        if self.config.scheduler.preload:
            self.start_soon(self.pools.preload, list(self.config.scheduler.preload), name="preload")

    async def load_quietly(self, name: str) -> RouterdError | None:
        """Load ``name`` for nobody in particular: a failure is logged and published (a refusal
        as ``model.load_refused``; a process that failed says so itself), and returned."""
        try:
            await self.load(name)
        except RouterdError as exc:
            log.warning("background load of %s failed: %s", name, exc.message)
            if not isinstance(exc, LoadFailed):
                self.bus.publish(events.EventType.MODEL_LOAD_REFUSED, name, error=exc.message, code=exc.code)
            return exc
        return None

    def running(self, name: str) -> Backend | None:
        """The first live replica of ``name`` (starting, ready or stopping), if any."""
        replicas = self.models.replicas(self.catalog.resolve(name).name)
        return replicas[0] if replicas else None

    def backend(self, name: str) -> Backend | None:
        entry = self.catalog.resolve(name)
        state = self.models.get(entry.name)
        return self.running(entry.name) or (state.last_failure if state is not None else None)

    async def wait_changed(self) -> None:
        """Return after the next change of any backend's state or load."""
        await self._changed.wait()

    # -- backends -----------------------------------------------------------------------------
    def start_backend(self, entry: ModelEntry, spec: BackendSpec, gpu: str | None, key: str) -> Backend:
        """Start a backend admitted by ``placement``, as replica ``key`` (on ``gpu``, if chosen)."""
        assert self._nursery is not None, "Supervisor.run() is not running"
        env = self._env
        if gpu is not None:  # NVML numbers GPUs in PCI bus order; make CUDA agree
            env = {**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpu.removeprefix("gpu")}
        policy = self.config.scheduler
        build = self.builds.known(spec.binary)
        keeper = slots.keeper_for(self.slot_store, spec.name, spec.model_path, (*spec.flags, *spec.extra), spec.slots,
                                  build.version if build and build.knows("--slot-save-path") else None,
                                  self.config.slots.save_timeout) if key == entry.name else None
        backend = Backend(spec, idle_ttl=idle_ttl(entry, key, policy.scale_down_idle),
                          upstream_read_timeout=self.config.server.upstream_read_timeout,
                          env=env, on_change=self.notify_change, bus=self.bus, key=key, spawn_with=self._spawn,
                          build=build, keeper=keeper,
                          health=HealthPolicy(policy.health_interval, policy.health_timeout, policy.health_failures))
        self.models.add(backend)
        restart = self.models[entry.name].failures is not None
        self.bus.publish(events.EventType.MODEL_LOADING, entry.name, restart=restart, device=gpu or "ram",
                         replica=key)
        self._nursery.start_soon(self._run_backend, backend, name=f"backend {key}")
        self.notify_change()
        return backend

    def next_key(self, name: str) -> str:
        return self.models[name].next_key()

    async def _run_backend(self, backend: Backend) -> None:
        try:
            await backend.run()
        finally:
            self.models.remove(backend)
            state = self.models[backend.name]
            if backend.error:
                was_looping = self.crash_looping(backend.name)
                state.record_failure(backend, trio.current_time())
                if not was_looping and self.crash_looping(backend.name):
                    policy = self.config.scheduler
                    log.error("%s is failed: %d failures within %g s; `routerctl reset %s` once fixed",
                              backend.name, policy.crash_loop_failures, policy.crash_loop_window, backend.name)
                    self.bus.publish(events.EventType.MODEL_CRASH_LOOP, backend.name,
                                     failures=policy.crash_loop_failures, window=policy.crash_loop_window,
                                     last_error=backend.error)
            else:
                state.last_failure = None
            self.notify_change()

    def notify_change(self) -> None:
        """A backend changed (state, load): wake every queue and every watcher."""
        self._signal_watchers()
        self.queues.wake_all()

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
        self.slot_store.budget = parse_size(config.slots.disk_budget)
        self.memory.forget_estimates()  # files may have changed under the same names
        self.pools.configure(config)
        outcome: dict[str, list[str]] = {"restarted": [], "stopped": [], "kept": []}
        for key, backend in self.models.backends().items():
            entry = catalog.get(backend.name)
            if entry is None or entry.name != backend.name or entry.remote:
                backend.request_stop("removed from config", cause="reload")
                outcome["stopped"].append(key)
            elif spec_for(entry, config, self.binary, self.slot_store.root) != backend.spec:
                backend.request_stop("config changed", cause="reload")
                outcome["restarted"].append(key)
            elif replica_index(key) > entry.max_replicas:
                backend.request_stop("fewer replicas configured", cause="reload")
                outcome["stopped"].append(key)
            else:
                backend.set_idle_ttl(idle_ttl(entry, key, config.scheduler.scale_down_idle))
                outcome["kept"].append(key)
        for state in self.models:
            old, new = old_catalog.get(state.name), catalog.get(state.name)
            if new is None or old != new:  # a changed model gets a fresh start
                state.forget_failures()
        self.queues.configure(limit=config.scheduler.max_queue, aging=config.scheduler.aging)
        self.notify_change()
        return outcome

    # -- status -----------------------------------------------------------------------------
    def status(self) -> list[ModelStatus]:
        return status.status(self)

    def model_status(self, entry: ModelEntry) -> ModelStatus:
        return status.model_status(self, entry)

    def remotes_status(self) -> list[dict[str, object]]:
        return status.remotes_status(self)

    def selectors_status(self) -> list[dict[str, object]]:
        return status.selectors_status(self)

    def memory_view(self) -> dict[str, object]:
        return status.memory_view(self)

    def residents(self) -> list[admission.Resident]:
        return self.placement.residents()

    def state_of(self, name: str) -> str:
        return status.state_of(self, name)

    def counts(self) -> dict[str, int]:
        return status.counts(self)
