"""The operations an operator runs on routerd, written once for every API that offers them.

Owns load, unload, reset, logs, rescan, reload, import, pull, the key operations and the reads
(version, status, models, memory), each returning a typed result (an attrs class), and
``json_default``: the one way a result becomes JSON. The control socket (``ops/control.py``),
the admin HTTP API (``front/admin.py``) and the APIs to come call these and answer what they
return, so the same operation answers the same fields everywhere.

It must not authorize: each edge checks its caller first (the socket's peer credentials, the
admin key). Nor does it decide anything about models or processes: the supervisor and the
catalog service do; this module only names their calls and shapes what they answer. A long
operation reports progress through a callback its edge gives (a JSON-RPC notification, ...).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import cattrs
import trio

from routerd import __version__
from routerd.backends.backend import Backend, State
from routerd.backends.logring import LogLine
from routerd.backends.status import ModelStatus
from routerd.backends.supervisor import Supervisor
from routerd.errors import RouterdError
from routerd.front.access import Gate
from routerd.front.keys import KeySettings
from routerd.models.service import CatalogService, PullResult, ReloadResult

__all__ = ["KeyAdded", "KeyRevoked", "KeysListed", "LoadRequested", "LoadResult", "RemoveResult",
           "LogsResult", "ImportResult", "ModelResult", "ModelsResult", "Operations", "Overview",
           "PullResult", "ReloadResult", "ResetResult", "UnloadResult", "VersionResult", "json_default",
           "summary", "unstructure"]

log = logging.getLogger("routerd.operations")
#: How long ``request_load`` waits to say whether a load started or waits for room.
LOAD_DECISION_SECONDS = 2.0
#: An edge's way to tell its caller how a long operation goes (the params of one notification).
Notify = Callable[[dict[str, Any]], Awaitable[None]]

_converter = cattrs.Converter()


def unstructure(value: object) -> Any:
    """An attrs value (a result, a model's status) as plain JSON data: the edges that add fields
    of their own around one (``/v1/models``) start from this."""
    return _converter.unstructure(value)


def json_default(value: object) -> Any:
    """``json.dumps``'s ``default`` for every result here (and anything attrs it holds): the one
    serialiser of every API's answers and events."""
    if attrs.has(type(value)):
        return unstructure(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary(counts: Mapping[str, int]) -> str:
    """The models' counts in one line (pure)."""
    return (f"{counts['models']} models, {counts['ready']} ready, {counts['starting']} starting, "
            f"{counts['failed']} failed")


# -- results ----------------------------------------------------------------------------------
@attrs.frozen
class VersionResult:
    version: str
    llama_server: str


@attrs.frozen
class Overview:
    """routerd as a whole: what ``routerctl status`` shows."""

    version: str
    pid: int
    uptime: float
    #: The config file (None: the built-in defaults).
    config: str | None
    listen: list[str]
    socket: str
    summary: str
    models: list[ModelStatus]
    remotes: list[dict[str, object]]
    selectors: list[dict[str, object]]


@attrs.frozen
class ModelResult:
    model: ModelStatus


@attrs.frozen
class ModelsResult:
    models: list[ModelStatus]


@attrs.frozen
class LoadResult:
    model: str
    state: str
    #: Known once the load was waited for: llama-server's pid and port, and how long it took.
    pid: int | None = None
    port: int | None = None
    load_seconds: float | None = None


@attrs.frozen
class LoadRequested:
    """What a load asked for without waiting (router mode's ``POST /models/load``) came to,
    as far as it is known when the answer goes: the model is ``loaded``, ``loading``, or
    ``queued`` (waiting for room that busy models hold); a refusal is raised instead."""

    model: str
    status: str
    message: str


@attrs.frozen
class RemoveResult:
    model: str
    files: list[str]
    #: Whether it was running (it is stopped first).
    was_running: bool


@attrs.frozen
class UnloadResult:
    model: str
    #: The model's state once its processes are gone.
    state: str
    was_running: bool
    #: The exit status of the process that ran it (None: none was running).
    exit_code: int | None = None


@attrs.frozen
class ResetResult:
    model: str
    had_failures: bool
    state: str


@attrs.frozen
class LogsResult:
    model: str
    lines: list[str]
    running: bool


@attrs.frozen
class ImportResult:
    path: str
    added: list[str]


@attrs.frozen
class KeyAdded:
    name: str
    #: The key itself: shown this once, stored nowhere.
    key: str
    prefix: str
    required: bool


@attrs.frozen
class KeysListed:
    keys: list[dict[str, object]]
    required: bool


@attrs.frozen
class KeyRevoked:
    name: str
    prefix: str
    required: bool


# -- the operations ---------------------------------------------------------------------------
class Operations:
    """Every operation, over the supervisor, the gate and the catalog service of one routerd."""

    def __init__(self, supervisor: Supervisor, gate: Gate, catalog: CatalogService, *, started: float,
                 socket_path: str = "") -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.catalog = catalog
        self.started = started
        self.socket_path = socket_path
        #: The HTTP front's URLs, once it listens (set by the daemon).
        self.listen: list[str] = []
        #: ``llama-server --version``'s first line (set by the daemon once it has asked).
        self.llama_server_version = "unknown"

    # -- reads
    def version(self) -> VersionResult:
        return VersionResult(version=__version__, llama_server=self.supervisor.binary)

    def summary(self) -> str:
        """One line of counts (systemd's STATUS, routerctl status)."""
        return summary(self.supervisor.counts())

    def overview(self) -> Overview:
        supervisor = self.supervisor
        return Overview(version=__version__, pid=os.getpid(), uptime=time.time() - self.started,
                        config=self.catalog.config.source, listen=list(self.listen), socket=self.socket_path,
                        summary=self.summary(), models=supervisor.status(), remotes=supervisor.remotes_status(),
                        selectors=supervisor.selectors_status())

    def model(self, model: str) -> ModelResult:
        return ModelResult(model=self.supervisor.model_status(self.supervisor.catalog.resolve(model)))

    def models(self) -> ModelsResult:
        return ModelsResult(models=self.supervisor.status())

    def memory(self) -> dict[str, object]:
        return self.supervisor.memory_view()

    # -- backends
    async def load(self, model: str, *, wait: bool = True, progress: Notify | None = None) -> LoadResult:
        """Start ``model``; with ``wait``, return once it is ready, its output sent to ``progress``
        as it loads (each line once)."""
        supervisor = self.supervisor
        entry = supervisor.catalog.resolve(model)
        if not wait:
            supervisor.load_soon(entry.name)
            return LoadResult(model=entry.name, state="starting")
        if progress is None:
            backend = await supervisor.load(entry.name)
        else:
            sent = _Progress(entry.name, progress)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sent.follow, supervisor)
                backend = await supervisor.load(entry.name)
                nursery.cancel_scope.cancel()
            await sent.catch_up(backend)  # lines printed between the last wake-up and ready
        return LoadResult(model=entry.name, state=backend.state.value, pid=backend.pid, port=backend.port,
                          load_seconds=(backend.ready_at or 0) - backend.started_at)

    async def request_load(self, model: str, decide_within: float = LOAD_DECISION_SECONDS) -> LoadRequested:
        """Start loading ``model`` in the background and say, within ``decide_within`` s, what
        became of it: admission's refusal (not enough memory, a crash loop...) is raised, a
        start is ``loading``, and a load still waiting for room then is ``queued``."""
        supervisor = self.supervisor
        entry = supervisor.catalog.resolve(model)
        running = supervisor.running(entry.name)
        if running is not None and running.state is State.READY and not running.stop_requested:
            return LoadRequested(entry.name, "loaded", f"{entry.name} is loaded")
        attempt = _LoadAttempt()
        supervisor.start_soon(attempt.run, supervisor, entry.name, name=f"load {entry.name}")
        with trio.move_on_after(decide_within):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt.watch_start, supervisor, entry.name)
                await attempt.decided.wait()
                nursery.cancel_scope.cancel()
        if attempt.error is not None:
            raise attempt.error.copy()
        if attempt.loaded:
            return LoadRequested(entry.name, "loaded", f"{entry.name} is loaded")
        if attempt.started:
            return LoadRequested(entry.name, "loading", f"{entry.name} is loading")
        return LoadRequested(entry.name, "queued", (
            f"{entry.name} waits for room: the models holding the memory it needs are busy; it starts once they "
            "finish what they run (after scheduler.max_turn_wait they take no new requests), if that is within "
            f"memory.busy_wait ({supervisor.config.memory.busy_wait:g} s); else the load is given up and says why "
            "(a status_change with failed: true on /models/sse, model.load_refused on /events)"))

    async def unload(self, model: str, *, force: bool = False) -> UnloadResult:
        """Stop ``model`` and return once its processes are gone; in-flight requests finish first
        unless ``force``."""
        supervisor = self.supervisor
        entry = supervisor.catalog.resolve(model)
        replicas = supervisor.unload(entry.name, force=force)
        for backend in replicas:
            await backend.wait_gone()
        first = replicas[0] if replicas else None  # the model's own process; extras follow it
        return UnloadResult(model=entry.name, state=supervisor.state_of(entry.name), was_running=first is not None,
                            exit_code=first.exit_code if first is not None else None)

    def reset(self, model: str) -> ResetResult:
        """Forget ``model``'s failures (the crash-loop breaker and backoff)."""
        supervisor = self.supervisor
        entry = supervisor.catalog.resolve(model)
        had_failures = supervisor.reset(entry.name)
        return ResetResult(model=entry.name, had_failures=had_failures, state=supervisor.state_of(entry.name))

    async def logs(self, model: str, lines: int = 100, *,
                   follow: Callable[[str], Awaitable[None]] | None = None) -> LogsResult:
        """``model``'s last ``lines`` llama-server lines. With ``follow``, each of them and then each
        new one goes there instead, until the process is gone (the edge cancels when its caller
        leaves), and the result holds none."""
        supervisor = self.supervisor
        entry = supervisor.catalog.resolve(model)
        backend = supervisor.backend(entry.name)
        if backend is None:
            return LogsResult(model=entry.name, lines=[], running=False)
        last = backend.log.last_seq
        tail = backend.log.tail(lines)
        if follow is None:
            return LogsResult(model=entry.name, lines=[line.text for line in tail], running=not backend.gone)
        for line in tail:
            await follow(line.text)
        async for line in backend.log.follow(last):
            await follow(line.text)
        return LogsResult(model=entry.name, lines=[], running=False)

    # -- the catalog
    async def reload(self) -> ReloadResult:
        """Re-read the config file and rescan; a bad file changes nothing (ConfigError)."""
        return await self.catalog.reload()

    async def rescan(self) -> ReloadResult:
        return await self.catalog.rescan()

    async def import_models(self, path: str) -> ImportResult:
        return ImportResult(path=path, added=await self.catalog.import_models(path))

    async def pull(self, ref: str, filename: str | None, progress: Notify | None = None) -> PullResult:
        """Download ``org/repo[:QUANT]`` and serve it; each file's bytes so far go to ``progress``."""
        def report(name: str, done: int, total: int | None) -> None:  # called from the download's thread
            if progress is None:
                return
            try:
                trio.from_thread.run(progress, {"model": ref, "file": name, "bytes": done, "total": total})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the caller left; the download goes on

        return await self.catalog.pull(ref, filename, report)

    def pull_soon(self, ref: str) -> None:
        """Start downloading ``ref`` in the background; the event bus says how it goes."""
        self.catalog.pull_soon(ref)

    async def remove(self, model: str) -> RemoveResult:
        """Stop a pulled model and delete its files from the hub cache (refused for models the
        user put in the config or a folder)."""
        entry = self.supervisor.catalog.resolve(model)
        self.catalog.check_removable(entry.name)
        stopped = await self.unload(entry.name, force=True)
        files = await self.catalog.remove(entry.name)
        return RemoveResult(model=entry.name, files=files, was_running=stopped.was_running)

    # -- keys
    def add_key(self, name: str, settings: KeySettings) -> KeyAdded:
        """Make a key named ``name``; it is returned here only."""
        key, record = self.gate.add(name, settings)
        return KeyAdded(name=name, key=key, prefix=record.prefix, required=self.gate.required)

    def list_keys(self) -> KeysListed:
        return KeysListed(keys=self.gate.listing(), required=self.gate.required)

    def revoke_key(self, name: str) -> KeyRevoked:
        record = self.gate.revoke(name)
        return KeyRevoked(name=record.name, prefix=record.prefix, required=self.gate.required)


class _LoadAttempt:
    """One background load, and what is known of it: started, loaded, or refused."""

    def __init__(self) -> None:
        self.decided = trio.Event()
        self.started = False
        self.loaded = False
        self.error: RouterdError | None = None

    async def run(self, supervisor: Supervisor, model: str) -> None:
        try:
            self.error = await supervisor.load_quietly(model)
            self.loaded = self.error is None
        finally:
            self.decided.set()

    async def watch_start(self, supervisor: Supervisor, model: str) -> None:
        while True:
            backend = supervisor.running(model)
            if backend is not None and not backend.stop_requested:
                self.started = True
                self.decided.set()
                return
            await supervisor.wait_changed()


class _Progress:
    """Sends a loading backend's output as progress notes, each line once."""

    def __init__(self, model: str, notify: Notify) -> None:
        self.model = model
        self.notify = notify
        self.last_seq = -1

    async def follow(self, supervisor: Supervisor) -> None:
        backend = None
        while backend is None:  # admission may evict others first; the backend appears after
            backend = supervisor.running(self.model)
            if backend is None:
                await supervisor.wait_changed()
        await self.notify({"model": self.model, "state": backend.state.value, "pid": backend.pid})
        async for line in backend.log.follow(self.last_seq):
            await self._send(backend, line)

    async def catch_up(self, backend: Backend) -> None:
        for line in backend.log.tail(backend.log.capacity):
            if line.seq > self.last_seq:
                await self._send(backend, line)

    async def _send(self, backend: Backend, line: LogLine) -> None:
        self.last_seq = line.seq
        await self.notify({"model": self.model, "state": backend.state.value, "line": line.text})
