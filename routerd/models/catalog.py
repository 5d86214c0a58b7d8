"""The model catalog: every model routerd can serve, by name and alias.

Owns model entries (name, aliases, file, args, group, source, state) built from the config, the
imported models (persisted in routerd's state directory) and what discovery found, and name
resolution, including the "did you mean" list for unknown names. It must not start processes;
the supervisor turns entries into backends. It never writes the user's config file.

States: models from the config and imported ones are ``manual`` (never dropped; unavailable
while their file is missing); discovered ones are ``auto`` (gone when their file goes, back
when it returns). A remote's models are entries too (``NAME/MODEL``, source ``remote:NAME``, and
the bare name as an alias when nothing else claims it): they have no file.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import attrs

from routerd import statefile
from routerd.config import Config
from routerd.errors import NotWritable, UnknownModel
from routerd.models.discovery import Found, resolve_collisions
from routerd.models.gguf_meta import GGUFError, read_meta
from routerd.rewriting import Rewrite

log = logging.getLogger("routerd.catalog")
MANUAL_SOURCES = ("config", "import")


@attrs.frozen
class ModelEntry:
    name: str
    path: str
    aliases: tuple[str, ...] = ()
    group: str = ""
    idle_ttl: float = 0.0
    args: tuple[str, ...] = ()
    #: "config", "import", "folder" or "hf-cache".
    source: str = "config"
    #: Multimodal projector files passed as --mmproj.
    mmproj: tuple[str, ...] = ()
    #: Its own llama-server binary (the config's models.NAME.binary); empty: backend.binary.
    binary: str = ""
    #: Never stopped for room or idleness (models.NAME.keep_loaded), and its eviction priority.
    keep_loaded: bool = False
    priority: int = 0
    #: Fields set, forced or removed on every request for it (models.NAME.defaults/override/strip).
    rewrite: Rewrite | None = None
    #: Environment variables its llama-server gets (the config's models.NAME.env).
    env: tuple[tuple[str, str], ...] = ()
    #: Local replicas kept running once in use, and the most there may be ("auto" scales between).
    replicas: int = 1
    max_replicas: int = 1
    #: Remote endpoints serving it too: (remote, the model's name there).
    remotes: tuple[tuple[str, str], ...] = ()
    #: A remote's model: served only there, by this name there (source ``remote:NAME``).
    remote: str = ""
    remote_model: str = ""

    @property
    def state(self) -> str:
        """``manual`` (config, imported) or ``auto`` (discovered)."""
        return "manual" if self.source in MANUAL_SOURCES else "auto"

    @property
    def available(self) -> bool:
        return bool(self.remote) or os.path.exists(self.path)

    def metadata_dict(self) -> dict[str, object] | None:
        """Header facts for display (architecture, size, quantization, context), if readable.
        Reads the file each call; ``Catalog.metadata`` keeps the result."""
        if self.remote:
            return None
        try:
            return read_meta(self.path).public()
        except (OSError, GGUFError):
            return None


@attrs.frozen
class CatalogDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()


class Catalog:
    """An immutable view of the servable models; replaced whole on reload or rescan."""

    def __init__(self, entries: Iterable[ModelEntry] = (), problems: Sequence[str] = ()) -> None:
        #: What discovery could not read (corrupted cache repos), each naming where and why.
        self.problems = tuple(problems)
        self._entries: dict[str, ModelEntry] = {}
        self._names: dict[str, str] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            self._entries[entry.name] = entry
            self._names[entry.name] = entry.name
        for entry in self._entries.values():
            for alias in entry.aliases:
                self._names.setdefault(alias, entry.name)
        self._metadata: dict[str, dict[str, object] | None] = {}

    def metadata(self, entry: ModelEntry) -> dict[str, object] | None:
        """``entry.metadata_dict()``, read once per catalog (a rescan builds a new one)."""
        if entry.name not in self._metadata:
            self._metadata[entry.name] = entry.metadata_dict()
        return self._metadata[entry.name]

    @classmethod
    def from_config(cls, config: Config, imported: Sequence[Found] = (), discovered: Sequence[Found] = (),
                    problems: Sequence[str] = (), remote_models: Mapping[str, Sequence[str]] | None = None,
                    ) -> Catalog:
        """Config models first; then imported, then discovered ones whose names are still free;
        then each remote's models (``remote_models``: remote name -> its models)."""
        entries = []
        for name, model in config.models.items():
            keep, most = model.replica_policy()
            remotes = tuple((r.split("/", 1)[0], r.split("/", 1)[1] if "/" in r else name) for r in model.remotes)
            entries.append(ModelEntry(name=name, path=model.path, aliases=tuple(model.aliases), group=model.group,
                                      idle_ttl=config.idle_ttl(name), args=tuple(model.args),
                                      env=tuple(sorted(model.env.items())), replicas=keep, max_replicas=most,
                                      remotes=remotes, binary=model.binary, keep_loaded=model.keep_loaded,
                                      priority=model.priority,
                                      rewrite=Rewrite.of(model.defaults, model.override, model.strip)))
        taken = [name for entry in entries for name in (entry.name, *entry.aliases)]
        folders = [f for f in discovered if f.source == "folder"]
        cached = [f for f in discovered if f.source != "folder"]
        for found in resolve_collisions([imported, folders, cached], taken):
            entries.append(ModelEntry(name=found.name, path=found.path, aliases=found.aliases,
                                      idle_ttl=config.backend.idle_ttl, source=found.source, mmproj=found.mmproj))
        entries += remote_entries(config, remote_models or {},
                                  {name for entry in entries for name in (entry.name, *entry.aliases)})
        return cls(entries, problems)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def get(self, name: str) -> ModelEntry | None:
        canonical = self._names.get(name)
        return self._entries[canonical] if canonical else None

    def resolve(self, name: str) -> ModelEntry:
        """The entry for a name or alias; UnknownModel listing the closest names otherwise."""
        entry = self.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(self._names), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = "" if close else f"; known models: {', '.join(sorted(self._entries)) or 'none'}"
            raise UnknownModel(f"model {name!r} not found{hint}{known}", data={"closest": close})
        return entry

    def names_and_aliases(self) -> list[tuple[str, ModelEntry]]:
        return [(name, self._entries[canonical]) for name, canonical in self._names.items()]

    def diff(self, new: Catalog) -> CatalogDiff:
        return CatalogDiff(
            added=tuple(sorted(set(new._entries) - set(self._entries))),
            removed=tuple(sorted(set(self._entries) - set(new._entries))),
            changed=tuple(sorted(n for n in set(self._entries) & set(new._entries)
                                 if self._entries[n] != new._entries[n])),
        )


def remote_entries(config: Config, remote_models: Mapping[str, Sequence[str]], taken: set[str],
                   ) -> list[ModelEntry]:
    """A remote's models as entries ``REMOTE/MODEL`` (pure); the bare ``MODEL`` is an alias
    when no local model, selector or other remote claims it (as llama-swap's peers do)."""
    claims: dict[str, int] = {}
    for models in remote_models.values():
        for model in set(models):
            claims[model] = claims.get(model, 0) + 1
    entries = []
    for remote, models in remote_models.items():
        if remote not in config.remotes:
            continue
        for model in models:
            name = f"{remote}/{model}"
            if name in taken:
                continue
            bare = model not in taken and model not in config.selectors and claims[model] == 1
            entries.append(ModelEntry(name=name, path=config.remotes[remote].url, aliases=(model,) if bare else (),
                                      source=f"remote:{remote}", remote=remote, remote_model=model))
    return entries


class ImportStore:
    """The imported models, kept in ``catalog.toml`` in routerd's state directory."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "catalog.toml")

    def load(self) -> list[Found]:
        try:
            with open(self.path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return []
        except (OSError, tomllib.TOMLDecodeError) as exc:
            log.error("cannot read %s (imported models are not served until it is fixed): %s", self.path, exc)
            return []
        return [Found(name=item["name"], path=item["path"], source="import", mmproj=tuple(item.get("mmproj", ())))
                for item in data.get("imported", [])]

    def check_writable(self) -> None:
        """NotWritable unless imports can be saved (checked at startup, not at the first import)."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise NotWritable(f"the state directory {directory} is not writable: {exc.strerror}; fix its owner "
                              "or permissions, or point STATE_DIRECTORY (or XDG_STATE_HOME) elsewhere") from None

    def save(self, imported: Sequence[Found]) -> None:
        """Write atomically (a crash mid-write keeps the old file)."""
        data = {"imported": [{"name": f.name, "path": f.path, "mmproj": list(f.mmproj)} for f in imported]}
        statefile.write_toml(self.path, data, header="Models imported with `routerctl import`; managed by routerd.")
