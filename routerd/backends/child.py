"""One child process whose life is tied to routerd's.

Owns spawning (in routerd's main thread, own process group, exactly the environment it is given,
stdout and stderr merged into one pipe), waiting for exit without a thread (pidfd), and stopping
the whole process group: SIGTERM, then SIGKILL after a grace period. This module knows nothing
about llama-server.

No Python runs between fork and exec (``preexec_fn`` can deadlock in a process with threads).
The death signal is armed after exec instead, by a short chain that execs in place, so the pid
routerd holds is the program's own from the first instant:

    setpriv --pdeathsig KILL -- /bin/sh -c GUARD routerd-child PARENT_PID PROGRAM ARGS...

util-linux's ``setpriv`` sets ``PR_SET_PDEATHSIG``; the shell guard then checks that routerd is
still the parent (had routerd died before the signal was armed, the child was already handed to
init and would never get it) and execs the program.

Why not ``trio.run_process``: trio spawns from a worker thread, and ``PR_SET_PDEATHSIG`` fires
when the *thread* that forked exits, which killed children after 10 s (see the field notes).
Spawning from the main thread with the death signal set makes the kernel kill the child when
routerd dies, even by ``kill -9``, and never earlier.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType

import trio

#: The shell that runs the guard (POSIX sh; Debian's is dash).
GUARD_SHELL = "/bin/sh"
#: Runs after the death signal is armed: exits unless the parent is still the routerd that
#: spawned it ($1), drops the PWD variable the shell would add (or restores the given one),
#: and execs the program in place.
_GUARD_WITHOUT_PWD = '[ "$PPID" = "$1" ] || exit 1; unset PWD; shift; exec "$@"'
_GUARD_WITH_PWD = '[ "$PPID" = "$1" ] || exit 1; export PWD="$2"; shift 2; exec "$@"'


def _setpriv() -> str:
    found = shutil.which("setpriv") or ("/usr/bin/setpriv" if os.access("/usr/bin/setpriv", os.X_OK) else None)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "setpriv (util-linux) not found: routerd needs it to tie "
                                "children's lives to its own")
    return found


def resolve_program(program: str, env: Mapping[str, str]) -> str:
    """The file exec would run for ``program`` under ``env``'s PATH, as ``subprocess`` resolves it;
    raises the OSError that exec would have (so a missing binary fails the spawn, not the child)."""
    if os.sep in program:
        candidates = [program]
    else:
        candidates = [os.path.join(directory, program) for directory in os.get_exec_path(dict(env))]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    if any(os.path.exists(candidate) for candidate in candidates):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def death_bound_argv(argv: Sequence[str], *, parent_pid: int, env: Mapping[str, str], setpriv: str) -> list[str]:
    """``argv`` prefixed so that it runs with SIGKILL as its parent-death signal, and not at all
    if ``parent_pid`` is no longer its parent once the signal is armed (pure)."""
    if "PWD" in env:
        guard = [_GUARD_WITH_PWD, "routerd-child", str(parent_pid), env["PWD"]]
    else:
        guard = [_GUARD_WITHOUT_PWD, "routerd-child", str(parent_pid)]
    return [setpriv, "--pdeathsig", "KILL", "--", GUARD_SHELL, "-c", *guard, *argv]


class Child:
    """A spawned process; use ``async with`` so it is always stopped and reaped."""

    def __init__(self, popen: subprocess.Popen[bytes], output: trio.lowlevel.FdStream, stop_grace: float) -> None:
        self._popen = popen
        self.output = output
        self.stop_grace = stop_grace
        self._pidfd = os.pidfd_open(popen.pid)
        self._exited = trio.Event()
        self._watching = False

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait until the process exits; returns its exit status (negative: killed by signal).

        Any number of tasks may wait; the first one watches the pidfd, the others its event.
        """
        if self._watching:
            await self._exited.wait()
        elif not self._exited.is_set():
            self._watching = True
            try:
                if self._popen.returncode is None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                    self._popen.wait()
                self._exited.set()
            finally:
                self._watching = False
        assert self._popen.returncode is not None
        return self._popen.returncode

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group, unless it has already been reaped."""
        if self._popen.returncode is None:  # a reaped pgid may belong to someone else
            try:
                os.killpg(self._popen.pid, sig)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float | None = None) -> int:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; returns the exit status.

        Shielded: a stop that has begun finishes even if the caller is cancelled, so no process
        outlives the object that owned it.
        """
        grace = self.stop_grace if grace is None else grace
        with trio.CancelScope(shield=True):
            self.signal_group(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.wait()
            if self._popen.returncode is None:
                self.signal_group(signal.SIGKILL)
                await self.wait()
        assert self._popen.returncode is not None  # the shielded scope cannot be cancelled
        return self._popen.returncode

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
        with trio.CancelScope(shield=True):
            await self.output.aclose()
        os.close(self._pidfd)


#: Pipe capacity asked for the child's output: the reader drains it in batches (see
#: backend.OUTPUT_BATCH_INTERVAL) and a full pipe would stall llama-server mid-generation.
OUTPUT_PIPE_SIZE = 1 << 20


def _enlarge_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, OUTPUT_PIPE_SIZE)
    except OSError:  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default
        pass


def spawn(argv: Sequence[str], *, env: Mapping[str, str], stop_grace: float) -> Child:
    """Start ``argv`` in a new session with the death signal armed, with exactly ``env`` as its
    environment (the caller decides what a child may see). Must run in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("spawn() must run in the main thread: PR_SET_PDEATHSIG follows the forking thread")
    program = resolve_program(argv[0], env)
    bound = death_bound_argv([program, *argv[1:]], parent_pid=os.getpid(), env=env, setpriv=_setpriv())
    read_fd, write_fd = os.pipe()
    _enlarge_pipe(read_fd)
    try:
        popen = subprocess.Popen(
            bound, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
            env=dict(env), start_new_session=True, close_fds=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Child(popen, trio.lowlevel.FdStream(read_fd), stop_grace)
