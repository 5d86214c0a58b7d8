"""Writing routerd's own state files so that a crash or a full disk never leaves half a file.

Owns the one way state files are written: a temporary file beside the target, flushed to disk,
then renamed over it (readers see the old file or the new one, never a mix). It knows nothing
of what the files hold.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tomli_w


def write_toml(path: str, data: dict[str, Any], *, header: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` as TOML after a ``# header`` comment, atomically, with
    permissions ``mode`` from the first byte written (a secret is never readable by others)."""
    _write(path, f"# {header}\n".encode() + tomli_w.dumps(data).encode(), mode)


def write_json(path: str, data: dict[str, Any], *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically (see ``write_toml``)."""
    _write(path, json.dumps(data, indent=1).encode(), mode)


def _write(path: str, content: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is ignored for a file left from an earlier crash
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.replace(tmp, path)
