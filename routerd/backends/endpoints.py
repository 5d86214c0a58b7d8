"""A model's pool of endpoints: which one takes a request, and how many replicas to run.

A model is served by endpoints: its local llama-servers (replicas) and remote servers listed
for it. This module owns the decisions over them, as pure functions over plain data: the
balancing choice (least outstanding requests among endpoints with a free slot, or a sticky
session's last endpoint while it is within ``sticky_slack`` of the least loaded), how many
replicas to start now, and the bounded map of sessions to endpoints. It must not start, stop
or call an endpoint: the supervisor asks and acts.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import attrs

from routerd.backends.upstream import ConnectionPool

#: The request header that names a conversation (else the body's ``user`` field does).
SESSION_HEADER = "X-Session-Id"


class Endpoint(Protocol):
    """What the proxy sends a request to: a local llama-server or a remote server."""

    #: Unique among endpoints: ``smollm2``, ``smollm2#2`` (a replica), ``remote:gpu2``.
    key: str
    #: For people: "backend for 'smollm2'", "remote 'gpu2' (http://gpu2:8082)".
    label: str
    in_flight: int
    #: Set while it takes requests: the way in.
    upstream: ConnectionPool | None

    @property
    def accepting(self) -> bool: ...

    @property
    def slots(self) -> int: ...

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def distrust(self) -> None: ...

    def slot_for_session(self, session: str) -> int | None:
        """The llama-server slot a sticky session's conversation is kept in (None: its choice)."""
        ...

    async def failure_reason(self, exc: BaseException) -> str:
        """Why a call to it broke: a dying backend's exit, or the error itself."""
        ...


@attrs.frozen
class Lease:
    """A slot taken on an endpoint for one request (``endpoint.release()`` gives it back)."""

    endpoint: Endpoint
    #: The catalog name of the model served.
    model: str
    #: The model's name at a remote, when it differs from what the client asked for.
    upstream_model: str | None = None


@attrs.frozen
class Candidate:
    """An accepting endpoint as the balancer sees it."""

    key: str
    #: Requests it holds: ours in flight, plus those queued at a remote routerd.
    outstanding: int
    #: Whether it has a slot for one more of ours.
    free: bool


def choose(candidates: Sequence[Candidate], *, last: str | None = None, slack: int = 0,
           session: str | None = None) -> str | None:
    """The endpoint for the next request (pure); None when none has a free slot.

    ``last`` is the endpoint that served the request's session before: it is kept while it has
    a free slot and at most ``slack`` more outstanding requests than the least loaded. Otherwise
    the least loaded wins; among equals, a session is spread by its hash (so sessions divide
    across idle replicas), a request without one takes the first.
    """
    free = [c for c in candidates if c.free]
    if not free:
        return None
    least = min(c.outstanding for c in free)
    if last is not None:
        for c in free:
            if c.key == last and c.outstanding <= least + slack:
                return c.key
    tied = [c for c in free if c.outstanding == least]
    if session is not None and len(tied) > 1:
        return tied[zlib.crc32(session.encode()) % len(tied)].key
    return tied[0].key


def replicas_to_start(*, live: int, starting: int, keep: int, most: int, oldest_wait: float,
                      scale_up_wait: float) -> int:
    """How many more local replicas to start now (pure).

    ``keep`` always run once the model is in use (``replicas = N``); beyond that, up to
    ``most``, one more while the oldest queued request has waited ``scale_up_wait`` and no
    replica is still starting (its capacity is not known yet).
    """
    if live < keep:
        return keep - live
    if live < most and starting == 0 and oldest_wait >= scale_up_wait:
        return 1
    return 0


class SessionMap:
    """Which endpoint served each session last: bounded (least recently used goes first) and
    expiring (a session unseen for ``ttl`` seconds is forgotten)."""

    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._seen: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, model: str, session: str, now: float) -> str | None:
        found = self._seen.get((model, session))
        if found is None:
            return None
        if now - found[1] > self.ttl:
            del self._seen[(model, session)]
            return None
        return found[0]

    def put(self, model: str, session: str, endpoint: str, now: float) -> None:
        self._seen[(model, session)] = (endpoint, now)
        self._seen.move_to_end((model, session))
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        # The oldest entries are the least recently used: drop the expired ones from the front.
        while self._seen:
            oldest, (_, seen) = next(iter(self._seen.items()))
            if now - seen <= self.ttl:
                break
            del self._seen[oldest]
