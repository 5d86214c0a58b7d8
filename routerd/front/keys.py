"""API keys: how one is made, what it may do, and the files that hold them.

Owns the key record (name, hash, scope, limits, expiry), making a key, hashing one, and the two
TOML files keys live in: routerd's own ``keys.toml`` in the state directory (written by
``routerctl keys``, atomically, mode 0600) and an optional ``auth.keys_file`` kept by other
tools (read only). A key is never stored or logged in clear: only its SHA-256 and its first
characters (so people can tell keys apart). Keys are 256 random bits, so a fast hash is as safe
as a slow one and costs a microsecond per request instead of milliseconds.

It knows nothing of HTTP or of requests in flight (``access.py`` does).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import os
import secrets
import tomllib
from collections.abc import Iterable
from typing import Any

import attrs
import cattrs

from routerd import statefile
from routerd.config import flatten_errors
from routerd.errors import BadRequest, ConfigError

#: Every key routerd makes starts with this, so scanners (and people) recognise a leaked one.
KEY_PREFIX = "rk-"
#: Characters of a key shown by ``keys list`` and in logs: the prefix and 6 random ones.
SHOWN_CHARS = len(KEY_PREFIX) + 6
PRIORITY_LEVELS = ("high", "normal", "low")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")


@attrs.frozen(kw_only=True)
class KeySettings:
    """What a key may do: the fields an operator chooses (``routerctl keys add``, a keys file)."""

    #: Glob patterns of model names and aliases it may use (``qwen*``, ``org/*``).
    models: tuple[str, ...] = ("*",)
    #: The best priority its requests get (``high``: no cap).
    priority_max: str = "high"
    #: Requests per minute; 0: no limit.
    rpm: int = 0
    #: Requests at once (waiting or running); 0: no limit.
    concurrent: int = 0
    #: ISO 8601 date or time after which it is refused; a date is valid through that day (UTC).
    expires: str = ""
    #: May do the admin actions over HTTP (see access.require_admin).
    admin: bool = False

    def settings(self) -> KeySettings:
        """Only these fields, whatever subclass carries them (a record, the control params)."""
        return KeySettings(**_settings_fields(self))

    def problems(self, *, now: dt.datetime | None = None) -> list[str]:
        """What is wrong with these fields, each as one line (pure); ``now``: also refuse an
        expiry already past (a new key), not only a malformed one."""
        problems = []
        if self.priority_max not in PRIORITY_LEVELS:
            problems.append(f"priority_max {self.priority_max!r} is not one of {', '.join(PRIORITY_LEVELS)}")
        if self.rpm < 0 or self.concurrent < 0:
            problems.append("rpm and concurrent must not be negative (0: no limit)")
        if not all(self.models):
            problems.append("a model pattern must not be empty")
        if self.expires:
            try:
                moment = expiry(self.expires)
            except ValueError:
                problems.append(f"expires {self.expires!r} is not a date (2026-12-31) or time (2026-12-31T18:00)")
            else:
                if now is not None and moment <= now:
                    problems.append(f"expires {self.expires!r} is in the past")
        return problems


def _settings_fields(value: KeySettings) -> dict[str, Any]:
    return {field.name: getattr(value, field.name) for field in attrs.fields(KeySettings)}


@attrs.frozen(kw_only=True)
class ApiKey(KeySettings):
    """One key: who holds it and what they may do; never the key itself."""

    name: str
    #: ``sha256:`` and the hex digest of the whole key.
    hash: str
    #: Its first characters, to tell keys apart (``rk-AbC12x``).
    prefix: str = ""
    created: str = ""
    last_used: str = ""

    def allows(self, names: Iterable[str]) -> bool:
        """Whether a model known by ``names`` (its name and aliases) is in this key's scope."""
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in self.models)

    def expired(self, now: dt.datetime) -> bool:
        return bool(self.expires) and now >= expiry(self.expires)


def new_key() -> str:
    """A fresh key: the prefix and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def expiry(text: str) -> dt.datetime:
    """The moment ``text`` names (pure): a date means the end of that day, UTC; a time without
    an offset is UTC. ValueError when it is neither."""
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        moment = dt.datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


#: A key for every model, without limits or admin rights.
EVERYTHING = KeySettings()


def make(name: str, settings: KeySettings = EVERYTHING, *, now: dt.datetime | None = None) -> tuple[str, ApiKey]:
    """A new key and its record (pure but for the random key); an empty ``models`` means every
    model. BadRequest for a bad name or setting."""
    now = now or dt.datetime.now(dt.UTC)
    chosen = _settings_fields(settings)
    chosen["models"] = settings.models or EVERYTHING.models
    record = ApiKey(name=name, hash="", created=now.isoformat(timespec="seconds"), **chosen)
    problems = problems_of(record, now=now)
    if problems:
        raise BadRequest("; ".join(problems), code="invalid_key_settings")
    key = new_key()
    return key, attrs.evolve(record, hash=hash_key(key), prefix=key[:SHOWN_CHARS])


def problems_of(record: ApiKey, *, now: dt.datetime | None = None) -> list[str]:
    """What is wrong with a record (its name, hash and settings), each as one line (pure)."""
    problems = []
    if not record.name or not set(record.name) <= _NAME_CHARS:
        problems.append(f"name {record.name!r}: use letters, digits and - _ . @")
    if record.hash and not (record.hash.startswith("sha256:") and len(record.hash) == 71):
        problems.append("hash must be 'sha256:' and 64 hex digits (sha256sum of the key)")
    return problems + record.problems(now=now)


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


class KeyFile:
    """Keys in a TOML file: one ``[keys.NAME]`` table each (hash, prefix, models, priority_max,
    rpm, concurrent, expires, admin, created, last_used)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, ApiKey]:
        """The keys by name; none when the file does not exist. ConfigError when it is broken."""
        try:
            with open(self.path, "rb") as f:
                data = tomllib.load(f)
        except (FileNotFoundError, NotADirectoryError):  # an unwritable state dir is reported at start
            return {}
        except OSError as exc:
            raise ConfigError([f"{self.path}: cannot read: {exc.strerror}"], self.path) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{self.path}: not valid TOML: {exc}"], self.path) from None
        keys: dict[str, ApiKey] = {}
        problems: list[str] = []
        for name, fields in (data.get("keys") or {}).items():
            if not isinstance(fields, dict):
                problems.append(f"keys.{name}: must be a table")
                continue
            try:
                record = _converter.structure({**fields, "name": name}, ApiKey)
            except (cattrs.BaseValidationError, cattrs.ForbiddenExtraKeysError) as exc:
                problems += flatten_errors(exc, f"keys.{name}")
                continue
            if not record.hash:
                problems.append(f"keys.{name}.hash: required (sha256: and the key's SHA-256 in hex)")
            problems += [f"keys.{name}: {p}" for p in problems_of(record)]
            keys[name] = record
        if problems:
            raise ConfigError(problems, self.path)
        return keys

    def save(self, keys: Iterable[ApiKey]) -> None:
        """Write every key, atomically, readable by routerd's user only."""
        data: dict[str, Any] = {"keys": {}}
        for record in keys:
            fields = _converter.unstructure(record)
            del fields["name"]
            fields = {"hash": fields.pop("hash"), "prefix": fields.pop("prefix"), **fields}  # as people read it
            fields["models"] = list(record.models)
            data["keys"][record.name] = {k: v for k, v in fields.items() if v not in ("", 0, False)}
        statefile.write_toml(self.path, data, mode=0o600,
                             header="API keys made with `routerctl keys`; managed by routerd (hashes only).")


def store_path(state_dir: str) -> str:
    return os.path.join(state_dir, "keys.toml")
