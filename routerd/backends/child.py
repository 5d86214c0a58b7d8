"""One child process whose life is tied to routerd's.

Owns spawning (in routerd's main thread, own process group, the environment it is given, stdout and
stderr merged into one pipe), waiting for exit without a thread (pidfd), and stopping the whole
process group: SIGTERM, then SIGKILL after a grace period.

Why not ``trio.run_process``: trio spawns from a worker thread, and ``PR_SET_PDEATHSIG`` fires
when the *thread* that forked exits, which killed children after 10 s (see the field notes).
Spawning from the main thread with the death signal set makes the kernel kill the child when
routerd dies, even by ``kill -9``. This module knows nothing about llama-server.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType

import trio

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

def _die_with(parent_pid: int) -> None:
    # Runs in the child between fork and exec; only async-signal-safe work here.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # routerd died before the death signal was armed
        os._exit(1)


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
                return await self.wait()
            self.signal_group(signal.SIGKILL)
            return await self.wait()

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
    read_fd, write_fd = os.pipe()
    _enlarge_pipe(read_fd)
    try:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
            env=dict(env), start_new_session=True, close_fds=True,
            preexec_fn=lambda parent=os.getpid(): _die_with(parent),  # noqa: PLW0108
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Child(popen, trio.lowlevel.FdStream(read_fd), stop_grace)
