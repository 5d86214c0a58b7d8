"""Remote endpoints: other servers whose models routerd relays to.

Owns one ``Remote`` per ``[remotes.NAME]``: its connection pool (its key injected as
``Authorization: Bearer`` and ``x-api-key``, never logged), its health (``reachable`` while its
health check answers; ``unreachable`` from the first failed check or broken call until one
answers again), its models (listed, or discovered from its ``GET /v1/models``), the queue
depths another routerd reports there (they count when balancing), and its concurrency limit.
``Remotes`` is the set of them, changed whole on reload: a removed remote takes no new
requests and its in-flight ones finish on their own connections.

It must not choose between endpoints (``endpoints``) or know about local backends or the
catalog: the supervisor and the daemon ask it.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

import trio

from routerd import events
from routerd.backends.upstream import ConnectionPool, UpstreamError
from routerd.config import Config, RemoteConfig
from routerd.errors import ConfigError

log = logging.getLogger("routerd.remote")
#: Longest wait between checks of an unreachable remote (checks back off up to it).
RECHECK_MAX = 10.0


def api_keys(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """Each remote's API key, from its environment variable or file ("" for none); ConfigError
    naming the remote when one is set but cannot be read (checked before a config is used)."""
    keys: dict[str, str] = {}
    errors: list[str] = []
    for name, remote in config.remotes.items():
        if remote.api_key_env:
            value = environ.get(remote.api_key_env, "")
            if not value:
                errors.append(f"remotes.{name}.api_key_env: ${remote.api_key_env} is not set in routerd's "
                              "environment (for systemd: EnvironmentFile= in a drop-in)")
            keys[name] = value.strip()
        elif remote.api_key_file:
            try:
                with open(remote.api_key_file, encoding="utf-8") as f:
                    keys[name] = f.readline().strip()
            except OSError as exc:
                errors.append(f"remotes.{name}.api_key_file: cannot read {remote.api_key_file}: "
                              f"{exc.strerror or exc}")
                continue
            if not keys[name]:
                errors.append(f"remotes.{name}.api_key_file: {remote.api_key_file} is empty")
        else:
            keys[name] = ""
    if errors:
        raise ConfigError(errors, config.source or "config")
    return keys


def listed_models(body: bytes) -> tuple[list[str], dict[str, int]]:
    """The models an OpenAI ``/v1/models`` answer lists, and the queue depths another routerd
    adds to it (pure). Aliases and a routerd's own remote models are left out: a model is
    listed once, and two routerds that are each other's remote do not echo each other's."""
    data = json.loads(body).get("data")
    if not isinstance(data, list):
        raise ValueError("no 'data' list")
    models: list[str] = []
    queued: dict[str, int] = {}
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        if item.get("alias_of") or str(item.get("source", "")).startswith("remote:") or "selector" in item:
            continue
        models.append(item["id"])
        if isinstance(item.get("queued"), int):
            queued[item["id"]] = item["queued"] + int(item.get("in_flight") or 0)
    return models, queued


def _pool(config: RemoteConfig, api_key: str) -> ConnectionPool:
    url = urlsplit(config.url)
    tls = ssl.create_default_context() if url.scheme == "https" else None
    secret = [(b"authorization", b"Bearer " + api_key.encode()), (b"x-api-key", api_key.encode())] if api_key else []
    return ConnectionPool(url.port or (443 if tls else 80), host=url.hostname or "", tls=tls, prefix=url.path,
                          max_idle=config.max_concurrent, read_timeout=config.read_timeout,
                          connect_timeout=config.connect_timeout, fixed_headers=secret)


class Remote:
    """One remote server, as an endpoint of each model it serves."""

    def __init__(self, name: str, config: RemoteConfig, api_key: str, *, bus: events.Bus,
                 on_change: Callable[[], None]) -> None:
        self.name = name
        self.config = config
        self.key = f"remote:{name}"
        self.label = f"remote {name!r} ({config.url})"
        self.bus = bus
        self._api_key = api_key
        self._on_change = on_change
        self.upstream: ConnectionPool | None = _pool(config, api_key)
        #: "unknown" until the first check, then "reachable" or "unreachable".
        self.state = "unknown"
        self.error: str | None = None
        self.models: tuple[str, ...] = tuple(config.models)
        #: Requests waiting or running at the remote per model (another routerd says so).
        self.queued: dict[str, int] = {}
        self.in_flight = 0
        self.removed = False
        self.checked = trio.Event()
        self._recheck = trio.Event()
        #: When its model list is read next (discovery; at once at first).
        self._next_discovery = -float("inf")
        self._models_changed: Callable[[], None] = lambda: None
        self._cancel = trio.CancelScope()

    def __repr__(self) -> str:  # never the key
        return f"Remote({self.name!r}, {self.config.url!r}, {self.state})"

    # -- as an endpoint ---------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self.state == "reachable" and not self.removed

    @property
    def slots(self) -> int:
        return self.config.max_concurrent

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._on_change()

    def slot_for_session(self, session: str) -> None:
        return None  # the remote routerd keeps its own

    def distrust(self) -> None:
        """A call broke before an answer: unreachable until a check answers again."""
        self._set_state("unreachable", "a request to it failed")
        self._recheck.set()

    async def failure_reason(self, exc: BaseException) -> str:
        return str(exc)

    @property
    def check_timeout(self) -> float:
        """Longest one check may take: connecting, then a few seconds to answer."""
        return self.config.connect_timeout + 5.0

    def outstanding(self, model: str) -> int:
        """Ours in flight there, or what it reports holding for ``model`` if that is more."""
        return max(self.in_flight, self.queued.get(model, 0))

    # -- life -------------------------------------------------------------------------------
    async def run(self, models_changed: Callable[[], None]) -> None:
        """Check it now and every ``health_interval`` (sooner after a failure, backing off)."""
        self._models_changed = models_changed
        with self._cancel:
            delay = 0.25
            while True:
                discover = not self.config.models and trio.current_time() >= self._next_discovery
                ok = await self._check(discover)
                if ok and discover:
                    self._next_discovery = trio.current_time() + (self.config.refresh or float("inf"))
                self.checked.set()
                wait = self.config.health_interval if ok else min(delay, self.config.health_interval)
                delay = 0.25 if ok else min(delay * 2, RECHECK_MAX)
                with trio.move_on_after(wait):
                    await self._recheck.wait()
                self._recheck = trio.Event()

    def rediscover(self) -> None:
        """Read its model list again now (on rescan)."""
        self._next_discovery = -float("inf")
        self._recheck.set()

    def close(self) -> None:
        """Removed by a reload: no new requests; ones in flight finish on their connections."""
        self.removed = True
        self._cancel.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self._on_change()

    async def _check(self, discover: bool) -> bool:
        assert self.upstream is not None
        path = "/v1/models" if discover else self.config.health_path
        try:
            with trio.fail_after(self.check_timeout):
                status, body = await self.upstream.get(path)
        except (UpstreamError, trio.TooSlowError) as exc:
            self._set_state("unreachable", str(exc) or "timed out")
            return False
        if status in (401, 403):
            self._set_state("unreachable", f"it refused routerd's key (HTTP {status}): check "
                                           f"remotes.{self.name}.api_key_env / api_key_file")
            return False
        if status != 200:
            self._set_state("unreachable", f"{path} answered HTTP {status}")
            return False
        if path == "/v1/models":
            try:
                models, queued = listed_models(body)
            except (ValueError, AttributeError) as exc:
                self._set_state("unreachable", f"its /v1/models is not an OpenAI model list ({exc})")
                return False
            self.queued = queued
            if discover and tuple(models) != self.models:
                log.info("remote %s serves %s", self.name, ", ".join(models) or "no models")
                self.models = tuple(models)
                self._models_changed()
        self._set_state("reachable", None)
        return True

    def _set_state(self, state: str, error: str | None) -> None:
        if state == self.state:
            self.error = error or self.error if state == "unreachable" else None
            return
        previous, self.state, self.error = self.state, state, error
        if state == "unreachable":
            log.warning("remote %s is unreachable: %s", self.name, error)
        elif previous == "unreachable":
            log.info("remote %s is reachable again", self.name)
        if state == "reachable":
            self.bus.publish(events.EventType.REMOTE_REACHABLE, None, remote=self.name, url=self.config.url,
                             error=error)
        else:
            self.bus.publish(events.EventType.REMOTE_UNREACHABLE, None, remote=self.name, url=self.config.url,
                             error=error)
        self._on_change()


class Remotes:
    """The configured remotes, each checked in its own task of this object's nursery."""

    def __init__(self, *, bus: events.Bus, on_change: Callable[[], None]) -> None:
        self.bus = bus
        self._on_change = on_change
        self._remotes: dict[str, Remote] = {}
        self._nursery: trio.Nursery | None = None
        self._models_changed = trio.Event()

    def __iter__(self) -> Iterator[Remote]:
        return iter(list(self._remotes.values()))

    def get(self, name: str) -> Remote | None:
        return self._remotes.get(name)

    def models(self) -> dict[str, tuple[str, ...]]:
        """Each remote's models, as last listed or discovered."""
        return {name: remote.models for name, remote in self._remotes.items()}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the remotes' checks until cancelled; then close every remote's connections."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            for remote in self._remotes.values():
                if remote.upstream is not None:
                    remote.upstream.close()

    def apply(self, configs: Mapping[str, RemoteConfig], keys: Mapping[str, str]) -> dict[str, list[str]]:
        """Start new remotes, close removed ones, replace changed ones (keys from ``api_keys``)."""
        assert self._nursery is not None, "Remotes.run() is not running"
        outcome: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        known: dict[str, tuple[str, ...]] = {}  # a changed remote's models stay listed meanwhile
        for name, remote in list(self._remotes.items()):
            if name not in configs:
                outcome["removed"].append(name)
            elif remote.config != configs[name] or remote._api_key != keys.get(name, ""):
                outcome["changed"].append(name)
            else:
                continue
            del self._remotes[name]
            known[name] = remote.models
            remote.close()
        for name, config in configs.items():
            if name not in self._remotes:
                if name not in outcome["changed"]:
                    outcome["added"].append(name)
                remote = self._remotes[name] = Remote(name, config, keys.get(name, ""), bus=self.bus,
                                                      on_change=self._on_change)
                if not config.models and name in known:
                    remote.models = known[name]
                self._nursery.start_soon(remote.run, self._note_models_changed, name=f"remote {name}")
        if outcome["removed"] or outcome["added"] or outcome["changed"]:
            self._note_models_changed()
        return outcome

    async def first_checks(self) -> None:
        """Wait until every remote was checked once (bound it with a cancel scope)."""
        for remote in list(self._remotes.values()):
            await remote.checked.wait()

    def rediscover(self) -> None:
        for remote in self._remotes.values():
            remote.rediscover()

    def _note_models_changed(self) -> None:
        self._models_changed.set()

    async def wait_models_changed(self) -> None:
        """Return once some remote's model list changed since the last return."""
        await self._models_changed.wait()
        self.take_models_changed()

    def take_models_changed(self) -> bool:
        """Whether a model list changed since this was last asked (or waited for)."""
        changed = self._models_changed.is_set()
        self._models_changed = trio.Event()
        return changed

