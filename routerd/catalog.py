"""The model catalog: every model routerd can serve, by name and alias.

Owns model entries (name, aliases, file, args, group, source) built from the config, and name
resolution, including the "did you mean" list for unknown names. It must not start processes;
the supervisor turns entries into backends.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator

import attrs

from routerd.config import Config
from routerd.errors import UnknownModel
from routerd.gguf_meta import GGUFError, read_meta


@attrs.frozen
class ModelEntry:
    name: str
    path: str
    aliases: tuple[str, ...] = ()
    group: str = ""
    idle_ttl: float = 0.0
    args: tuple[str, ...] = ()
    #: "config" for models named in the config file.
    source: str = "config"
    #: Multimodal projector files passed as --mmproj.
    mmproj: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return os.path.exists(self.path)

    def metadata_dict(self) -> dict[str, object] | None:
        """Header facts for display (architecture, size, quantization, context), if readable."""
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

    def __init__(self, entries: Iterable[ModelEntry] = ()) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self._names: dict[str, str] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            self._entries[entry.name] = entry
            self._names[entry.name] = entry.name
        for entry in self._entries.values():
            for alias in entry.aliases:
                self._names.setdefault(alias, entry.name)

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        return cls(
            ModelEntry(name=name, path=model.path, aliases=tuple(model.aliases), group=model.group,
                       idle_ttl=config.idle_ttl(name), args=tuple(model.args))
            for name, model in config.models.items()
        )

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
