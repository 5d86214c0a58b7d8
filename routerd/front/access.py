"""Who may use routerd over HTTP: the key on each request, its scope and its limits.

Owns the keys in force (those made with ``routerctl keys``, kept in the state directory, plus
an optional ``auth.keys_file``), whether a request must carry one, which models a caller sees,
and each key's request rate and concurrency. Keys are required as soon as one exists, and
always when routerd listens beyond loopback (unless ``auth.allow_unauthenticated``).

Owns too the check every HTTP request passes before any handler (``check_request``: the header
count limit and the key, except on the open paths), where a request's ``Caller`` is kept for its
handlers (``caller_of``), and the ASGI types at the front's boundary (hypercorn's TypedDicts).

It must not know routes or models beyond names: the proxy and the views ask it about a
request's headers and a model's names, and render what it raises (401, 403, 404, 429, 431).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import ipaddress
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import attrs
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, WWWScope

from routerd.config import AuthConfig
from routerd.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    HeadersTooLarge,
    NotFound,
    RouterdError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from routerd.front import keys as keys_mod
from routerd.front.keys import ApiKey, KeyFile, KeySettings

if TYPE_CHECKING:
    from routerd.models.catalog import ModelEntry

log = logging.getLogger("routerd.access")
#: The external keys file is looked at (one stat) at most this often, when requests come.
KEYS_FILE_CHECK_INTERVAL = 1.0
#: The ASGI types of one HTTP request, as hypercorn (and so Quart) hands them over.
Scope = HTTPScope
Receive = ASGIReceiveCallable
Send = ASGISendCallable
#: Where a request's Caller is kept, in its scope's per-request ``state`` (ASGI copies it for
#: every request), for the handlers after the gate.
CALLER = "routerd.caller"
#: Paths open to anyone, key or not: load balancers and container runtimes probe /health; the
#: pages (routerd's, and llama.cpp's web UI at /) ask for a key themselves.
OPEN_PATHS = frozenset({"/health", "/ui", "/"})
#: Open too: the status page's files (it asks for a key itself; its data needs one).
OPEN_PREFIXES = ("/ui/",)
_NO_KEY = ("this routerd requires an API key: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY'); "
           "an operator makes one with `routerctl keys add NAME`")


#: Headers a reverse proxy adds: a request carrying one is not the local user's, whatever its Host.
_FORWARDED = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-real-ip"})


def cross_site(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request comes from a page on another site than routerd's own, or None (pure).

    Browsers say where a request comes from: ``Sec-Fetch-Site`` (``same-origin`` for routerd's
    own page, ``none`` for an address typed by the user) and ``Origin`` (scheme, host and port of
    the page), which must then name the host the request was sent to. Clients that are not
    browsers send neither and are not refused: keys are their check. A form or ``text/plain``
    POST from another site needs no CORS preflight, so this is what stops it acting."""
    fetch_site = origin = host = None
    for name, value in headers:
        if name == b"sec-fetch-site":
            fetch_site = value.decode("latin-1").strip().lower()
        elif name == b"origin":
            origin = value.decode("latin-1").strip()
        elif name == b"host":
            host = value.decode("latin-1").strip().lower()
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {fetch_site!r}"
    if origin is not None:
        _, sep, netloc = origin.partition("://")
        if not sep or netloc.lower().rstrip("/") != (host or ""):
            return f"Origin {origin!r} is not this routerd ({host or 'no Host'})"
    return None


def _host_name(host: str) -> str:
    """The name of a ``Host`` header without its port (pure): ``[::1]:8082`` -> ``::1``."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only (pure)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (pure)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


@attrs.frozen
class Caller:
    """Who sent a request: a key's record, or nobody when keys are not required."""

    key: ApiKey | None = None

    @property
    def name(self) -> str:
        return self.key.name if self.key else "anonymous"

    @property
    def is_admin(self) -> bool:
        return self.key is None or self.key.admin

    def allows(self, names: Iterable[str]) -> bool:
        return self.key is None or self.key.allows(names)

    def priority(self, asked: int, levels: Sequence[str] = keys_mod.PRIORITY_LEVELS) -> int:
        """The priority level a request gets: what it asked for, never better than the key's cap."""
        return asked if self.key is None else max(asked, levels.index(self.key.priority_max))


ANONYMOUS = Caller()


def caller_of(scope: WWWScope) -> Caller:
    """Who sent the request ``scope`` describes (``ANONYMOUS`` where the gate asked no key)."""
    caller: Caller = scope["state"].get(CALLER, ANONYMOUS)
    return caller


def is_open(path: str, *, metrics_open: bool) -> bool:
    """Whether ``path`` is served without a key, whatever the method (pure)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (metrics_open and path == "/metrics")


def check_request(gate: Gate, scope: Scope, *, max_headers: int, metrics_open: bool) -> None:
    """The check every request passes before a handler runs: at most ``max_headers`` header
    fields (431), and a valid key (401) unless the path is open; the caller is kept in the
    scope for ``caller_of``. Raises what the client is told."""
    headers = scope["headers"]
    count = len(headers) if isinstance(headers, list) else sum(1 for _ in headers)
    if count > max_headers:
        raise HeadersTooLarge(f"the request has {count} header fields; the limit is {max_headers} "
                              "(server.max_headers)")
    if is_open(scope["path"], metrics_open=metrics_open):
        return
    try:
        scope["state"][CALLER] = gate.authenticate(headers)
    except RouterdError as exc:
        log.info("refused %s %s from %s: %s", scope["method"], scope["path"], peer(scope), exc.code)
        raise


def peer(scope: Scope) -> str:
    """The client's address as ``host:port``, for logs and request records."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class TokenBucket:
    """``per_minute`` requests a minute, in bursts of up to that many (pure but for ``now``)."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.updated = now

    def take(self, now: float) -> float:
        """Take one request's token: 0 when granted, else the seconds until one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Gate:
    """The keys in force and what each caller is using now."""

    def __init__(self, config: AuthConfig, *, listening_on: str, state_dir: str,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._clock = clock
        self._wallclock = wallclock
        self.store = KeyFile(keys_mod.store_path(state_dir))
        self._own = self.store.load()  # a broken store stops startup (ConfigError)
        self._external: dict[str, ApiKey] = {}
        self._external_file: KeyFile | None = None
        self._external_stamp: tuple[int, int, int] | None = None
        self._external_checked = -math.inf
        self._by_hash: dict[str, ApiKey] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._running: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self.configure(config, listening_on=listening_on)

    # -- configuration ----------------------------------------------------------------------
    def configure(self, config: AuthConfig, *, listening_on: str) -> None:
        """Apply ``[auth]`` (at start and on reload). ConfigError, changing nothing, when the
        keys file is broken or routerd would serve beyond loopback with no key."""
        external_file = KeyFile(config.keys_file) if config.keys_file else None
        external = external_file.load() if external_file else {}
        clash = sorted(set(external) & set(self._own))
        if clash:
            raise ConfigError([f"auth.keys_file: {', '.join(clash)} also made with `routerctl keys`; "
                               "rename one or revoke it"], "auth")
        exposed = not is_loopback(listening_on) and not config.allow_unauthenticated
        if exposed and not self._own and not external:
            raise ConfigError([
                f"server.host is {listening_on}, beyond this machine, and no API key exists: anyone who can "
                "reach the port could use every model. Make a key first (`routerd add-key NAME`, or serve "
                "on 127.0.0.1 and run `routerctl keys add NAME`, or list hashed keys in auth.keys_file), or set "
                "auth.allow_unauthenticated = true to serve without keys on purpose"], "auth")
        self._keys_required_always = exposed
        self._loopback_only = is_loopback(listening_on)
        self._external_file, self._external = external_file, external
        self._external_stamp = _stamp(config.keys_file) if config.keys_file else None
        self._external_checked = self._clock()
        self._index()

    def _index(self) -> None:
        self._by_hash = {record.hash: record for record in [*self._own.values(), *self._external.values()]}
        live = {record.name for record in self._by_hash.values()}
        for table in (self._buckets, self._last_used):
            for name in set(table) - live:
                del table[name]

    def _refresh_external(self) -> None:
        """Pick up an edited keys file (one stat a second at most, and only when asked)."""
        now = self._clock()
        if self._external_file is None or now - self._external_checked < KEYS_FILE_CHECK_INTERVAL:
            return
        self._external_checked = now
        stamp = _stamp(self._external_file.path)
        if stamp == self._external_stamp:
            return
        try:
            external = self._external_file.load()
        except ConfigError as exc:
            log.error("auth.keys_file changed but is invalid; keeping the keys read before: %s", exc.message)
            self._external_stamp = stamp
            return
        self._external, self._external_stamp = {k: v for k, v in external.items() if k not in self._own}, stamp
        log.info("auth.keys_file re-read: %d keys", len(self._external))
        self._index()

    @property
    def required(self) -> bool:
        """Whether requests must carry a key (they must once any key exists)."""
        self._refresh_external()
        return self._keys_required_always or bool(self._by_hash)

    # -- per request --------------------------------------------------------------------------
    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> Caller:
        """Who sent a request with ``headers``; Unauthorized (401) for a missing, unknown or
        expired key when keys are required."""
        if not self.required:
            return ANONYMOUS
        key = presented_key(headers)
        if key is None:
            raise Unauthorized(_NO_KEY)
        digest = keys_mod.hash_key(key)
        record = self._by_hash.get(digest)
        # The lookup is by hash, never by the key; the comparison is constant-time anyway.
        if record is None or not hmac.compare_digest(record.hash, digest):
            raise Unauthorized("the API key is not valid: check it for typos, or ask for a new one "
                               "(`routerctl keys list` shows which exist)")
        if record.expired(self._wallclock()):
            raise Unauthorized(f"the API key {record.prefix}... expired at {record.expires}; ask for a new one",
                               code="expired_api_key")
        self._last_used[record.name] = time.time()
        return Caller(record)

    @contextlib.contextmanager
    def admit(self, caller: Caller) -> Iterator[None]:
        """Count one request against its key's rate and concurrency, for as long as it runs;
        TooManyRequests (429, with Retry-After) when over either."""
        record = caller.key
        if record is None or not (record.rpm or record.concurrent):
            yield
            return
        name = record.name
        if record.concurrent and self._running.get(name, 0) >= record.concurrent:
            raise TooManyRequests(f"key {name!r} already has {record.concurrent} requests in progress "
                                  "(its concurrency limit); retry when one ends", code="key_concurrency_limit",
                                  retry_after=1)
        if record.rpm:
            bucket = self._buckets.get(name)
            if bucket is None or bucket.capacity != record.rpm:
                bucket = self._buckets[name] = TokenBucket(record.rpm, self._clock())
            wait = bucket.take(self._clock())
            if wait:
                raise TooManyRequests(f"key {name!r} is over its rate of {record.rpm} requests a minute",
                                      code="key_rate_limit", retry_after=wait)
        self._running[name] = self._running.get(name, 0) + 1
        try:
            yield
        finally:
            self._running[name] -= 1
            if not self._running[name]:
                del self._running[name]

    @staticmethod
    def check_model(caller: Caller, requested: str, entry: ModelEntry | None) -> None:
        """NotFound, worded as for a model that does not exist, when a keyed caller may not use
        the model ``requested`` names (``entry``, None when no model has that name): a scoped key
        learns nothing about models outside its scope."""
        if caller.key is not None and (entry is None or not caller.allows((entry.name, *entry.aliases))):
            raise NotFound(f"model {requested!r} not found", code="model_not_found")

    @staticmethod
    def check_selector(caller: Caller, selector: str) -> None:
        """Like ``check_model`` for a virtual model: a scoped key names the selector itself,
        which then lets it reach every target."""
        if caller.key is not None and not caller.allows((selector,)):
            raise NotFound(f"model {selector!r} not found", code="model_not_found")

    @staticmethod
    def require_admin(caller: Caller, action: str) -> None:
        if not caller.is_admin:
            raise Forbidden(f"{action} needs an admin key (`routerctl keys add NAME --admin`)")

    def local_user(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether a request without a key acts for the machine's own user: routerd listens on
        loopback only, no key exists, and the request names a loopback host (a page on another
        site that rebinds its name to 127.0.0.1 does not) and came through no reverse proxy
        (``Forwarded``, ``X-Forwarded-For``...: behind one, make a key)."""
        if not self._loopback_only or self.required:
            return False
        host = b""
        for name, value in headers:
            if name in _FORWARDED:  # relayed by a proxy: its callers may be anyone
                return False
            if name == b"host":
                host = value
        return is_loopback(_host_name(host.decode("latin-1")))

    def require_admin_key(self, caller: Caller, action: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """State-changing actions over HTTP (the admin API, router mode's): an admin key, or no
        key at all where the request comes from the local user (``local_user``). Where keys are
        not required but routerd is reachable from elsewhere, an anonymous caller never acts:
        the control socket is for the host's own users."""
        if caller.key is None:
            if self.local_user(headers):
                return
            raise Unauthorized(f"{action} needs an admin key in the Authorization header "
                               "(`routerctl keys add NAME --admin` makes one)", code="admin_key_required")
        Gate.require_admin(caller, action)

    # -- what routerctl keys does -------------------------------------------------------------
    def add(self, name: str, settings: KeySettings = keys_mod.EVERYTHING) -> tuple[str, ApiKey]:
        """Make a key, save it, and have it work at once; the key is returned here only."""
        self._refresh_external()
        if name in self._own or name in self._external:
            raise BadRequest(f"a key named {name!r} exists; revoke it first or choose another name",
                             code="key_exists")
        key, record = keys_mod.make(name, settings, now=self._wallclock())
        self._save({**self._own, name: record})
        return key, record

    def revoke(self, name: str) -> ApiKey:
        if name in self._external:
            where = self._external_file.path if self._external_file else ""
            raise BadRequest(f"key {name!r} comes from auth.keys_file ({where}); remove it there",
                             code="key_in_keys_file")
        record = self._own.get(name)
        if record is None:
            raise NotFound(f"no key named {name!r} (`routerctl keys list` shows them)", code="key_not_found")
        self._save({k: v for k, v in self._own.items() if k != name})
        return record

    def listing(self) -> list[dict[str, object]]:
        """Every key's name, prefix, scope, limits and use; never a key or its hash."""
        self._refresh_external()
        rows = []
        for source, table in (("routerctl", self._own), ("keys_file", self._external)):
            for record in table.values():
                used = self._last_used.get(record.name)
                rows.append({"name": record.name, "prefix": record.prefix, "models": list(record.models),
                             "priority_max": record.priority_max, "rpm": record.rpm,
                             "concurrent": record.concurrent, "expires": record.expires, "admin": record.admin,
                             "created": record.created, "source": source,
                             "running": self._running.get(record.name, 0),
                             "last_used": _iso(used) if used else record.last_used})
        return sorted(rows, key=lambda row: str(row["name"]))

    def save_last_used(self) -> None:
        """Keep when each key was last used across restarts (called at shutdown; Unavailable
        when the file cannot be written)."""
        if any(name in self._own for name in self._last_used):
            self._save(self._own)

    def _save(self, own: dict[str, ApiKey]) -> None:
        stamped = {name: attrs.evolve(record, last_used=_iso(self._last_used[name]))
                   if name in self._last_used else record for name, record in own.items()}
        try:
            self.store.save(stamped.values())
        except OSError as exc:  # nothing changed, on disk or here
            raise Unavailable(f"cannot write {self.store.path}: {exc.strerror}; check the state directory's "
                              "owner and free space", code="state_not_writable") from None
        self._own = stamped
        self._index()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")
