"""``routerd convert FILE``: a llama-swap config.yaml or a llama.cpp ``--models-preset`` INI file as
routerd TOML.

Owns the mapping of those two formats onto routerd's config keys, and the list of what has no
equivalent, each with why. Pure functions build a Conversion from the parsed file; ``render``
writes it (tomli_w for the data, the comments added as text); ``main`` reads the file and prints.
It writes no file and copies no secret: a peer's API key becomes the name of an environment
variable for the user to set, and API keys in commands or lists are left out.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import tomli_w
import yaml

from routerd import config as config_mod
from routerd import llama_args
from routerd.errors import ConfigError

#: Flags that name a model with no local file: routerd serves files, and `routerctl pull` fetches them.
_REMOTE_SOURCES = frozenset({"--hf-repo", "-hf", "-hfr", "--model-url", "-mu", "--docker-repo", "-dr"})
#: Flags that only go with those (and a token: never copied).
_SOURCE_EXTRAS = frozenset({"--hf-file", "-hff", "--hf-token", "-hft"})
#: Short spellings a preset may use as keys (``c = 4096`` is ``-c 4096``); any other key is a long flag.
_SHORT_KEYS = frozenset("t tb C Cr Cb Crb c n b ub fa e kvo nkvo nr ctk ctv dt lm lzm dev ot cmoe ncmoe ncffn ngl "
                        "sm ts mg fit fitt fitc m mu dr hf hfr hff hft v lv ctkd ctvd s np a mm md cd ngld devd "
                        "sps cb".split())
#: Options of a preset file that are not llama-server flags.
_PRESET_ONLY = ("load-on-startup", "stop-timeout", "dedup-cache-models")
_MACRO = re.compile(r"\$\{(env\.)?([A-Za-z0-9_-]+)\}")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")

_TOP_REASONS = {
    "apiKeys": "routerd's keys are made with `routerctl keys add NAME` and kept hashed; these are not copied",
    "startPort": "routerd picks a free port for each llama-server itself",
    "matrix": "routerd has no swap sets: models sharing a `group` run together, the memory budget decides the rest",
    "profiles": "routerd has no runtime pins; a [selectors.NAME] with strategy = \"pin\" names one target",
    "includeAliasesInList": "routerd's /v1/models lists every name and alias",
}
_MODEL_REASONS = {
    "cmdStop": "routerd stops its own llama-server (SIGTERM, then SIGKILL after backend.stop_grace)",
    "checkEndpoint": "routerd checks each llama-server's /health itself",
    "unlisted": "routerd lists every model in /v1/models",
    "useModelName": "routerd does not rename the model a request names",
    "concurrencyLimit": "routerd queues requests beyond a model's slots (--parallel in args) instead of a 429 limit",
    "timeouts": "routerd has one read timeout for all backends (server.upstream_read_timeout)",
    "unloadTimeout": "routerd's stop grace is for all models (backend.stop_grace)",
    "name": "display data only", "description": "display data only", "metadata": "display data only",
}


class ConvertError(Exception):
    """The file cannot be read or is neither format: the message says what to do."""


@dataclasses.dataclass
class Conversion:
    kind: str
    config: dict[str, Any]
    #: "what: why", one per thing without an equivalent.
    skipped: list[str] = dataclasses.field(default_factory=list)


def _is_flag(token: str) -> bool:
    return token.startswith("-") and token != "-" and not re.fullmatch(r"-\d+(\.\d*)?", token)


def _scalar(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def expand(value: Any, macros: Mapping[str, Any], environ: Mapping[str, str], missing: set[str]) -> Any:
    """``${name}`` and ``${env.NAME}`` expanded in every string of ``value`` (macros may hold
    macros); ``${PORT}`` is kept (routerd picks ports) and an unknown macro is kept and recorded."""
    if isinstance(value, list):
        return [expand(item, macros, environ, missing) for item in value]
    if isinstance(value, dict):
        return {key: expand(item, macros, environ, missing) for key, item in value.items()}
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        env, name = match.group(1), match.group(2)
        if env and name in environ:
            return environ[name]
        if not env and name in macros:
            return _scalar(macros[name])
        if name != "PORT" or env:
            missing.add(match.group(0))
        return match.group(0)

    for _ in range(16):  # macros within macros, a bounded number of levels
        expanded = _MACRO.sub(one, value)
        if expanded == value:
            break
        value = expanded
    return value


def _pull_hint(source: str) -> str:
    return (f"{source} is a download, and routerd serves files: `routerctl pull {source}` fetches it into the "
            f"Hugging Face cache, where routerd serves it as {source}")


def _relative(where: str, path: str, skipped: list[str]) -> None:
    if not Path(path).is_absolute() and not path.startswith("~"):
        skipped.append(f"{where}: the model path {path} is relative: routerd reads it relative to the config file's "
                       "folder, not to the folder it was started in")


def _split_command(name: str, tokens: list[str], skipped: list[str]) -> dict[str, Any] | None:
    """A llama-server argv as [models.NAME] keys (path, args), or None (said in ``skipped``)."""
    path, source, args, i = "", "", [], 0
    while i < len(tokens):
        token = tokens[i]
        if not _is_flag(token):
            skipped.append(f"models.{name}: {token!r} in cmd follows no flag (left out)")
            i += 1
            continue
        joined = token.startswith("--") and "=" in token
        takes = not joined and i + 1 < len(tokens) and not _is_flag(tokens[i + 1])
        value = token.split("=", 1)[1] if joined else tokens[i + 1] if takes else ""
        flag = llama_args.canonical(token)
        if flag == "--model":
            path = value
        elif flag in _REMOTE_SOURCES:
            source = value
        elif flag in ("--api-key", "--api-key-file"):
            skipped.append(f"models.{name}: {flag} (routerd gives each llama-server a key of its own; clients use "
                           "routerd's keys, made with `routerctl keys add NAME`)")
        elif flag == "--models-dir":
            skipped.append(f"models.{name}: --models-dir {value} (routerd's catalog.folders serves a folder's models)")
        elif flag not in llama_args.MANAGED_FLAGS and flag not in _SOURCE_EXTRAS:
            args += tokens[i:i + 2] if takes else [token]
        i += 2 if takes else 1
    if not path:
        skipped.append(f"models.{name}: not converted: {_pull_hint(source) if source else 'no -m/--model'}")
        return None
    _relative(f"models.{name}", path, skipped)
    return {"path": path, "args": args}


def _command_model(name: str, cmd: str, skipped: list[str]) -> dict[str, Any] | None:
    tokens = shlex.split(cmd.replace("\\\n", " "), comments=True)
    if not tokens:
        skipped.append(f"models.{name}: not converted: its cmd is empty")
        return None
    binary = tokens[0]
    if not PurePosixPath(binary).name.startswith("llama-server"):
        inside = [tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i] in ("-m", "--model")]
        where = f"; to run its model here, add [models.{name}] with this host's path of {inside[0]}" if inside else ""
        skipped.append(f"models.{name}: not converted: its cmd runs {binary}, not llama-server; routerd runs "
                       f"llama-server builds only (models.NAME.binary names one){where}")
        return None
    model = _split_command(name, tokens[1:], skipped)
    if model is not None and "/" in binary:
        model["binary"] = binary  # a build or fork of its own (models.NAME.binary)
    return model


def _env_without_secrets(name: str, env: Any, skipped: list[str]) -> Any:
    """A model's ``env`` without the entries that take a value from the environment
    (``${env.X}``): expanding them would print what may be a secret (HF_TOKEN...) into the TOML."""
    def secret(text: str) -> bool:
        if "${env." in text:
            skipped.append(f"models.{name}.env: {text.split('=')[0]} takes its value from the environment: not "
                           f"copied; set it in [models.{name}.env] yourself")
            return True
        return False
    if isinstance(env, dict):
        return {k: v for k, v in env.items() if not secret(f"{k}={v}")}
    if isinstance(env, list):
        return [item for item in env if not secret(str(item))]
    return env


def _env_list(name: str, env: Any, skipped: list[str]) -> dict[str, str]:
    if isinstance(env, dict):
        return {str(k): _scalar(v) for k, v in env.items()}
    pairs: dict[str, str] = {}
    for item in env or []:
        key, sep, value = str(item).partition("=")
        if sep and key:
            pairs[key] = value
        else:
            skipped.append(f"models.{name}.env: {item!r} is not NAME=value")
    return pairs


def _filters(name: str, filters: dict[str, Any], model: dict[str, Any], skipped: list[str]) -> None:
    """llama-swap's filters as routerd's request rewriting: setParams always set (override),
    stripParams removed (strip)."""
    override, strip = filters.get("setParams") or {}, filters.get("stripParams") or ""
    if isinstance(override, dict) and override:
        if "model" in override:
            skipped.append(f"models.{name}.filters.setParams.model: routerd does not rewrite the model a request "
                           "names")
        model["override"] = {str(k): v for k, v in override.items() if k != "model"} or None
    fields = [p.strip() for p in str(strip).split(",") if p.strip() and p.strip() != "model"]
    if fields:
        model["strip"] = fields
    if model.get("override") is None:
        model.pop("override", None)
    for key in filters:
        if key not in ("setParams", "stripParams"):
            skipped.append(f"models.{name}.filters.{key}: no routerd equivalent (one set of rewrites per model)")


def _groups(groups: Mapping[str, Any], models: Mapping[str, Any], skipped: list[str]) -> dict[str, str]:
    """llama-swap groups as each member's routerd group (only exclusive, non-persistent ones map)."""
    member_group: dict[str, str] = {}
    for group, spec in groups.items():
        spec = spec or {}
        members = [str(m) for m in spec.get("members") or []]
        skipped += [f"groups.{group}: member {m!r} is not a model here" for m in members if m not in models]
        swap, exclusive = spec.get("swap", True), spec.get("exclusive", True)
        if exclusive and not spec.get("persistent", False):
            member_group.update((m, str(group)) for m in members)
            if swap:
                skipped.append(f"groups.{group}: swap = true (one member at a time) is not what a routerd group "
                               f"does: its members get group = \"{group}\", which stops other groups' models when "
                               "one starts, but they may run together when memory allows "
                               "(backend.max_loaded_models = 1 keeps to one model at a time)")
        else:
            skipped.append(f"groups.{group}: {'persistent' if spec.get('persistent') else 'exclusive = false'}: its "
                           "members stay ungrouped (routerd's groups neither stop ungrouped models nor are stopped "
                           f"by them){'; one member at a time is left to the memory budget' if swap else ''}")
    return member_group


def _swap_settings(data: Mapping[str, Any], skipped: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """llama-swap's top-level settings as routerd's [backend] and [scheduler]."""
    backend: dict[str, Any] = {"idle_ttl": float(data.get("globalTTL") or 0)}  # llama-swap: never unload
    scheduler: dict[str, Any] = {}
    for key, value in data.items():
        if key == "healthCheckTimeout":
            backend["ready_timeout"] = float(value)
        elif key == "unloadTimeout":
            backend["stop_grace"] = float(value)
        elif key == "sendLoadingState":
            scheduler["loading_feedback"] = bool(value)
        elif key == "hooks":
            preload = ((value or {}).get("on_startup") or {}).get("preload") or []
            scheduler.update({"preload": [str(m) for m in preload]} if preload else {})
        elif key == "logLevel":
            level = {"warn": "WARNING"}.get(str(value), str(value).upper())
            skipped.append(f"logLevel: not a config key in routerd: run `routerd serve --log-level {level}`")
        elif key not in ("models", "macros", "groups", "peers", "globalTTL") and value not in (None, "", 0, [], {}):
            skipped.append(f"{key}: {_TOP_REASONS.get(key, 'no routerd equivalent')}")
    return backend, scheduler


def _swap_model(name: str, spec: Mapping[str, Any], conv: Conversion) -> dict[str, Any] | None:
    """One llama-swap model (macros expanded) as [models.NAME], or None (said in conv.skipped)."""
    skipped = conv.skipped
    model = _command_model(name, str(spec.get("cmd") or ""), skipped)
    if model is None:
        return None
    aliases = [str(a.get("id") if isinstance(a, dict) else a) for a in spec.get("aliases") or []]
    model.update({"aliases": aliases} if aliases else {})
    ttl = spec.get("ttl")
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl >= 0:  # -1: the global TTL
        model["idle_ttl"] = float(ttl)
    if isinstance(spec.get("sendLoadingState"), bool):
        model["loading_feedback"] = spec["sendLoadingState"]
    _filters(name, spec.get("filters") or {}, model, skipped)
    proxy = str(spec.get("proxy") or "")
    if proxy and not any(f"//{host}" in proxy for host in _LOCAL_HOSTS):
        skipped.append(f"models.{name}.proxy: {proxy} is not this host; routerd relays to its own "
                       "llama-servers, or to another server as a [remotes.NAME]")
    for key, value in spec.items():
        if key in _MODEL_REASONS and value not in (None, "", 0, False, [], {}, "/health"):
            skipped.append(f"models.{name}.{key}: {_MODEL_REASONS[key]}")
    env = _env_list(name, spec.get("env"), skipped)
    return {**model, **({"env": env} if env else {})}


def _swap_peer(name: str, peer: Mapping[str, Any], url: str, skipped: list[str]) -> tuple[str, dict[str, Any]]:
    """A llama-swap peer as (its name, [remotes.NAME]); its key stays out: an env var is named for it."""
    remote_name = str(name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", remote_name):
        remote_name = re.sub(r"[^A-Za-z0-9_.-]", "-", remote_name).lstrip("_.-") or "peer"
        skipped.append(f"peers.{name}: renamed {remote_name} (a remote's name prefixes its models)")
    remote: dict[str, Any] = {"url": url.rstrip("/")}
    if key := str(peer.get("apiKey") or ""):
        env_key = re.fullmatch(r"\$\{env\.([A-Za-z0-9_]+)\}", key)
        remote["api_key_env"] = env_key.group(1) if env_key else re.sub(r"\W", "_", remote_name).upper() + "_API_KEY"
        if not env_key:
            skipped.append(f"peers.{name}.apiKey: not copied: set {remote['api_key_env']} to it in "
                           "routerd's environment (/etc/routerd/env for the service)")
    listed = [str(m) for m in peer.get("models") or []]
    if any(re.match(r"(add|remove)\s", m) for m in listed):
        skipped.append(f"peers.{name}.models: add/remove rules: routerd discovers the remote's whole list")
    elif listed:
        remote["models"] = listed
    skipped += [f"peers.{name}.{k}: no routerd equivalent for a remote" for k in peer
                if k not in ("proxy", "apiKey", "models")]
    return remote_name, remote


def convert_llama_swap(data: Mapping[str, Any], environ: Mapping[str, str]) -> Conversion:
    """A parsed llama-swap config.yaml as routerd config data."""
    conv = Conversion("llama-swap config", {})
    skipped, top_macros = conv.skipped, dict(data.get("macros") or {})
    backend, scheduler = _swap_settings(data, skipped)
    models_in = dict(data.get("models") or {})
    member_group = _groups(data.get("groups") or {}, models_in, skipped)
    models: dict[str, Any] = {}
    for name, raw in models_in.items():
        raw, missing = raw or {}, set[str]()
        macros = {**top_macros, **(raw.get("macros") or {}), "MODEL_ID": name}
        raw = {**raw, "env": _env_without_secrets(name, raw.get("env"), skipped)}
        spec = expand({k: v for k, v in raw.items() if k != "macros"}, macros, environ, missing)
        skipped += [f"models.{name}: {m} is not defined (left as written)" for m in sorted(missing)]
        model = _swap_model(name, spec, conv)
        if model is not None:
            models[name] = {**model, **({"group": member_group[name]} if name in member_group else {})}
    remotes: dict[str, Any] = {}
    for name, peer in (data.get("peers") or {}).items():
        url = str(expand((peer or {}).get("proxy", ""), top_macros, environ, set()))
        remote_name, remote = _swap_peer(name, peer or {}, url, skipped)
        remotes[remote_name] = remote
    if sum(1 for m in models if m not in member_group) > 1:
        skipped.append("swapping: llama-swap runs one model at a time outside groups; routerd runs as many as fit "
                       "the memory budget (backend.max_loaded_models = 1 keeps to one)")
    conv.config = {k: v for k, v in (("backend", backend), ("scheduler", scheduler), ("models", models),
                                     ("remotes", remotes)) if v}
    return conv


def _preset_section(where: str, items: Mapping[str, str], skipped: list[str]) -> tuple[list[str], dict[str, str],
                                                                                           dict[str, str], list[str]]:
    """One preset section: (args, env, the preset-only options and model/hf keys, flags set to false)."""
    args: list[str] = []
    env: dict[str, str] = {}
    special: dict[str, str] = {}
    off: list[str] = []
    for key, value in items.items():
        flag = ("-" if key in _SHORT_KEYS else "--") + key
        name = llama_args.canonical(flag)
        if key.startswith("LLAMA_ARG_"):
            env[key] = value
        elif key in _PRESET_ONLY or name == "--model" or name in _REMOTE_SOURCES:
            special[key if key in _PRESET_ONLY else name] = value
        elif name in llama_args.MANAGED_FLAGS or name in _SOURCE_EXTRAS or key.startswith("api-key"):
            skipped.append(f"{where}.{key}: set by routerd itself" + (" (clients use routerd's keys: "
                           "`routerctl keys add NAME`)" if key.startswith("api-key") else ""))
        elif value.lower() == "false":
            off.append(name)
        else:
            args += [flag] if value.lower() == "true" else [flag, value]
    return args, env, special, off


def convert_preset(text: str) -> Conversion:
    """A llama.cpp router-mode preset file (``--models-preset``) as routerd config data."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\x00defaults")
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case (LLAMA_ARG_*)
    try:
        parser.read_string("[\x00top]\n" + text)  # keys before the first section (version = 1)
    except configparser.ParsingError as exc:
        lines = "; ".join(f"line {number - 1}: {ast.literal_eval(line).strip()!r}" for number, line in exc.errors[:3])
        raise ConvertError(f"not a llama.cpp preset (INI) file: {lines}") from None
    except configparser.Error as exc:
        raise ConvertError(f"not a llama.cpp preset (INI) file: {exc.message}") from None
    if len(parser.sections()) < 2:
        raise ConvertError("no [model] sections: not a llama.cpp preset file")
    conv = Conversion("llama.cpp preset", {})
    skipped, models, preload = conv.skipped, {}, []
    skipped += [f"{key}: no routerd equivalent" for key in parser["\x00top"] if key != "version"]
    backend: dict[str, Any] = {}
    global_args, global_env, global_special, _ = _preset_section("[*]", parser["*"] if "*" in parser else {}, skipped)
    if global_args or global_env:
        backend.update({"args": global_args} if global_args else {}, **({"env": global_env} if global_env else {}))
    if "stop-timeout" in global_special:
        backend["stop_grace"] = float(global_special.pop("stop-timeout"))
    if global_special.pop("dedup-cache-models", None) is not None:
        skipped.append("[*].dedup-cache-models: routerd lists each cached model once, as org/repo:QUANT")
    for section in parser.sections():
        if section in ("\x00top", "*"):
            continue
        where = f"[{section}]"
        args, env, special, off = _preset_section(where, parser[section], skipped)
        special = {**global_special, **special}
        path = special.pop("--model", "")
        source = next((special[k] for k in special if k in _REMOTE_SOURCES), "")
        if not path:
            why = _pull_hint(source) if source else ("no model = PATH (settings for a model found elsewhere: "
                                                     "routerd serves the Hugging Face cache as org/repo:QUANT, "
                                                     "with backend.args)")
            skipped.append(f"{where}: not converted: {why}")
            continue
        _relative(where, path, skipped)
        skipped += [f"{where}.{flag[2:]} = false: cannot turn off [*]'s flag for one model in routerd"
                    for flag in off if llama_args.has_flag(llama_args.parse_args(global_args or []), flag)]
        if str(special.get("load-on-startup", "")).lower() == "true":
            preload.append(section)
        skipped += [f"{where}.{key}: no routerd equivalent per model" for key in special
                    if key in ("stop-timeout", "dedup-cache-models")]
        models[section] = {"path": path, **({"args": args} if args else {}), **({"env": env} if env else {})}
    if not models:
        skipped.append("no model has a local file (model = PATH)")
    scheduler = {"preload": preload} if preload else {}
    conv.config = {k: v for k, v in (("backend", backend), ("scheduler", scheduler), ("models", models)) if v}
    return conv


def render(conv: Conversion, source: str) -> str:
    """The conversion as routerd TOML: data by tomli_w, the notes as comments."""
    out = [f"# routerd config converted by `routerd convert` from the {conv.kind} {source}.\n"
           "# Check it with: routerd check-config PATH\n"]
    for section, data in conv.config.items():
        if section != "models":
            out.append(tomli_w.dumps({section: data}))
            continue
        for name, model in data.items():
            out.append(tomli_w.dumps({"models": {name: {k: v for k, v in model.items() if k != "env"}}}))
            if "env" in model:
                out.append(tomli_w.dumps({"models": {name: {"env": model["env"]}}}))
    if conv.skipped:
        out.append("# Not converted:\n" + "".join(f"# - {line}\n" for line in conv.skipped))
    return "\n".join(out)


def load(path: str, environ: Mapping[str, str]) -> Conversion:
    """Read FILE and convert it, detecting the format by extension, then content."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    suffix = Path(path).suffix.lower()
    if suffix != ".ini":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            if suffix in (".yaml", ".yml"):
                mark = getattr(exc, "problem_mark", None)
                where = f" (line {mark.line + 1}: {getattr(exc, 'problem', '')})" if mark else ""
                raise ConvertError(f"not valid YAML{where}") from None
            data = None
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            return convert_llama_swap(data, environ)
        if suffix in (".yaml", ".yml"):
            raise ConvertError("a YAML file without a models: map of name -> {cmd: ...}: not a llama-swap config")
    return convert_preset(text)


def main(path: str, environ: Mapping[str, str] = os.environ, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        conv = load(path, environ)
    except ConvertError as exc:
        print(f"routerd convert: {path}: {exc}. routerd convert reads a llama-swap config.yaml (a models: map) "
              "or a llama.cpp --models-preset .ini file ([model] sections)", file=err)
        return 2
    text = render(conv, path)
    out.write(text)
    if conv.skipped:
        print("routerd convert: not converted (also listed at the end of the output):", file=err)
        print("".join(f"  - {line}\n" for line in conv.skipped), end="", file=err)
    try:
        config_mod.from_mapping(tomllib.loads(text), base=Path(path).resolve().parent)
    except ConfigError as exc:  # e.g. a binary of another host: said, the conversion still printed
        print("routerd convert: as it is, check-config would refuse it:\n  " + "\n  ".join(exc.errors), file=err)
    return 0
