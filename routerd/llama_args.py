"""llama-server command lines: parsing, merging and building argv.

Owns the knowledge of llama-server's flags that routerd needs: which spellings mean the same
setting, which flags routerd manages itself, and how per-model args override the defaults.
Pure functions only; it must not spawn anything or read files.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

# Spellings of one setting, canonical name first. Only flags routerd reasons about need to be
# here; any other flag is kept verbatim and compared by its own spelling.
_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("--ctx-size", "-c"),
    ("--n-gpu-layers", "-ngl", "--gpu-layers"),
    ("--parallel", "-np"),
    ("--threads", "-t"),
    ("--batch-size", "-b"),
    ("--ubatch-size", "-ub"),
    ("--flash-attn", "-fa"),
    ("--cache-type-k", "-ctk"),
    ("--cache-type-v", "-ctv"),
    ("--main-gpu", "-mg"),
    ("--split-mode", "-sm"),
    ("--tensor-split", "-ts"),
    ("--device", "-dev"),
    ("--embeddings", "--embedding"),
    ("--mmproj", "-mm"),
    ("--model", "-m"),
    ("--alias", "-a"),
)
CANONICAL: dict[str, str] = {spelling: names[0] for names in _SYNONYMS for spelling in names}

#: Flags routerd sets itself on every backend; a config may not set them.
MANAGED_FLAGS = frozenset({"--model", "--host", "--port", "--alias", "--models-dir", "--hf-repo", "-hf",
                           "--api-key", "--api-key-file"})


@attrs.frozen
class Flag:
    """One flag with its value (None for a switch), spelled canonically."""

    name: str
    value: str | None = None

    def argv(self) -> list[str]:
        return [self.name] if self.value is None else [self.name, self.value]


def canonical(name: str) -> str:
    """The canonical spelling of a flag (``-c`` -> ``--ctx-size``)."""
    if "=" in name and name.startswith("--"):
        name = name.split("=", 1)[0]
    return CANONICAL.get(name, name)


def _is_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    # A negative number is a value (e.g. `--seed -1`), not a flag.
    try:
        float(token)
    except ValueError:
        return True
    return False


def parse_args(args: Sequence[str]) -> list[Flag]:
    """Split a flat argument list into flags.

    A token that follows a flag and is not itself a flag is that flag's value. ``--x=v`` is
    accepted too. Raises ValueError on a bare value with no flag before it.
    """
    flags: list[Flag] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not _is_flag(token):
            raise ValueError(f"{token!r} is not a flag and follows no flag")
        if token.startswith("--") and "=" in token:
            name, value = token.split("=", 1)
            flags.append(Flag(canonical(name), value))
            i += 1
        elif i + 1 < len(args) and not _is_flag(args[i + 1]):
            flags.append(Flag(canonical(token), args[i + 1]))
            i += 2
        else:
            flags.append(Flag(canonical(token), None))
            i += 1
    return flags


def merge_args(defaults: Sequence[str], overrides: Sequence[str]) -> list[Flag]:
    """Defaults with per-model overrides: a flag set in both takes the override's value in the
    default's position; flags only in the overrides are appended in their order."""
    merged = parse_args(defaults)
    positions = {flag.name: i for i, flag in enumerate(merged)}
    for flag in parse_args(overrides):
        if flag.name in positions:
            merged[positions[flag.name]] = flag
        else:
            positions[flag.name] = len(merged)
            merged.append(flag)
    return merged


def managed_flags_in(args: Sequence[str]) -> list[str]:
    """The routerd-managed flags that ``args`` tries to set (for config validation)."""
    return [flag.name for flag in parse_args(args) if flag.name in MANAGED_FLAGS]


def flag_value(flags: Sequence[Flag], name: str) -> str | None:
    """The value of ``name`` (any spelling) in ``flags``, or None when absent or a switch."""
    wanted = canonical(name)
    for flag in flags:
        if flag.name == wanted:
            return flag.value
    return None


def has_flag(flags: Sequence[Flag], name: str) -> bool:
    wanted = canonical(name)
    return any(flag.name == wanted for flag in flags)


def build_argv(
    binary: str,
    flags: Sequence[Flag],
    *,
    model_path: str,
    port: int,
    alias: str | None,
    extra: Sequence[Flag] = (),
) -> list[str]:
    """The full llama-server command line for one backend.

    ``extra`` carries flags routerd derives (e.g. ``--mmproj`` from the catalog); they come after
    the configured flags and never replace them.
    """
    argv = [binary]
    for flag in flags:
        argv += flag.argv()
    configured = {flag.name for flag in flags}
    for flag in extra:
        if flag.name not in configured:
            argv += flag.argv()
    argv += ["--model", model_path, "--host", "127.0.0.1", "--port", str(port)]
    if alias is not None:  # None: a build without --alias
        argv += ["--alias", alias]
    return argv
