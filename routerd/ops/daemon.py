"""The daemon: wiring, signals, service notifications, shutdown order.

Owns the root nursery and the order things start and stop in: supervisor first, then the HTTP
front and the control socket (READY only once both listen), then signal handling. SIGHUP
reloads; SIGTERM/SIGINT stop accepting, drain in-flight requests (bounded), stop every backend
and return. It holds no business logic: reload is "validate, then hand to the supervisor".
"""

from __future__ import annotations

import errno
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable, Mapping
from functools import partial

import attrs
import hypercorn.config
import trio

from routerd import __version__, config as config_mod, events, paths
from routerd.backends import remote
from routerd.backends.memory import MemoryManager, NvmlProvider
from routerd.backends.supervisor import Supervisor
from routerd.config import Config
from routerd.errors import BadRequest, RouterdError, StartupError, Unavailable, leaves
from routerd.front import http_server
from routerd.front.access import Gate
from routerd.front.tls import Certificates
from routerd.models import discovery, hub
from routerd.models.catalog import Catalog, ImportStore
from routerd.ops import requestlog
from routerd.ops.control import ControlServer
from routerd.ops.metrics import BuildInfo, Metrics, build_info, llama_server_version
from routerd.ops.sdnotify import Notifier

log = logging.getLogger("routerd")
#: Shortest time between two recomputations of the STATUS line sent to systemd (seconds).
STATUS_MIN_INTERVAL = 0.5
#: Open-files limit asked for when the hard limit is unlimited.
OPEN_FILES_CAP = 65536


@attrs.frozen
class ReloadResult:
    restarted: list[str]
    stopped: list[str]
    kept: list[str]
    added: list[str]
    removed: list[str]
    changed: list[str]
    #: What discovery could not read (corrupted Hugging Face cache entries), each with its reason.
    problems: list[str]
    #: Remotes added, removed and changed (reconnected) by a reload.
    remotes: dict[str, list[str]] = attrs.field(factory=dict)


class Daemon:
    """One running routerd: what the control plane talks to besides the supervisor."""

    def __init__(self, config: Config, *, binary: str, environ: Mapping[str, str], memory: MemoryManager,
                 build: BuildInfo | None = None) -> None:
        self.config = config
        self.environ = dict(environ)
        self.started = time.time()
        self.notifier = Notifier(environ)
        self.bus = events.Bus(config.metrics.event_buffer)
        self.supervisor = Supervisor(config, Catalog.from_config(config), binary, memory=memory, env=environ,
                                     bus=self.bus)
        self.metrics = Metrics(self.supervisor, build or build_info(binary, "unknown"), started=self.started)
        self.bus.listen(self.metrics.observe)
        self.bus.listen(self._log_request)
        self.http_urls: list[str] = []
        self.socket_path = config.control.socket or paths.default_socket_path(environ)
        self._shutdown = trio.Event()
        self._http_stop = trio.Event()
        self._catalog_lock = trio.Lock()
        self.imports = ImportStore(paths.state_dir(environ))
        self.hub_cache = paths.hub_cache(environ)
        # Both raise ConfigError (exit 78) for a broken key store or certificate, or for serving
        # beyond loopback with no key.
        self.gate = Gate(config.auth, listening_on=config.server.host, state_dir=paths.state_dir(environ))
        self.certificates = Certificates(config.server)
        self._remote_keys = remote.api_keys(config, self.environ)  # ConfigError (78) if one cannot be read

    def _log_request(self, event: events.Event) -> None:
        if self.config.logging.requests:
            requestlog.observe(event)

    def status_line(self) -> str:
        c = self.supervisor.counts()
        return f"{c['models']} models, {c['ready']} ready, {c['starting']} starting, {c['failed']} failed"

    async def reload(self) -> ReloadResult:
        """Re-read the config file and rescan; a bad file raises ConfigError and changes nothing."""
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config.source)
            # Check everything before changing anything: a bad key file or certificate keeps
            # the running config whole.
            context = self.certificates.prepare(new.server)
            keys = remote.api_keys(new, self.environ)
            self.gate.configure(new.auth, listening_on=self.config.server.host)
            self.certificates.context = context
            self.bus.buffer = new.metrics.event_buffer
            remotes = self.supervisor.remotes.apply(new.remotes, keys)
            self._remote_keys = keys
            result = attrs.evolve(await self._apply(lambda _running: new, trigger="reload"), remotes=remotes)
        except RouterdError as exc:
            self.bus.publish("config.reload", ok=False, error=exc.message)
            raise
        finally:
            self.notifier.ready(self.status_line())
        self.bus.publish("config.reload", ok=True, **attrs.asdict(result))
        return result

    async def rescan(self, trigger: str = "operator") -> ReloadResult:
        """Re-discover models: the config's [models], imported ones, folders and the HF cache."""
        def with_fresh_models(running: Config) -> Config:  # only [models] is taken from the file
            return attrs.evolve(running, models=config_mod.load(running.source).models)

        if trigger == "operator":
            self.supervisor.remotes.rediscover()  # their lists follow as each answers
        try:
            return await self._apply(with_fresh_models, trigger=trigger)
        except RouterdError as exc:
            self.bus.publish("catalog.rescan", trigger=trigger, ok=False, error=exc.message)
            raise

    async def import_models(self, path: str) -> list[str]:
        """Import the models under ``path`` as manual entries (persisted); their names."""
        found = await trio.to_thread.run_sync(discovery.scan_path, path)
        if not found:
            raise BadRequest(f"no GGUF model found at {path}", code="nothing_to_import")
        fresh = {f.path: attrs.evolve(f, source="import") for f in found}
        kept = [f for f in self.imports.load() if f.path not in fresh]
        self.imports.save(kept + list(fresh.values()))
        await self._apply(trigger="import")
        return [entry.name for entry in self.supervisor.catalog if entry.path in fresh]

    async def pull(self, ref: str, filename: str | None, progress: hub.Progress) -> dict[str, object]:
        """Download ``org/repo[:QUANT]`` into the hub cache, rescan, and name the new model."""
        repo_id, tag = hub.parse_model_ref(ref)
        if self.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise Unavailable(f"HF_HUB_OFFLINE is set: routerd will not download {ref}; unset it to pull",
                              code="hub_offline")
        if not self.config.catalog.hf_cache:
            raise BadRequest(f"catalog.hf_cache is off, so a pulled model would not be served: turn it on "
                             f"to pull {ref}", code="hf_cache_disabled")
        plan = await trio.to_thread.run_sync(partial(
            hub.pull, repo_id, tag, filename, cache_dir=self.hub_cache, endpoint=self.environ.get("HF_ENDPOINT"),
            token=self.environ.get("HF_TOKEN"), progress=progress))
        await self._apply(trigger="pull")
        return {"model": f"{repo_id}:{plan.tag}", "files": list(plan.files), "cache": self.hub_cache}

    def discover(self, config: Config, remote_models: Mapping[str, tuple[str, ...]]) -> Catalog:
        """The catalog for ``config``, with the remotes' models as last listed: blocking
        file-system work, run it in a thread."""
        found = [f for folder in config.catalog.folders for f in discovery.scan_folder(folder)]
        problems: list[str] = []
        if config.catalog.hf_cache:
            cache = discovery.scan_hf_cache(self.hub_cache)
            found += cache.found
            problems += cache.problems
        return Catalog.from_config(config, imported=self.imports.load(), discovered=found, problems=problems,
                                   remote_models=remote_models)

    async def _apply(self, update: Callable[[Config], Config] | None = None, *, trigger: str) -> ReloadResult:
        """Rebuild the catalog under ``update(running config)`` (no update: the running config).
        The config is read once this call's turn comes, so a reload applied meanwhile is built
        on, never undone by a rescan that began before it."""
        async with self._catalog_lock:  # one rescan at a time; the newest file system wins
            new = self.config if update is None else update(self.config)
            new_catalog = await trio.to_thread.run_sync(self.discover, new, self.supervisor.remotes.models())
            old_catalog = self.supervisor.catalog
            outcome = self.supervisor.apply(new, new_catalog)
            diff = old_catalog.diff(new_catalog)
            self.config = new
        log.info("applied %s: %s; catalog %s", new.source, outcome, diff)
        for problem in new_catalog.problems:
            log.warning("not served, the Hugging Face cache has a corrupted entry: %s", problem)
        result = ReloadResult(added=list(diff.added), removed=list(diff.removed), changed=list(diff.changed),
                              problems=list(new_catalog.problems), **outcome)
        if trigger != "reload":  # a reload says so itself, with its outcome
            self.bus.publish("catalog.rescan", trigger=trigger, ok=True, models=len(list(new_catalog)),
                             added=result.added, removed=result.removed, changed=result.changed,
                             problems=result.problems)
        return result

    async def _follow_remotes(self) -> None:
        """Rebuild the catalog whenever a remote's model list changes (discovery, reload)."""
        while True:
            await self.supervisor.remotes.wait_models_changed()
            result = await self._apply(trigger="remote")
            if result.added or result.removed:
                log.info("remote models: added %s, removed %s", result.added, result.removed)

    async def _rescan_periodically(self) -> None:
        while self.config.catalog.rescan_interval > 0:
            await trio.sleep(self.config.catalog.rescan_interval)
            try:
                result = await self.rescan(trigger="periodic")
            except config_mod.ConfigError as exc:
                log.error("periodic rescan: the config is invalid, keeping the running one: %s", exc.message)
                continue
            if result.added or result.removed or result.changed:
                log.info("rescan: added %s, removed %s, changed %s", result.added, result.removed, result.changed)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run(self, *, handle_signals: bool = True,
                  task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.imports.check_writable()
        async with trio.open_nursery() as root:
            await root.start(self.supervisor.run)
            remotes = self.supervisor.remotes
            remotes.apply(config.remotes, self._remote_keys)
            # Their model lists are in the first catalog unless a remote is slow to answer (then
            # they join it when it does): a dead remote never holds routerd's start for long.
            await remotes.first_checks(timeout=max([r.connect_timeout for r in config.remotes.values()], default=0))
            remotes.take_models_changed()  # the first catalog has what they said so far
            await self._apply(lambda _running: config, trigger="startup")  # discovery, before serving: discovered models are servable at READY
            root.start_soon(self._follow_remotes)
            http_config = hypercorn.config.Config()
            http_config.bind = [f"{config.server.host}:{config.server.port}"]
            http_config.graceful_timeout = 1.0  # requests have drained before it applies
            # A connection must finish its headers within header_timeout of opening (hypercorn's
            # keep-alive timer runs until a request's headers are in), so slow clients hold little.
            http_config.keep_alive_timeout = config.server.header_timeout
            http_config.h11_max_incomplete_size = config.server.max_header_bytes
            http_config.h2_max_header_list_size = config.server.max_header_bytes
            http_config.accesslog = None
            http_config.errorlog = logging.getLogger("hypercorn.error")
            http_stopped = trio.Event()
            from routerd.front.api import create_app  # quart is heavy; import once the daemon starts

            app = create_app(self.supervisor, self.gate, self.metrics, rescan=self.rescan)
            try:
                self.http_urls = await root.start(partial(self._serve_http, app, http_config, http_stopped))
            except* OSError as group:  # the bind fails inside the server's nurseries
                bind_error = leaves(group)[0]
                assert isinstance(bind_error, OSError)
                raise StartupError(listen_failure(config.server.host, config.server.port, bind_error)) from None
            control = ControlServer(self, self.socket_path, config.control)
            await root.start(control.serve)
            log.info("routerd %s serving on %s, control socket %s", __version__, ", ".join(self.http_urls),
                     self.socket_path)
            self.notifier.ready(self.status_line())
            self.supervisor.preload_soon()  # after READY: loading never delays serving other models
            root.start_soon(self.notifier.watchdog_loop)
            root.start_soon(self._status_updates)
            root.start_soon(self._rescan_periodically)
            if handle_signals:
                root.start_soon(self._handle_signals)
            task_status.started(self)
            await self._shutdown.wait()
            log.info("shutting down: draining in-flight requests (up to %g s)", config.server.drain_timeout)
            self.notifier.stopping()
            control.close()
            # New requests get a clear 503 while in-flight ones finish; only then does the
            # HTTP listener close (hypercorn cuts open connections when it shuts down).
            await self.supervisor.shutdown(drain_timeout=self.config.server.drain_timeout)
            self._http_stop.set()
            with trio.move_on_after(1.0):
                await http_stopped.wait()
            root.cancel_scope.cancel()
        try:
            self.gate.save_last_used()
        except Unavailable as exc:
            log.warning("could not save when each API key was last used: %s", exc.message)
        self.notifier.close()
        log.info("routerd stopped")

    async def _serve_http(self, app: object, http_config: hypercorn.config.Config, stopped: trio.Event,
                          *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await http_server.serve(app, http_config, shutdown_trigger=self._http_stop.wait,
                                    tls=self.certificates.current, send_timeout=self.config.server.send_timeout,
                                    task_status=task_status)
        finally:
            stopped.set()

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        await self.reload()
                    except config_mod.ConfigError as exc:
                        log.error("reload refused, keeping the running config: %s", exc.message)
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.request_shutdown()

    async def _status_updates(self) -> None:
        """Keep `systemctl status` current: a STATUS line whenever the counts change."""
        last = ""
        while True:
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            await self.supervisor.wait_changed()
            # Every request changes the supervisor (a slot taken, a slot freed) and the line walks
            # the whole catalog: look at most twice a second, not four times per request.
            await trio.sleep(STATUS_MIN_INTERVAL)


def listen_failure(host: str, port: int, exc: OSError) -> str:
    """What to tell a user whose HTTP port could not be opened (pure)."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the address is in use (another routerd, or another program); "
                f"stop it (`ss -ltnp 'sport = :{port}'` names it) or set server.port")
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); set server.port"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: this host has no such address; set server.host"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def raise_open_file_limit() -> int:
    """Every client and backend connection is a descriptor, and the usual soft limit (1024) is
    far below the hard one: use the hard limit (capped, when unlimited). Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


async def serve(config: Config, environ: Mapping[str, str]) -> None:
    log.info("open files limit: %d", raise_open_file_limit())
    binary = config_mod.resolve_llama_server(config, environ)
    memory = MemoryManager(config.memory, NvmlProvider.open())
    build = build_info(binary, await trio.to_thread.run_sync(llama_server_version, binary))
    daemon = Daemon(config, binary=binary, environ=environ, memory=memory, build=build)
    await daemon.run()
