"""Finding models on disk: the Hugging Face hub cache and folders of GGUF files.

Owns the rules that turn a file tree into servable models: split models (``-00001-of-0000N``)
are one model and need every part; a multimodal projector (``mmproj*``) beside a model is paired
with it; projectors, imatrix files and other non-model GGUFs are not models; incomplete downloads
are skipped. Names follow llama.cpp's conventions: ``org/repo:QUANT`` for cached repos (and
``org/repo`` for its default quant), the file stem for folder models. Pure functions of the file
system; it must not start processes or keep state.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from routerd.models.gguf_meta import SPLIT_RE, GGUFError, read_meta, split_parts

log = logging.getLogger("routerd.discovery")

#: Quantization tags as llama.cpp names files; longest first so Q4_K_M wins over Q4_K.
QUANT_TAGS = sorted((
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_K", "Q4_1", "Q4_0", "Q3_K_XL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K_XL", "Q2_K_L", "Q2_K", "Q2_K_S",
    "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0", "MXFP4", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "UD-Q4_K_XL",
), key=len, reverse=True)
#: llama.cpp's choice when no quant is named: Q4_K_M, then Q8_0.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
_NOT_MODELS = ("mmproj", "imatrix")
#: A repo's folder in the hub cache: ``models--org--repo`` (group 2 is ``org--repo``).
_CACHE_FOLDER_RE = re.compile(r"(models|datasets|spaces)--([^/\s`'\"()]+?)(?=[/\s`'\"()]|\.?$)")


@attrs.frozen
class Found:
    """One model found on disk."""

    name: str
    path: str
    source: str  # "hf-cache" or "folder"
    aliases: tuple[str, ...] = ()
    mmproj: tuple[str, ...] = ()


def quant_of(filename: str) -> str | None:
    """The quantization tag in a file name (``...-Q4_K_M.gguf`` -> ``Q4_K_M``), matched like llama.cpp."""
    upper = filename.upper()
    for tag in QUANT_TAGS:
        if re.search(rf"(^|[-._]){re.escape(tag)}[.-]", upper):  # llama.cpp: TAG[.-]
            return tag
    return None


def is_projector(filename: str) -> bool:
    return filename.lower().startswith("mmproj") or "-mmproj" in filename.lower()


def model_files(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split file names in one directory into model entry points and projectors (pure).

    A split model is named by its first part, only when every part is there; other parts,
    imatrix files and partial downloads are dropped.
    """
    present = set(names)
    models, projectors = [], []
    for name in sorted(present):
        lower = name.lower()
        if not lower.endswith(".gguf"):
            continue  # .incomplete, .part, .download and everything that is not GGUF
        if is_projector(name):
            projectors.append(name)
            continue
        if any(word in lower for word in _NOT_MODELS):
            continue
        parts = split_parts(name)
        if name != parts[0]:
            continue
        if not present.issuperset(parts):
            log.warning("skipping %s: not every part of the split model is present", name)
            continue
        models.append(name)
    return models, projectors


def _is_model_file(path: str) -> bool:
    """Readable and a model (not a projector or imatrix by its header); unreadable is not."""
    try:
        kind = read_meta(path).kind
    except (OSError, GGUFError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return False
    return kind in ("", "model")


def stem_of(filename: str) -> str:
    name = SPLIT_RE.sub("", filename)
    return name[:-5] if name.lower().endswith(".gguf") else name


def tag_of(filename: str) -> str:
    """A model file's tag within its repo: its quantization, else its stem."""
    return quant_of(filename) or stem_of(filename)


def by_directory(paths: Iterable[str]) -> dict[str, list[str]]:
    """Relative file paths grouped by directory: {directory: [file names]} (pure)."""
    grouped: dict[str, list[str]] = {}
    for path in paths:
        grouped.setdefault(os.path.dirname(path), []).append(os.path.basename(path))
    return grouped


def _models_in(directory: str, filenames: Iterable[str], only: str | None = None,
               ) -> list[tuple[str, str, tuple[str, ...]]]:
    """(file name, path, paired projector) of each model file in one directory (of ``only``
    alone when given: its header is the only one read)."""
    models, projectors = model_files(filenames)
    if only is not None:
        models = [name for name in models if name == only]
    paired = tuple(os.path.join(directory, p) for p in projectors[:1])
    return [(name, path, paired) for name in models if _is_model_file(path := os.path.join(directory, name))]


def _folder_models(directory: str, filenames: Iterable[str], only: str | None = None) -> list[Found]:
    return [Found(stem_of(name), path, "folder", mmproj=paired)
            for name, path, paired in _models_in(directory, filenames, only)]


def scan_folder(root: str | os.PathLike[str]) -> list[Found]:
    """Every model under ``root`` (recursively), named by file stem, with projectors paired."""
    found: list[Found] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found += _folder_models(directory, filenames)
    return found


def scan_path(path: str | os.PathLike[str]) -> list[Found]:
    """The models at ``path``: a folder (recursively) or one GGUF file (with its split parts)."""
    if os.path.isdir(path):
        return scan_folder(path)
    directory, name = os.path.split(os.path.abspath(path))
    listing = os.listdir(directory) if os.path.isdir(directory) else []
    return _folder_models(directory, listing, only=split_parts(name)[0])


@attrs.frozen
class CacheScan:
    """What a scan of the Hugging Face cache found."""

    found: list[Found]
    #: Repos huggingface_hub reports as corrupted (left out of ``found``): ``org/repo: reason``.
    problems: list[str]


def scan_hf_cache(cache_dir: str | os.PathLike[str] | None = None) -> CacheScan:
    """Every GGUF model in the Hugging Face hub cache, named ``org/repo:QUANT``, and the repos
    that could not be read.

    Uses huggingface_hub's own cache scan on ``cache_dir`` (``paths.hub_cache``: HF_HUB_CACHE,
    HF_HOME as ``hf`` reads them). Of several revisions, the one ``main`` points to wins, else the newest.
    """
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(os.fspath(cache_dir) if cache_dir is not None else None)
    except CacheNotFound:
        return CacheScan([], [])
    found: list[Found] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        if not revisions:
            continue
        snapshot = revisions[0].snapshot_path
        found += repo_models(repo.repo_id, snapshot)
    return CacheScan(found, sorted(cache_problem(str(warning)) for warning in info.warnings))


def cache_problem(message: str) -> str:
    """A corrupted-cache warning as ``org/repo: reason`` (pure): the repo named by its cache
    folder (``models--org--repo``) when the message holds one."""
    match = _CACHE_FOLDER_RE.search(message)
    if match is None:
        return message
    return f"{match.group(2).replace('--', '/')}: {message}"


def repo_models(repo_id: str, snapshot: Path) -> list[Found]:
    """The models of one repo snapshot: ``repo:QUANT`` each, ``repo`` for the default quant."""
    names = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() or p.is_symlink()]
    entries = [(tag_of(name), path, paired)
               for directory, files in sorted(by_directory(names).items())
               for name, path, paired in _models_in(os.path.join(snapshot, directory), files)]
    result = []
    default = choose_quant([tag for tag, _, _ in entries], None)
    for tag, path, paired in entries:
        aliases = (repo_id,) if tag == default else ()
        result.append(Found(f"{repo_id}:{tag}", path, "hf-cache", aliases=aliases, mmproj=paired))
    return result


def choose_quant(tags: Sequence[str], wanted: str | None) -> str | None:
    """llama.cpp's choice of file in a repo: the named tag (case-insensitive), else Q4_K_M, then
    Q8_0, else the first one (pure)."""
    by_upper = {t.upper(): t for t in tags}
    if wanted is not None:
        return by_upper.get(wanted.upper())
    for tag in DEFAULT_QUANTS:
        if tag in by_upper:
            return by_upper[tag]
    return sorted(tags)[0] if tags else None


def resolve_collisions(groups: Sequence[Sequence[Found]], taken: Iterable[str] = ()) -> list[Found]:
    """Merge sources in precedence order (earlier wins); a later name or alias already taken is
    dropped (a model) or removed (an alias), with a warning saying which won."""
    owners: dict[str, str] = {name: "config" for name in taken}
    kept: list[Found] = []
    for group in groups:
        for found in group:
            if found.name in owners:
                log.warning("model name %r from %s (%s) is already taken by %s; keeping that one",
                            found.name, found.source, found.path, owners[found.name])
                continue
            aliases = tuple(a for a in found.aliases if a not in owners)
            owners[found.name] = f"{found.source} ({found.path})"
            for alias in aliases:
                owners[alias] = f"{found.source} ({found.path})"
            kept.append(attrs.evolve(found, aliases=aliases))
    return kept
