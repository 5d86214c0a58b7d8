"""A bounded ring of a backend's recent output lines, with followers.

Owns the lines and the wake-up of readers that follow it (``routerctl logs -f``). Knows nothing
about processes; the backend feeds it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator

import attrs
import trio


@attrs.frozen
class LogLine:
    seq: int
    time: float
    text: str


class LogRing:
    def __init__(self, capacity: int = 2000) -> None:
        self.capacity = capacity
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=capacity)
        self._next_seq = 0
        self._appended = trio.Event()
        self.closed = False

    def append(self, text: str) -> None:
        self._lines.append(LogLine(self._next_seq, time.time(), text))
        self._next_seq += 1
        self._appended.set()
        self._appended = trio.Event()

    def close(self) -> None:
        """No more lines will come (the process is gone); followers finish."""
        self.closed = True
        self._appended.set()

    @property
    def last_seq(self) -> int:
        """The seq of the newest line so far (-1 when empty): follow from here for new lines only."""
        return self._next_seq - 1

    def tail(self, n: int) -> list[LogLine]:
        if n <= 0:
            return []
        return list(self._lines)[-n:]

    def text_tail(self, n: int) -> str:
        return "\n".join(line.text for line in self.tail(n))

    async def follow(self, after_seq: int = -1) -> AsyncIterator[LogLine]:
        """Yield lines with seq > ``after_seq`` as they arrive, until the ring is closed."""
        while True:
            for line in list(self._lines):
                if line.seq > after_seq:
                    after_seq = line.seq
                    yield line
            if self.closed:
                return
            await self._appended.wait()
