"""The catalog's lifecycle: which models exist, and keeping that current while routerd runs.

Owns discovery (the config's models, imported ones, folders, the Hugging Face cache, the remotes'
model lists), reload (read and check the config file: a bad one keeps the running config whole),
rescan, import, pull (and removing what was pulled), the periodic rescan, following the remotes'
model lists, and the lock that makes each rebuild start from the config the previous one left.

It must not import ``backends/`` or ``front/``: what a new config and catalog are applied to (the
supervisor, the gate, the certificates, the remotes) comes in as a ``CatalogHost`` the daemon
wires. It starts no process and serves nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Protocol

import attrs
import trio

from routerd import config as config_mod
from routerd import events
from routerd.config import Config
from routerd.errors import BadRequest, ConfigError, RouterdError, Unavailable
from routerd.models import discovery, hub
from routerd.models.catalog import Catalog, ImportStore

log = logging.getLogger("routerd")


@attrs.frozen
class ReloadResult:
    """What a reload or a rescan changed."""

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


@attrs.frozen
class PullResult:
    #: The name to serve it by (``org/repo:TAG``).
    model: str
    files: list[str]
    cache: str


class CatalogHost(Protocol):
    """What the catalog service changes and reads outside ``models/``, wired by the daemon (the
    supervisor, its remotes, the gate and the certificates live in the layers above)."""

    @property
    def catalog(self) -> Catalog:
        """The catalog being served."""
        ...

    def apply(self, config: Config, catalog: Catalog) -> Mapping[str, list[str]]:
        """Serve ``catalog`` under ``config``; the models ``restarted``, ``stopped`` and ``kept``."""
        ...

    def check_binaries(self, config: Config) -> None:
        """Ask each model's own llama-server what it is (blocking); ConfigError if one does not
        answer."""
        ...

    def reconfigure(self, running: Config, new: Config) -> dict[str, list[str]]:
        """Apply a reloaded config's settings outside the catalog (TLS, keys, remotes); the remotes
        ``added``, ``removed`` and ``changed``. Raises RouterdError, having changed nothing, when
        one of them is unusable."""
        ...

    def remote_models(self) -> Mapping[str, tuple[str, ...]]:
        """Each remote's models as it last listed them."""
        ...

    async def wait_remote_models_changed(self) -> None:
        """Return once some remote's model list changed since the last call."""
        ...

    def rediscover_remotes(self) -> None:
        """Ask every remote for its model list again (the answers come as changes)."""
        ...

    def reloading(self) -> None:
        """A reload begins (systemd's RELOADING)."""
        ...

    def reloaded(self) -> None:
        """A reload ended, applied or refused (systemd's READY)."""
        ...


class CatalogService:
    """The running config and the catalog built from it; every rebuild goes through here."""

    def __init__(self, config: Config, host: CatalogHost, *, bus: events.Bus, imports: ImportStore,
                 hub_cache: str, environ: Mapping[str, str]) -> None:
        self._config = config
        self.host = host
        self.bus = bus
        self.imports = imports
        self.hub_cache = hub_cache
        self.environ = dict(environ)
        #: Held by each rebuild: one at a time, and the newest file system wins.
        self.lock = trio.Lock()
        #: Where background pulls run (``run``'s), while it runs.
        self._nursery: trio.Nursery | None = None

    @property
    def config(self) -> Config:
        """The config running now (the last one a reload or rescan applied)."""
        return self._config

    async def reload(self) -> ReloadResult:
        """Re-read the config file and rescan; a bad file raises ConfigError and changes nothing."""
        self.host.reloading()
        try:
            new = config_mod.load(self._config.source)
            await trio.to_thread.run_sync(self.host.check_binaries, new)
            remotes = self.host.reconfigure(self._config, new)  # checks every file it names before changing anything
            self.bus.buffer = new.metrics.event_buffer
            result = attrs.evolve(await self.rebuild(lambda _running: new, trigger="reload"), remotes=remotes)
        except RouterdError as exc:
            self.bus.publish(events.EventType.CONFIG_RELOAD, ok=False, error=exc.message)
            raise
        finally:
            self.host.reloaded()
        self.bus.publish(events.EventType.CONFIG_RELOAD, ok=True, **attrs.asdict(result))
        return result

    async def rescan(self, trigger: str = "operator") -> ReloadResult:
        """Re-discover models: the config's [models], imported ones, folders and the HF cache."""
        def with_fresh_models(running: Config) -> Config:  # only [models] is taken from the file
            return attrs.evolve(running, models=config_mod.load(running.source).models)

        if trigger == "operator":
            self.host.rediscover_remotes()  # their lists follow as each answers
        try:
            return await self.rebuild(with_fresh_models, trigger=trigger)
        except RouterdError as exc:
            self.bus.publish(events.EventType.CATALOG_RESCAN, trigger=trigger, ok=False, error=exc.message)
            raise

    async def import_models(self, path: str) -> list[str]:
        """Import the models under ``path`` as manual entries (persisted); their names."""
        found = await trio.to_thread.run_sync(discovery.scan_path, path)
        if not found:
            raise BadRequest(f"no GGUF model found at {path}", code="nothing_to_import")
        fresh = {f.path: attrs.evolve(f, source="import") for f in found}
        kept = [f for f in self.imports.load() if f.path not in fresh]
        self.imports.save(kept + list(fresh.values()))
        await self.rebuild(trigger="import")
        return [entry.name for entry in self.host.catalog if entry.path in fresh]

    def check_pull(self, ref: str) -> tuple[str, str | None]:
        """``ref`` as (repo id, tag) when a pull of it could be served; else the error, before
        anything is downloaded."""
        repo_id, tag = hub.parse_model_ref(ref)
        if self.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise Unavailable(f"HF_HUB_OFFLINE is set: routerd will not download {ref}; unset it to pull",
                              code="hub_offline")
        if not self._config.catalog.hf_cache:
            raise BadRequest(f"catalog.hf_cache is off, so a pulled model would not be served: turn it on "
                             f"to pull {ref}", code="hf_cache_disabled")
        return repo_id, tag

    async def pull(self, ref: str, filename: str | None, progress: hub.Progress | None = None) -> PullResult:
        """Download ``org/repo[:QUANT]`` into the hub cache, rescan, and name the new model.
        ``progress`` is called from the download's thread; the bus hears how it goes too
        (``pull.progress``, then ``pull.done`` or ``pull.failed``), whoever asked for it."""
        repo_id, tag = self.check_pull(ref)
        bus = self.bus

        def report(name: str, done: int, total: int | None) -> None:  # the download's thread
            trio.from_thread.run_sync(partial(bus.publish, events.EventType.PULL_PROGRESS, ref, file=name,
                                              bytes=done, total=total))
            if progress is not None:
                progress(name, done, total)

        try:
            plan = await trio.to_thread.run_sync(partial(
                hub.pull, repo_id, tag, filename, cache_dir=self.hub_cache, endpoint=self.environ.get("HF_ENDPOINT"),
                token=self.environ.get("HF_TOKEN"), progress=report))
            await self.rebuild(trigger="pull")
        except RouterdError as exc:
            bus.publish(events.EventType.PULL_FAILED, ref, error=exc.message, code=exc.code)
            raise
        except OSError as exc:  # the cache's disk: full, read-only
            bus.publish(events.EventType.PULL_FAILED, ref, error=str(exc), code="cache_unwritable")
            raise Unavailable(f"pulling {ref} failed writing to the cache {self.hub_cache}: {exc.strerror or exc}",
                              code="cache_unwritable") from None
        result = PullResult(model=f"{repo_id}:{plan.tag}", files=list(plan.files), cache=self.hub_cache)
        bus.publish(events.EventType.PULL_DONE, ref, pulled=result.model, files=result.files, cache=result.cache)
        return result

    def pull_soon(self, ref: str, filename: str | None = None) -> None:
        """Start pulling ``ref`` in the background (``run``'s nursery): the bus says how it goes.
        An error that needs no download (a malformed name, offline) is raised here."""
        self.check_pull(ref)
        if self._nursery is None:
            raise Unavailable("routerd is starting or stopping; pull again in a moment", code="not_running")
        self._nursery.start_soon(self._pull_quietly, ref, filename, name=f"pull {ref}")

    async def _pull_quietly(self, ref: str, filename: str | None) -> None:
        try:
            await self.pull(ref, filename)
        except RouterdError as exc:
            log.warning("pull of %s failed: %s", ref, exc.message)
        except Exception as exc:  # noqa: BLE001 - a full disk must not take the catalog's nursery down
            log.exception("pull of %s failed", ref)
            self.bus.publish(events.EventType.PULL_FAILED, ref, error=f"{type(exc).__name__}: {exc}", code="pull_error")

    def check_removable(self, name: str) -> None:
        """BadRequest unless ``name`` is a model pulled into the hub cache: models from the
        config, an import or a folder are the user's files."""
        entry = self.host.catalog.resolve(name)
        if entry.source != "hf-cache":
            where = {"config": "the config file", "import": "`routerctl import`", "folder": "a models folder"}
            raise BadRequest(
                f"model {entry.name!r} comes from {where.get(entry.source, entry.source)} ({entry.path}), not from a "
                "pull: routerd removes only what it downloaded into the Hugging Face cache. Take it out of its "
                "config or folder yourself", code="model_not_removable")

    async def remove(self, name: str) -> list[str]:
        """Delete a pulled model's files from the hub cache and rescan; the files removed."""
        self.check_removable(name)
        entry = self.host.catalog.resolve(name)
        removed = await trio.to_thread.run_sync(hub.remove_cached, entry.path, [*entry.mmproj], self.hub_cache)
        await self.rebuild(trigger="remove")
        self.bus.publish(events.EventType.MODEL_REMOVED, entry.name, files=removed)
        return removed

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

    async def rebuild(self, update: Callable[[Config], Config] | None = None, *, trigger: str) -> ReloadResult:
        """Rebuild the catalog under ``update(running config)`` (no update: the running config)
        and apply both. The config is read once this call's turn comes, so a reload applied
        meanwhile is built on, never undone by a rescan that began before it."""
        async with self.lock:
            new = self._config if update is None else update(self._config)
            new_catalog = await trio.to_thread.run_sync(self.discover, new, self.host.remote_models())
            old_catalog = self.host.catalog
            outcome = self.host.apply(new, new_catalog)
            diff = old_catalog.diff(new_catalog)
            self._config = new
        log.info("applied %s: %s; catalog %s", new.source, outcome, diff)
        for problem in new_catalog.problems:
            log.warning("not served, the Hugging Face cache has a corrupted entry: %s", problem)
        result = ReloadResult(restarted=list(outcome["restarted"]), stopped=list(outcome["stopped"]),
                              kept=list(outcome["kept"]), added=list(diff.added), removed=list(diff.removed),
                              changed=list(diff.changed), problems=list(new_catalog.problems))
        if trigger != "reload":  # a reload says so itself, with its outcome
            self.bus.publish(events.EventType.CATALOG_RESCAN, trigger=trigger, ok=True, models=len(list(new_catalog)),
                             added=result.added, removed=result.removed, changed=result.changed,
                             problems=result.problems)
        return result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the catalog current until cancelled: follow the remotes' model lists, and rescan
        every ``catalog.rescan_interval`` s when it is set."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._follow_remotes)
                nursery.start_soon(self._rescan_periodically)
                task_status.started()
        finally:
            self._nursery = None

    async def _follow_remotes(self) -> None:
        """Rebuild the catalog whenever a remote's model list changes (discovery, reload)."""
        while True:
            await self.host.wait_remote_models_changed()
            result = await self.rebuild(trigger="remote")
            if result.added or result.removed:
                log.info("remote models: added %s, removed %s", result.added, result.removed)

    async def _rescan_periodically(self) -> None:
        while self._config.catalog.rescan_interval > 0:
            await trio.sleep(self._config.catalog.rescan_interval)
            try:
                result = await self.rescan(trigger="periodic")
            except ConfigError as exc:
                log.error("periodic rescan: the config is invalid, keeping the running one: %s", exc.message)
                continue
            if result.added or result.removed or result.changed:
                log.info("rescan: added %s, removed %s, changed %s", result.added, result.removed, result.changed)
