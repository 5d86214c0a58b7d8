"""Whether a ready llama-server still answers: its /health checks and the trust a broken call loses.

Owns the health policy, one /health probe, the periodic watch that declares a hung backend
unresponsive, and ``Trust`` (after a call breaks, nothing new is sent until /health answers
again). It must not start or stop processes: the backend acts on what these report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from routerd.backends.upstream import ConnectionPool, UpstreamError

log = logging.getLogger("routerd.backend")


@attrs.frozen
class HealthPolicy:
    """How a ready backend is watched: a /health check every ``interval`` s, each bounded by
    ``timeout`` s; ``failures`` in a row and it is killed as unresponsive."""

    interval: float = 10.0
    timeout: float = 5.0
    failures: int = 2


async def healthy(pool: ConnectionPool) -> bool:
    """Whether the backend behind ``pool`` answers /health with 200 (callers bound the check
    with a cancel scope: one that takes too long has failed)."""
    try:
        status, _ = await pool.get("/health")
    except UpstreamError:
        return False
    return status == 200


async def watch(pool: ConnectionPool, policy: HealthPolicy, name: str) -> str:
    """Check /health every ``policy.interval`` s; return why the backend counts as hung once
    ``policy.failures`` checks in a row failed (never returns while it answers)."""
    missed = 0
    while True:
        await trio.sleep(policy.interval)
        answered = False
        with trio.move_on_after(policy.timeout):
            answered = await healthy(pool)
        if answered:
            missed = 0
            continue
        missed += 1
        log.warning("%s: /health failed (%d of %d)", name, missed, policy.failures)
        if missed >= policy.failures:
            return f"llama-server stopped answering /health ({missed} checks, {policy.timeout:g} s each); killed"


class Trust:
    """A backend's standing after broken calls: trusted until ``distrust``, then suspect until
    ``keep`` (the backend's own task) sees /health answer again.

    A process that was just killed can still accept connections for a moment while the kernel
    tears it down; a request sent then is reset without an answer, and routerd could not tell it
    was never processed. Waiting for the verdict (healthy, or gone) avoids that.
    """

    def __init__(self) -> None:
        self._trusted = trio.Event()
        self._trusted.set()
        self._distrusted = trio.Event()  # wakes ``keep``

    @property
    def trusted(self) -> bool:
        return self._trusted.is_set()

    def distrust(self) -> None:
        """Only flags (request tasks call it, even while the backend is torn down)."""
        if self.trusted:
            self._trusted = trio.Event()
            self._distrusted.set()

    def restore(self) -> None:
        """Trusted again without a check: for a backend that is gone, nobody waits on a verdict."""
        self._trusted.set()

    async def wait_trusted(self) -> None:
        await self._trusted.wait()

    async def keep(self, pool: ConnectionPool, check_timeout: float, name: str,
                   on_trusted: Callable[[], None]) -> None:
        """After each ``distrust``: check /health, backing off, until it answers; then trust
        again and call ``on_trusted``. Runs as long as the process."""
        while True:
            await self._distrusted.wait()
            self._distrusted = trio.Event()
            delay = 0.05
            while True:
                with trio.move_on_after(check_timeout):
                    if await healthy(pool):
                        break
                await trio.sleep(delay)  # dying: the exit watcher ends the backend (and this task)
                delay = min(delay * 2, 1.0)
            log.info("%s answers /health again after a broken call; taking requests", name)
            self._trusted.set()
            on_trusted()
