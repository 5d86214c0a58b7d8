"""The daemon: wiring, signals, service notifications, shutdown order.

Owns the root nursery and the order things start and stop in: supervisor first, then the
catalog (discovery, before serving), the HTTP front and the control socket (READY only once both
listen), then signal handling. SIGHUP reloads; SIGTERM/SIGINT stop accepting, drain in-flight
requests (bounded), stop every backend and return. It holds no business logic: the catalog's
lifecycle is ``models.service.CatalogService``'s, each operation is ``front.operations``', and
this module only connects them (``_CatalogHost``) and runs them.
"""

from __future__ import annotations

import errno
import logging
import resource
import signal
import socket
import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

import trio

from routerd import __version__, events, paths
from routerd import config as config_mod
from routerd.backends import remote
from routerd.backends.memory import MemoryManager, NvmlProvider
from routerd.backends.supervisor import Supervisor
from routerd.config import Config
from routerd.errors import ConfigError, StartupError, Unavailable, leaves
from routerd.front import http_server
from routerd.front.access import Gate
from routerd.front.operations import Operations, summary
from routerd.front.tls import Certificates
from routerd.models.catalog import Catalog, ImportStore
from routerd.models.service import CatalogService
from routerd.ops import requestlog
from routerd.ops.control import ControlServer
from routerd.ops.metrics import BuildInfo, Metrics, build_info
from routerd.ops.sdnotify import Notifier

if TYPE_CHECKING:
    from routerd.front.routes import Front

__all__ = ["Daemon", "listen_failure", "raise_open_file_limit", "serve"]

log = logging.getLogger("routerd")
#: Shortest time between two recomputations of the STATUS line sent to systemd (seconds).
STATUS_MIN_INTERVAL = 0.5
#: Open-files limit asked for when the hard limit is unlimited.
OPEN_FILES_CAP = 65536


class _CatalogHost:
    """What the catalog service changes outside ``models/``: the supervisor and its remotes, the
    gate, the certificates, and systemd's view of a reload."""

    def __init__(self, supervisor: Supervisor, gate: Gate, certificates: Certificates, notifier: Notifier,
                 environ: Mapping[str, str]) -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.certificates = certificates
        self.notifier = notifier
        self.environ = environ

    @property
    def catalog(self) -> Catalog:
        return self.supervisor.catalog

    def apply(self, config: Config, catalog: Catalog) -> dict[str, list[str]]:
        return self.supervisor.apply(config, catalog)

    def reconfigure(self, running: Config, new: Config) -> dict[str, list[str]]:
        # Check everything before changing anything: a bad key file or certificate keeps the
        # running config whole. Both raise ConfigError.
        context = self.certificates.prepare(new.server)
        keys = remote.api_keys(new, self.environ)
        self.gate.configure(new.auth, listening_on=running.server.host)
        self.certificates.context = context
        return self.supervisor.remotes.apply(new.remotes, keys)

    def check_binaries(self, config: Config) -> None:
        """Ask every model's own llama-server what it is (blocking; ConfigError if one does not
        answer --version), so a reload naming a broken binary changes nothing."""
        for binary in sorted({model.binary for model in config.models.values() if model.binary}):
            self.supervisor.builds.get(binary)

    def remote_models(self) -> Mapping[str, tuple[str, ...]]:
        return self.supervisor.remotes.models()

    async def wait_remote_models_changed(self) -> None:
        await self.supervisor.remotes.wait_models_changed()

    def rediscover_remotes(self) -> None:
        self.supervisor.remotes.rediscover()

    def reloading(self) -> None:
        self.notifier.reloading()

    def reloaded(self) -> None:
        self.notifier.ready(summary(self.supervisor.counts()))


class Daemon:
    """One running routerd: its parts, wired, and the order they start and stop in."""

    def __init__(self, config: Config, *, binary: str, environ: Mapping[str, str], memory: MemoryManager,
                 build: BuildInfo | None = None) -> None:
        self.environ = dict(environ)
        self.started = time.time()
        self.notifier = Notifier(environ)
        self.bus = events.Bus(config.metrics.event_buffer)
        self.supervisor = Supervisor(config, Catalog.from_config(config), binary, memory=memory, env=environ,
                                     bus=self.bus)
        self.metrics = Metrics(self.supervisor, build or build_info(binary, "unknown"), started=self.started)
        self.bus.listen(self.metrics.observe)
        self.bus.listen(self._log_request)
        self.socket_path = config.control.socket or paths.default_socket_path(environ)
        self._shutdown = trio.Event()
        self._http_stop = trio.Event()
        # Both raise ConfigError (exit 78) for a broken key store or certificate, or for serving
        # beyond loopback with no key.
        self.gate = Gate(config.auth, listening_on=config.server.host, state_dir=paths.state_dir(environ))
        self.certificates = Certificates(config.server)
        self._remote_keys = remote.api_keys(config, self.environ)  # ConfigError (78) if one cannot be read
        host = self._catalog_host = _CatalogHost(self.supervisor, self.gate, self.certificates, self.notifier,
                                                 self.environ)
        self.catalog_service = CatalogService(config, host, bus=self.bus, imports=ImportStore(paths.state_dir(environ)),
                                              hub_cache=paths.hub_cache(environ), environ=environ)
        self.operations = Operations(self.supervisor, self.gate, self.catalog_service, started=self.started,
                                     socket_path=self.socket_path)
        self._version_known = build is not None

    @property
    def config(self) -> Config:
        """The running config (a reload or rescan replaces it)."""
        return self.catalog_service.config

    @property
    def http_urls(self) -> list[str]:
        return self.operations.listen

    def _log_request(self, event: events.Event) -> None:
        if self.config.logging.requests:
            requestlog.observe(event)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run(self, *, handle_signals: bool = True,
                  task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.catalog_service.imports.check_writable()
        # Every llama-server is asked what it is before anything is served: one that does not
        # answer --version stops the start (ConfigError), as a missing one does.
        build = await trio.to_thread.run_sync(self.supervisor.builds.get, self.supervisor.binary)
        await trio.to_thread.run_sync(self._catalog_host.check_binaries, config)
        if not self._version_known:
            self.metrics.build = build_info(self.supervisor.binary, build.version)
        self.operations.llama_server_version = self.metrics.build.llama_server_version
        async with trio.open_nursery() as root:
            await root.start(self.supervisor.run)
            remotes = self.supervisor.remotes
            remotes.apply(config.remotes, self._remote_keys)
            # Their model lists are in the first catalog unless a remote is slow to answer (then
            # they join it when it does): a dead remote never holds routerd's start for long.
            with trio.move_on_after(max([r.connect_timeout for r in config.remotes.values()], default=0)):
                await remotes.first_checks()
            remotes.take_models_changed()  # the first catalog has what they said so far
            await self.catalog_service.rebuild(trigger="startup")  # discovered models are servable at READY
            await root.start(self.catalog_service.run)
            http_stopped = trio.Event()
            from routerd.front.routes import create_app  # quart is heavy; import once the daemon starts

            app = create_app(self.operations, self.metrics)
            try:
                self.operations.listen = await root.start(partial(self._serve_http, app, http_stopped))
            except* OSError as group:  # the bind fails inside the server's nurseries
                bind_error = leaves(group)[0]
                assert isinstance(bind_error, OSError)
                raise StartupError(listen_failure(config.server.host, config.server.port, bind_error)) from None
            control = ControlServer(self.operations, self.socket_path, config.control, counter=self.metrics)
            await root.start(control.serve)
            log.info("routerd %s serving on %s, control socket %s", __version__, ", ".join(self.http_urls),
                     self.socket_path)
            self.notifier.ready(self.operations.summary())
            self.supervisor.preload_soon()  # after READY: loading never delays serving other models
            root.start_soon(self.notifier.watchdog_loop)
            root.start_soon(self._status_updates)
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

    async def _serve_http(self, app: Front, stopped: trio.Event,
                          *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await http_server.serve(app, http_server.hypercorn_config(self.config.server),
                                    shutdown_trigger=self._http_stop.wait, tls=self.certificates.current,
                                    send_timeout=self.config.server.send_timeout, handler=app.handle,
                                    task_status=task_status)
        finally:
            stopped.set()

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        await self.catalog_service.reload()
                    except ConfigError as exc:
                        log.error("reload refused, keeping the running config: %s", exc.message)
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.request_shutdown()

    async def _status_updates(self) -> None:
        """Keep `systemctl status` current: a STATUS line whenever the counts change."""
        last = ""
        while True:
            line = self.operations.summary()
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
    daemon = Daemon(config, binary=binary, environ=environ, memory=memory)
    await daemon.run()
