"""Where routerd keeps things: the control socket, its state and the model cache.

Owns the lookup order for each path, from the environment systemd gives a service
(``RUNTIME_DIRECTORY``, ``STATE_DIRECTORY``, ``CACHE_DIRECTORY``) down to per-user defaults.
Pure functions of an environment mapping; it must not create anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: Where the packaged service's socket is (RuntimeDirectory=routerd); routerctl tries it last.
SYSTEM_SOCKET = "/run/routerd/control.sock"


def _first(value: str) -> str:
    """systemd joins several directories with ':'; routerd uses the first."""
    return value.split(":")[0]


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """$ROUTERD_SOCKET, $RUNTIME_DIRECTORY/control.sock, $XDG_RUNTIME_DIR/routerd/control.sock,
    else /tmp/routerd-UID/control.sock."""
    env = os.environ if environ is None else environ
    if env.get("ROUTERD_SOCKET"):
        return env["ROUTERD_SOCKET"]
    if env.get("RUNTIME_DIRECTORY"):
        return os.path.join(_first(env["RUNTIME_DIRECTORY"]), "control.sock")
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "routerd", "control.sock")
    return f"/tmp/routerd-{os.getuid()}/control.sock"


def client_socket_candidates(environ: Mapping[str, str] | None = None) -> list[str]:
    """Sockets routerctl tries in order: the user's own routerd, then the system service's."""
    env = os.environ if environ is None else environ
    if env.get("ROUTERD_SOCKET"):
        return [env["ROUTERD_SOCKET"]]
    own = default_socket_path(env)
    return [own] if own == SYSTEM_SOCKET else [own, SYSTEM_SOCKET]


def state_dir(environ: Mapping[str, str] | None = None) -> str:
    """$STATE_DIRECTORY, $XDG_STATE_HOME/routerd, else ~/.local/state/routerd."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return _first(env["STATE_DIRECTORY"])
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "routerd")


def hub_cache(environ: Mapping[str, str] | None = None) -> str:
    """The Hugging Face hub cache routerd scans and pulls into.

    HF_HUB_CACHE, then HF_HOME/hub (as huggingface_hub finds it); as a service with neither set,
    $CACHE_DIRECTORY/huggingface/hub, since ~/.cache is read-only or absent for a service user.
    """
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return os.path.expanduser(env["HF_HUB_CACHE"])
    if env.get("CACHE_DIRECTORY") and not env.get("HF_HOME"):
        return os.path.join(_first(env["CACHE_DIRECTORY"]), "huggingface", "hub")
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")
