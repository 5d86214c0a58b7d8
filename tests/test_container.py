"""The container image, built and run: `make image`'s script, then the image serving the demo
models through a published port, routerctl from the host and inside it, `podman stop`, and a
restart that keeps the state volume. Skipped, saying why, where no container runtime can start
a container."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT, needs_real_llama
from tests.test_real_llama import MODELS

pytestmark = [pytest.mark.real, needs_real_llama]
RUNTIME = shutil.which("podman") or shutil.which("docker")
IMAGE = "localhost/routerd:test"
BASE = "localhost/debian:bookworm"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "packaging" / "container" / "containers.conf")}


def runtime(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert RUNTIME is not None
    done = subprocess.run([RUNTIME, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{RUNTIME} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def image() -> str:
    if RUNTIME is None:
        pytest.skip("no container runtime: install podman (Debian: apt install podman runc debootstrap; "
                    ".ci/run does) or docker")
    base = subprocess.run([str(ROOT / "packaging" / "container" / "base.sh"), RUNTIME], capture_output=True,
                          text=True, env=ENV, timeout=600)
    if base.returncode != 0:
        pytest.skip(f"no base image could be made here: {base.stderr.strip()[-500:]}")
    probe = runtime("run", "--rm", BASE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"{RUNTIME} cannot start a container on this machine: {probe.stderr.strip()[-500:]}")
    build = subprocess.run([str(ROOT / "packaging" / "container" / "image.sh")], cwd=ROOT, capture_output=True,
                           text=True, timeout=1500,
                           env={**ENV, "IMAGE": IMAGE, "PYTHON": str(ROOT / ".venv" / "bin" / "python")})
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    return IMAGE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"routerd in the container did not answer {url}/health")


def routerd_processes() -> list[str]:
    """Host processes started from the image's venv (routerd, its llama-servers)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "/opt/routerd/" in cmdline:
                found.append(cmdline)
    return found


def test_the_image_serves_the_demo_models_stops_cleanly_and_keeps_its_state(image, tmp_path):
    name = f"routerd-test-{uuid.uuid4().hex[:8]}"
    state = f"{name}-state"
    models, imports, run_dir = tmp_path / "models", tmp_path / "imports", tmp_path / "run"
    for folder in (models, imports, run_dir):
        folder.mkdir()
    place(MODELS["smollm2-135m"], models / "smollm2.gguf")
    place(MODELS["gemma3-270m"], imports / "gemma3.gguf")
    os.chown(run_dir, 990, 990)  # the image's routerd user makes its control socket here
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        # It listens beyond loopback inside the container: it needs a key before it starts.
        refused = runtime("run", "--rm", "-v", f"{state}:/var/lib/routerd", image, check=False, timeout=60)
        assert refused.returncode == 78 and "key" in refused.stderr
        key = runtime("run", "--rm", "-v", f"{state}:/var/lib/routerd", image, "add-key", "ci",
                      "--admin").stdout.strip()
        assert key.startswith("rk-")

        runtime("run", "-d", "--name", name, "-p", f"{port}:8082", "-v", f"{models}:/models:ro",
                "-v", f"{imports}:/imports:ro", "-v", f"{state}:/var/lib/routerd", "-v", f"{run_dir}:/run/routerd",
                image)
        wait_healthy(url)
        assert runtime("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK

        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4)
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0

        # routerctl from the host, through the runtime directory's volume, and inside the container.
        host = subprocess.run([str(ROOT / ".venv" / "bin" / "routerctl"), "--socket", str(run_dir / "control.sock"),
                               "--json", "status"], capture_output=True, text=True, timeout=30)
        assert host.returncode == 0, host.stderr
        status = json.loads(host.stdout)
        assert {m["name"]: m["state"] for m in status["models"]} == {"smollm2": "ready"}
        assert runtime("exec", name, "routerctl", "ping").stdout.strip() == "pong"
        imported = runtime("exec", name, "routerctl", "--json", "import", "/imports/gemma3.gguf")
        assert json.loads(imported.stdout)["added"] == ["gemma3"]

        # podman stop: SIGTERM, a drain, every llama-server stopped, exit 0, nothing left.
        assert any("llama-server" in p for p in routerd_processes())
        runtime("stop", name, timeout=60)
        assert runtime("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        assert routerd_processes() == []
        logs = runtime("logs", name).stderr + runtime("logs", name).stdout
        assert "routerd stopped" in logs and "smollm2 stopped (shutdown), exit status 0" in logs

        # A restart keeps the state volume: the key and the imported model are still there.
        runtime("start", name)
        wait_healthy(url)
        listed = json.loads(runtime("exec", name, "routerctl", "--json", "models").stdout)["models"]
        assert {m["name"]: m["source"] for m in listed} == {"gemma3": "import", "smollm2": "folder"}
        second = httpx.post(url + "/v1/completions", json={"model": "gemma3", "prompt": "Hi", "max_tokens": 2},
                            headers={"Authorization": f"Bearer {key}"}, timeout=120, trust_env=False)
        assert second.status_code == 200, second.text
        runtime("stop", name, timeout=60)
        assert runtime("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        assert routerd_processes() == []
    finally:
        runtime("rm", "-f", name, check=False)
        runtime("volume", "rm", "-f", state, check=False)
