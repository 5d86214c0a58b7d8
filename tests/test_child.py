"""The no-orphan guarantees of routerd.backends.child: what the spawned process is (its pid, group,
environment and death signal), the guard against a parent that died before the signal was armed,
and children that outlive routerd's worker threads (the classic PR_SET_PDEATHSIG trap)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from routerd.backends.child import death_bound_argv, resolve_program, spawn
from tests.conftest import make_config, pids_alive

#: Prints what the child sees of itself: pid, process group, parent-death signal, environment.
REPORT = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
sig = ctypes.c_int()
libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
print(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "pdeathsig": sig.value, "env": dict(os.environ)}))
"""


async def test_spawned_child_is_the_program_in_its_own_group_with_exactly_its_env_and_death_signal() -> None:
    env = {"PATH": os.environ["PATH"], "ONLY_THIS": "1"}
    async with spawn([sys.executable, "-c", REPORT], env=env, stop_grace=1.0) as child:
        output = b""
        with trio.fail_after(10):
            while chunk := await child.output.receive_some():
                output += chunk
        assert await child.wait() == 0
    seen = json.loads(output)
    assert seen["pid"] == child.pid  # setpriv and the guard exec in place: the pid is the program's
    assert seen["pgid"] == child.pid
    assert seen["pdeathsig"] == signal.SIGKILL
    python_adds = {"LC_CTYPE"}  # Python's C locale coercion may add it; nothing else may appear
    assert {k: v for k, v in seen["env"].items() if k not in python_adds} == env


def test_guard_runs_nothing_when_the_parent_is_not_the_one_that_spawned(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = ["/usr/bin/touch", str(marker)]
    setpriv = "/usr/bin/setpriv"
    wrong_parent = death_bound_argv(argv, parent_pid=1, env={}, setpriv=setpriv)
    assert subprocess.run(wrong_parent, env={}).returncode != 0
    assert not marker.exists()
    right_parent = death_bound_argv(argv, parent_pid=os.getpid(), env={}, setpriv=setpriv)
    assert subprocess.run(right_parent, env={}).returncode == 0
    assert marker.exists()


def test_guard_keeps_the_environment_exact_including_pwd(tmp_path: Path) -> None:
    for env in ({}, {"PWD": "/somewhere/else", "A": "b"}):
        argv = death_bound_argv(["/usr/bin/env"], parent_pid=os.getpid(), env=env, setpriv="/usr/bin/setpriv")
        out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path).stdout
        assert dict(line.split("=", 1) for line in out.splitlines()) == env


def test_missing_or_unrunnable_program_fails_the_spawn_not_the_child(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_program(str(tmp_path / "missing"), {})
    with pytest.raises(FileNotFoundError):
        resolve_program("no-such-program-here", {"PATH": str(tmp_path)})
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(PermissionError):
        resolve_program(str(plain), {})
    assert resolve_program("env", {"PATH": "/usr/bin"}) == "/usr/bin/env"


async def test_spawn_refuses_a_worker_thread() -> None:
    with pytest.raises(RuntimeError, match="main thread"):
        await trio.to_thread.run_sync(lambda: spawn(["/bin/true"], env={}, stop_grace=1.0))


async def test_backends_outlive_routerds_worker_threads(start_routerd: Any, tmp_path: Path, model_file: Any) -> None:
    """PR_SET_PDEATHSIG fires when the *thread* that forked exits; trio retires idle worker
    threads after 10 s. A child spawned from one died then: routerd must spawn from a thread that
    lives as long as it does, so a backend stays up while worker threads come and go."""
    routerd = await start_routerd(make_config(tmp_path, {"m": {"path": model_file("m")}}))
    response = await routerd.http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert response.status_code == 200
    (pid,) = [status.pid for status in routerd.supervisor.status() if status.pid]
    # Threads come and go around the spawn: several at once so that new ones are started...
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(trio.to_thread.run_sync, time.sleep, 0.2)
    # ...and then all retire (trio's idle worker threads exit after 10 s).
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        assert pids_alive([pid]) == [pid], "the backend died with a worker thread"
        await trio.sleep(0.5)
    response = await routerd.http.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert response.status_code == 200
