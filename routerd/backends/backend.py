"""One llama-server process: spawn, readiness, output capture, idle timer, stop.

A Backend lives for exactly one process. Its ``run()`` is the process's whole life and owns one
nursery (output pump, exit watcher, readiness, idle timer); when ``run()`` returns the process
is gone and reaped. The supervisor decides *when* a backend starts and stops; this module must
not decide that, and must not know about other backends, HTTP routes or the memory budget.
The process comes from a ``Spawn`` (``child.spawn`` unless the supervisor is given another, as
the timer tests do to run a backend's whole life in-process on trio's MockClock).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Protocol

import attrs
import trio

from routerd import events, llama_args
from routerd.backends.child import spawn
from routerd.backends.health import HealthPolicy, Trust, healthy, watch
from routerd.backends.logring import LogRing
from routerd.backends.slots import SAVE_CAUSES, SlotKeeper
from routerd.backends.upstream import ConnectionPool
from routerd.errors import LoadFailed
from routerd.events import EventType
from routerd.llama_build import ADDED_FLAGS, Build

log = logging.getLogger("routerd.backend")
LOG_TAIL_LINES = 15
#: Once loaded, the output pipe is read at most this often. llama-server prints ~10 lines per
#: request; waking for each one takes CPU from the generating threads on small machines
#: (sequential 1-token chats 17.7 -> 13.0 ms, routerd CPU -28%). While loading, every line counts
#: (readiness and the stall timeout), so reads stay immediate.
OUTPUT_BATCH_INTERVAL = 0.02
#: Seconds one /health check may take while loading (a loading llama-server answers 503 at once).
READY_CHECK_TIMEOUT = 2.0
#: How long a failed call waits for its backend's exit to be noticed (the exit watcher reads
#: the last output for up to 0.5 s first).
EXIT_NOTICE_TIME = 1.0


class State(enum.StrEnum):
    UNLOADED = "unloaded"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@attrs.frozen
class BackendSpec:
    """Everything that determines the process; a changed spec means a restart."""

    name: str
    binary: str
    model_path: str
    flags: tuple[llama_args.Flag, ...]
    ready_timeout: float
    stop_grace: float
    extra: tuple[llama_args.Flag, ...] = ()
    #: Variables the config sets for this process (backend.env, then the model's env).
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, port: int, build: Build | None = None) -> list[str]:
        """Its command line; with ``build``, without the flags routerd adds that the build does
        not know (the configured ones are the user's: they go as written)."""
        extra = self.extra if build is None else tuple(flag for flag in self.extra if build.knows(flag.name))
        alias = self.name if build is None or build.knows("--alias") else None
        return llama_args.build_argv(self.binary, self.flags, model_path=self.model_path, port=port,
                                     alias=alias, extra=extra)

    def lacking(self, build: Build) -> list[str]:
        """The flags routerd would add that ``build`` does not know (pure)."""
        wanted = {flag.name for flag in self.extra} | {"--alias"}
        return [flag for flag in ADDED_FLAGS if flag in wanted and not build.knows(flag)]

    @property
    def slots(self) -> int:
        """Parallel slots llama-server will run (its default is 4)."""
        value = llama_args.flag_value(self.flags, "--parallel")
        try:
            return max(1, int(value)) if value is not None else 4
        except ValueError:
            return 4

    @property
    def http_threads(self) -> int:
        """HTTP requests llama-server serves at once: ``--threads-http``, else at least its
        default, the larger of slots + 2 and the machine's cores - 1 (newer builds add more)."""
        value = llama_args.flag_value(self.flags, "--threads-http") or llama_args.flag_value(self.flags, "-tht")
        try:
            threads = int(value) if value is not None else 0
        except ValueError:
            threads = 0
        return threads if threads > 0 else max(self.slots + 2, (os.cpu_count() or 1) - 1)


#: The /health watch a backend gets unless the supervisor passes the configured one.
DEFAULT_HEALTH = HealthPolicy()

#: What a llama-server keeps from routerd's environment: the system basics, and what llama.cpp,
#: its math libraries and the GPU runtimes read. Everything else stays behind: routerd's own
#: secrets (HF_TOKEN, remote endpoints' keys) and service context (NOTIFY_SOCKET: a child
#: could tell systemd it is ready on routerd's behalf).
KEPT_VARIABLES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
                            "LD_LIBRARY_PATH", "LD_PRELOAD", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"})
KEPT_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "__NV_", "CUBLAS_", "HIP_", "ROCM_", "ROCR_", "HSA_", "GPU_",
                 "AMD_", "GGML_", "LLAMA_ARG_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "BLIS_",
                 "VK_", "MESA_", "SYCL_", "ONEAPI_", "ZE_", "OCL_", "MUSA_", "CANN_", "ASCEND_")
#: The variable llama-server reads its API key from (argv is world-readable; the environment
#: of another user's process is not).
API_KEY_VARIABLE = "LLAMA_API_KEY"


def child_environment(inherited: Mapping[str, str], configured: Mapping[str, str], api_key: str) -> dict[str, str]:
    """A llama-server's whole environment (pure): the kept part of routerd's, what the config
    sets, and its own API key (which nothing overrides)."""
    kept = {name: value for name, value in inherited.items()
            if name in KEPT_VARIABLES or name.startswith(KEPT_PREFIXES)}
    return {**kept, **configured, API_KEY_VARIABLE: api_key}


def free_port() -> int:
    """A loopback port free right now (taken at spawn time, never from a fixed range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process(Protocol):
    """What a backend needs of its process (``child.Child`` in production; tests put an
    in-process stand-in here to run the timers on trio's MockClock)."""

    @property
    def pid(self) -> int: ...

    @property
    def output(self) -> trio.abc.ReceiveStream:
        """Its stdout and stderr, merged; EOF once it has exited."""
        ...

    async def wait(self) -> int:
        """Its exit status, once it has exited (any number of tasks may wait)."""
        ...

    async def stop(self, grace: float | None = None) -> int:
        """Stop it (shielded); its exit status."""
        ...

    async def __aenter__(self) -> Process: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


class Spawn(Protocol):
    """How a backend's process is started: ``child.spawn``'s signature."""

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], stop_grace: float) -> Process: ...


class Backend:
    """The live state of one llama-server process, from spawn to reaping."""

    def __init__(self, spec: BackendSpec, *, idle_ttl: float, upstream_read_timeout: float,
                 env: Mapping[str, str] | None = None, on_change: Callable[[], None] = lambda: None,
                 health: HealthPolicy = DEFAULT_HEALTH, bus: events.Bus | None = None, key: str = "",
                 spawn_with: Spawn | None = None, build: Build | None = None,
                 keeper: SlotKeeper | None = None) -> None:
        self.spec = spec
        #: What its binary is and knows (None: not asked; every flag is passed).
        self.build = build
        #: Its conversations saved when it stops on purpose and restored as it starts (None: not kept).
        self.keeper = keeper
        #: How its process starts: ``child.spawn`` (looked up at start) unless given another.
        self._spawn_with = spawn_with
        #: Unique among endpoints: the model's name, or ``name#2``... for further replicas.
        self.key = key or spec.name
        self.label = f"backend for {spec.name!r}" + (f" (replica {self.key})" if self.key != spec.name else "")
        self.bus = bus if bus is not None else events.Bus()
        self.health = health
        self.idle_ttl = idle_ttl
        self.state = State.STARTING
        self.log = LogRing()
        self.pid: int | None = None
        self.port: int | None = None
        self.in_flight = 0
        self.started_at = trio.current_time()
        self.ready_at: float | None = None
        self.last_used = trio.current_time()
        self.exit_code: int | None = None
        self.error: str | None = None
        self.stop_reason: str | None = None
        #: Why it was asked to stop, in one word for metrics: idle, memory, group, turn, reload,
        #: operator, shutdown, unresponsive.
        self.stop_cause: str | None = None
        self.upstream: ConnectionPool | None = None  # set while ready: the proxy's way in
        self._upstream_read_timeout = upstream_read_timeout
        self._env = dict(os.environ if env is None else env)
        self._on_change = on_change
        self._settled = trio.Event()  # ready, or gone
        self._gone = trio.Event()
        self._stop_requested = trio.Event()
        self._drain_timeout = math.inf
        self._expect_exit = False
        self._activity = trio.Event()
        self._idle_deadline: trio.CancelScope | None = None  # the idle timer's, while it runs
        self._output_seen = trio.Event()
        self._last_output = trio.current_time()
        self._output_done = trio.Event()
        self._trust = Trust()

    # -- what the supervisor and proxy use -------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def gone(self) -> bool:
        return self._gone.is_set()

    @property
    def slots(self) -> int:
        return self.spec.slots

    @property
    def extra(self) -> bool:
        """A replica beyond the model's first (the first to go when memory is needed)."""
        return self.key != self.spec.name

    async def failure_reason(self, exc: BaseException) -> str:
        """After a broken call: give a dying process a moment to be reaped (its exit status is
        the real reason, and a backend that is gone is not chosen again)."""
        self.distrust()
        with trio.move_on_after(EXIT_NOTICE_TIME):
            await self.wait_gone()
        return self.error or str(exc)

    @property
    def accepting(self) -> bool:
        """Ready, trusted and not asked to stop: new requests may be sent here."""
        return self.state is State.READY and not self._stop_requested.is_set() and self._trust.trusted

    @property
    def suspect(self) -> bool:
        """A call to it broke and /health has not answered since (see ``distrust``)."""
        return not self._trust.trusted

    def slot_for_session(self, session: str) -> int | None:
        return self.keeper.slot_for(session) if self.keeper is not None else None

    def distrust(self) -> None:
        """A call to this backend broke: send it nothing new until /health answers again (see
        ``health.Trust``; the backend's own task does the checking)."""
        if self.state is not State.READY or self.suspect:
            return
        self._trust.distrust()
        self._touch()

    async def wait_trusted(self) -> None:
        """Return once the backend is trusted again, or gone."""
        await self._trust.wait_trusted()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    async def wait_ready(self) -> None:
        """Return once ready; raise LoadFailed if the process ends first."""
        await self._settled.wait()
        if self.state is not State.READY:
            raise LoadFailed(self.failure_message(), data=self.failure_data())

    async def wait_gone(self) -> None:
        await self._gone.wait()

    def failure_message(self) -> str:
        what = self.error or f"backend for {self.name!r} stopped ({self.stop_reason or 'unloaded'})"
        return f"model {self.name!r} failed to start: {what}"

    def failure_data(self) -> dict[str, object]:
        return {"exit_code": self.exit_code, "log_tail": self.log.text_tail(LOG_TAIL_LINES)}

    def acquire(self) -> None:
        self.in_flight += 1
        self._touch()

    def release(self) -> None:
        self.in_flight -= 1
        self.last_used = trio.current_time()
        self._touch()

    def set_idle_ttl(self, ttl: float) -> None:
        self.idle_ttl = ttl
        self._touch()

    def idle_ttl_left(self) -> float | None:
        if self.state is not State.READY or self.in_flight or self.idle_ttl <= 0:
            return None
        return max(0.0, self.last_used + self.idle_ttl - trio.current_time())

    def request_stop(self, reason: str, *, cause: str, drain_timeout: float = math.inf) -> None:
        """Ask the backend to stop once in-flight requests end (at most ``drain_timeout`` s);
        ``reason`` is said to people, ``cause`` is one of the words of ``stop_cause``."""
        if self._stop_requested.is_set():
            self._drain_timeout = min(self._drain_timeout, drain_timeout)
        else:
            self.stop_reason, self.stop_cause = reason, cause
            self._drain_timeout = drain_timeout
            self._stop_requested.set()
        self._touch()

    # -- the process's life ----------------------------------------------------------------
    async def run(self) -> None:
        """Spawn, wait for readiness, serve until asked to stop, stop. Returns when reaped."""
        try:
            await self._run()
        finally:
            self.state = State.FAILED if self.error else State.UNLOADED
            self.upstream = None
            self.log.close()
            while_loading = self.ready_at is None
            if self.error:
                self.bus.publish(EventType.MODEL_FAILED, self.name, error=self.error, exit_code=self.exit_code,
                                 while_loading=while_loading)
            else:
                self.bus.publish(EventType.MODEL_STOPPED, self.name, reason=self.stop_reason, cause=self.stop_cause,
                                 exit_code=self.exit_code, while_loading=while_loading)
            self._trust.restore()  # nobody waits for the verdict on a backend that is gone
            self._settled.set()
            self._gone.set()
            self._on_change()

    async def _run(self) -> None:
        port = free_port()
        argv = self.spec.argv(port, self.build)
        log.info("starting %s: %s", self.name, " ".join(argv))
        api_key = secrets.token_urlsafe(32)  # this process's only: routerd is its sole client
        env = child_environment(self._env, dict(self.spec.env), api_key)
        try:
            process = (self._spawn_with or spawn)(argv, env=env, stop_grace=self.spec.stop_grace)
        except OSError as exc:
            self.error = f"cannot run {argv[0]}: {exc.strerror or exc}"
            return
        self.pid, self.port = process.pid, port
        # One idle connection per slot, plus one for health checks: more are never busy at once.
        # No more open at once than llama-server has HTTP threads: a request beyond them would
        # wait in its accept queue anyway, after paying for a connection of its own.
        pool = ConnectionPool(port, max_idle=self.spec.slots + 1, read_timeout=self._upstream_read_timeout,
                              authorization=b"Bearer " + api_key.encode(), max_open=self.spec.http_threads)
        async with process:
            try:
                await self._serve(process, pool)
            finally:
                pool.close()

    async def _serve(self, process: Process, pool: ConnectionPool) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_output, process)
            nursery.start_soon(self._watch_exit, process, nursery.cancel_scope)
            if not await self._become_ready(pool):
                nursery.cancel_scope.cancel()
                return
            if self.keeper is not None:  # before any request: one could take a slot being restored
                await self.keeper.restore(pool)
            self.upstream = pool
            self.state = State.READY
            self.ready_at = trio.current_time()
            self.last_used = self.ready_at
            load_seconds = self.ready_at - self.started_at
            log.info("%s ready on port %d after %.2f s", self.name, pool.port, load_seconds)
            self.bus.publish(EventType.MODEL_READY, self.name, load_seconds=load_seconds, pid=self.pid, port=pool.port)
            self._settled.set()
            self._on_change()
            nursery.start_soon(self._idle_timer)
            nursery.start_soon(self._watch_health, pool)
            nursery.start_soon(self._trust.keep, pool, self.health.timeout, self.name, self._touch)
            await self._stop_requested.wait()
            self.state = State.STOPPING
            self.bus.publish(EventType.MODEL_STOPPING, self.name, reason=self.stop_reason, cause=self.stop_cause,
                             in_flight=self.in_flight)
            self._on_change()
            await self._drain()
            if self.keeper is not None and self.stop_cause in SAVE_CAUSES:
                await self.keeper.save(pool)  # bounded by slots.save_timeout
            self._expect_exit = True
            self.exit_code = await process.stop()
            log.info("%s stopped (%s), exit status %s", self.name, self.stop_reason, self.exit_code)
            nursery.cancel_scope.cancel()

    async def _drain(self) -> None:
        with trio.move_on_after(self._drain_timeout):
            while self.in_flight:
                await self._activity.wait()

    async def _become_ready(self, pool: ConnectionPool) -> bool:
        """Poll /health, woken by each line of output and by a short backoff timer.

        The ready timeout is a stall timeout: any output counts as progress and resets it.
        """
        delay = 0.005
        while not self._stop_requested.is_set():
            with trio.move_on_after(READY_CHECK_TIMEOUT):
                if await healthy(pool):
                    return True
            now = trio.current_time()
            deadline = self._last_output + self.spec.ready_timeout
            if now >= deadline:
                self.error = f"no progress for {self.spec.ready_timeout:g} s while loading (ready_timeout)"
                return False
            with trio.move_on_after(min(delay, deadline - now)):
                await self._output_seen.wait()
            delay = min(delay * 2, 0.1)
        self.stop_reason = self.stop_reason or "stopped while starting"
        return False

    async def _watch_health(self, pool: ConnectionPool) -> None:
        """Kill a ready backend that stops answering /health (hung, deadlocked, swapped out)."""
        self.error = await watch(pool, self.health, self.name)
        self.request_stop("unresponsive", cause="unresponsive", drain_timeout=0.0)

    async def _watch_exit(self, process: Process, scope: trio.CancelScope) -> None:
        code = await process.wait()
        if self._expect_exit:
            return
        with trio.move_on_after(0.5):  # let the pump read the last lines for the error
            await self._output_done.wait()
        self.exit_code = code
        phase = "while loading" if self.state is State.STARTING else "unexpectedly"
        self.error = f"llama-server exited {phase} with status {code}"
        log.warning("%s: %s; last output:\n%s", self.name, self.error, self.log.text_tail(LOG_TAIL_LINES))
        scope.cancel()

    async def _pump_output(self, process: Process) -> None:
        pending = b""
        try:
            while True:
                chunk = await process.output.receive_some(65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    self._output_line(raw)
                if self.state is not State.STARTING:
                    await trio.sleep(OUTPUT_BATCH_INTERVAL)
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass
        finally:
            if pending:
                self._output_line(pending)
            self._output_done.set()

    def _output_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.log.append(text)
        log.info("[%s] %s", self.name, text)
        if self.state is State.STARTING:
            self.bus.publish(EventType.MODEL_PROGRESS, self.name, line=text)
        elif self.bus.follows_logs(self.name):
            self.bus.publish(EventType.MODEL_LOG, self.name, line=text)
        self._last_output = trio.current_time()
        self._output_seen.set()
        self._output_seen = trio.Event()

    async def _idle_timer(self) -> None:
        """Stop the backend once idle for its TTL. Requests move the deadline (``_touch``)
        rather than wake this task: two wake-ups per request cost more than the check."""
        with trio.CancelScope() as self._idle_deadline:
            self._touch()
            await trio.sleep_forever()
        self._idle_deadline = None
        self.request_stop("idle", cause="idle")

    def _touch(self) -> None:
        self._activity.set()
        self._activity = trio.Event()
        if self._idle_deadline is not None:
            left = self.idle_ttl_left()
            self._idle_deadline.deadline = math.inf if left is None else trio.current_time() + left
        self._on_change()
