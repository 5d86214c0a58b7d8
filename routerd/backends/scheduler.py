"""Per-model request queues, the failure history of each model, and the preload order.

Owns who goes next when a backend's slots are busy or it is still loading (priority, FIFO within
a priority, aging so a low request is never starved, the queue limit), every model's queue
(``Queues``: joining, leaving, depth, the oldest wait and the ``queue.high``/``queue.normal``
watermark events), when a model that keeps failing may start again (exponential backoff, the
crash-loop breaker), and in which order ``scheduler.preload`` starts models. The policy parts
are pure functions over plain data; ``ModelQueue`` adds the waiting. It must not start, stop or
choose backends: the supervisor asks it and acts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import trio

from routerd import events
from routerd.errors import BadRequest, TooManyRequests

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
PRIORITY_HEADER = "X-Request-Priority"


def parse_priority(value: str | None) -> int:
    """The ``X-Request-Priority`` header as a level (0 is served first); absent means normal."""
    if value is None or value == "":
        return PRIORITIES["normal"]
    level = PRIORITIES.get(value.strip().lower())
    if level is None:
        raise BadRequest(f"{PRIORITY_HEADER}: {value!r} is not one of high, normal, low",
                         code="invalid_priority")
    return level


@attrs.define(eq=False)
class Ticket:
    """One request waiting for a slot of its model."""

    priority: int
    enqueued: float
    seq: int
    deadline: float
    #: The queue's model (its catalog name when the ticket was made: it may leave the catalog).
    model: str = ""


def effective_priority(ticket: Ticket, now: float, aging: float) -> float:
    """Its level, lifted one step for every ``aging`` seconds waited."""
    return ticket.priority - (now - ticket.enqueued) // aging


def preload_order(wanted: Sequence[str], catalog: Sequence[str]) -> list[str]:
    """The models ``scheduler.preload = wanted`` starts, in the order it starts them (pure).

    Names are taken in the order written; ``"*"`` stands, at its place, for every model of
    ``catalog`` (in catalog order) not named elsewhere in the list. So ``["b", "*"]`` starts b,
    then the rest of the catalog. A name listed twice starts once, at its first place.
    """
    named = {name for name in wanted if name != "*"}
    order: list[str] = []
    for name in wanted:
        for chosen in ([n for n in catalog if n not in named] if name == "*" else [name]):
            if chosen not in order:
                order.append(chosen)
    return order


def pick_next(tickets: Sequence[Ticket], now: float, aging: float) -> Ticket | None:
    """Who gets the next free slot: best effective priority, then first come (pure)."""
    return min(tickets, key=lambda t: (effective_priority(t, now, aging), t.seq), default=None)


class ModelQueue:
    """The requests waiting for one model, whatever backend process serves it now."""

    def __init__(self, name: str, *, limit: int, aging: float) -> None:
        self.name = name
        self.limit = limit
        self.aging = aging
        self.tickets: list[Ticket] = []
        self._seq = itertools.count()
        #: The tickets whose holders wait for their turn now, each with what wakes it.
        self._waiting: dict[Ticket, trio.Event] = {}
        self._best: Ticket | None = None
        self._best_valid = False

    def enter(self, priority: int, max_wait: float) -> Ticket:
        """Join the queue, or raise TooManyRequests (429) at once when it is full."""
        if len(self.tickets) >= self.limit:
            raise TooManyRequests(f"{len(self.tickets)} requests are already waiting for {self.name!r} "
                                  f"(scheduler.max_queue = {self.limit}); retry later",
                                  retry_after=max(1.0, len(self.tickets) / 16))
        now = trio.current_time()
        ticket = Ticket(priority, now, next(self._seq), now + max_wait, self.name)
        self.tickets.append(ticket)
        self._best_valid = False  # its holder looks at once; a waiter is woken by a change of turn
        return ticket

    def rejoin(self, ticket: Ticket) -> None:
        """Put back a ticket that left (its request could not be delivered): it keeps its place,
        since order is by priority, time waited and arrival, never by when it rejoined."""
        if ticket not in self.tickets:
            self.tickets.append(ticket)
            self.wake()

    def leave(self, ticket: Ticket) -> None:
        if ticket in self.tickets:
            self.tickets.remove(ticket)
            self.wake()

    def is_next(self, ticket: Ticket) -> bool:
        return self._next() is ticket

    def _next(self) -> Ticket | None:
        if not self._best_valid:  # computed once per change, not once per waiter
            self._best = pick_next(self.tickets, trio.current_time(), self.aging)
            self._best_valid = True
        return self._best

    def ahead_of(self, ticket: Ticket) -> int:
        """How many waiting tickets would be served before ``ticket`` as things stand."""
        now = trio.current_time()
        mine = (effective_priority(ticket, now, self.aging), ticket.seq)
        return sum(1 for t in self.tickets
                   if t is not ticket and (effective_priority(t, now, self.aging), t.seq) < mine)

    def wake(self) -> None:
        """Something changed (a slot freed, a backend moved on, the queue changed): the ticket
        whose turn it is looks again. Only that one: waking every waiter on each change cost
        O(waiters) task switches per request, and only the next may take a slot anyway. The
        others are woken in turn, as the tickets before them leave."""
        self._best_valid = False
        if self._waiting and (best := self._next()) is not None:
            event = self._waiting.get(best)
            if event is not None:
                event.set()

    async def changed(self, ticket: Ticket) -> None:
        """Until something changes while it is ``ticket``'s turn (see ``wake``)."""
        event = self._waiting[ticket] = trio.Event()
        try:
            await event.wait()
        finally:
            if self._waiting.get(ticket) is event:
                del self._waiting[ticket]


class Queues:
    """Every model's queue, made on first use, with the limits of the config in force."""

    def __init__(self, *, limit: int, aging: float, bus: events.Bus) -> None:
        self.limit = limit
        self.aging = aging
        self._bus = bus
        self._by_model: dict[str, ModelQueue] = {}
        #: Models whose queue is past its high mark (an event said so; one more when it drains).
        self._high: set[str] = set()

    def configure(self, *, limit: int, aging: float) -> None:
        """A new config: its limits apply to every queue, the ones already waiting included."""
        self.limit, self.aging = limit, aging
        for queue in self._by_model.values():
            queue.limit, queue.aging = limit, aging

    def queue(self, name: str) -> ModelQueue:
        queue = self._by_model.get(name)
        if queue is None:
            queue = self._by_model[name] = ModelQueue(name, limit=self.limit, aging=self.aging)
        return queue

    def enter(self, name: str, priority: int, max_wait: float) -> Ticket:
        """Join ``name``'s queue (TooManyRequests at once when it is full)."""
        ticket = self.queue(name).enter(priority, max_wait)
        self._watch_depth(name)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """Leave the ticket's queue (its model may have left the catalog since)."""
        queue = self._by_model.get(ticket.model)
        if queue is not None:
            queue.leave(ticket)
            self._watch_depth(ticket.model)

    def rejoin(self, ticket: Ticket) -> None:
        """Put a ticket that left back in its place (see ``ModelQueue.rejoin``)."""
        self.queue(ticket.model).rejoin(ticket)

    def depth(self, name: str) -> int:
        queue = self._by_model.get(name)
        return len(queue.tickets) if queue else 0

    def oldest_wait(self, name: str) -> float:
        """Seconds the longest-waiting request for ``name`` has waited (0 when none)."""
        queue = self._by_model.get(name)
        if not queue or not queue.tickets:
            return 0.0
        return trio.current_time() - min(t.enqueued for t in queue.tickets)

    def ahead_of(self, name: str, ticket: Ticket) -> int:
        queue = self._by_model.get(name)
        return queue.ahead_of(ticket) if queue else 0

    def wake_all(self) -> None:
        """Something every queue may care about changed: each one's next ticket looks again."""
        for queue in self._by_model.values():
            queue.wake()

    def _watch_depth(self, name: str) -> None:
        """``queue.high`` once a queue reaches half its limit, ``queue.normal`` once it is back
        under a quarter (the gap keeps a queue hovering at the mark from flooding consumers)."""
        depth, limit = self.depth(name), self.limit
        if name not in self._high and limit and depth >= max(1, limit // 2):
            self._high.add(name)
            self._bus.publish(events.EventType.QUEUE_HIGH, name, depth=depth, max_queue=limit)
        elif name in self._high and depth <= limit // 4:
            self._high.discard(name)
            self._bus.publish(events.EventType.QUEUE_NORMAL, name, depth=depth, max_queue=limit)


@attrs.define
class FailureHistory:
    """A model's recent failures: how long to back off, and whether it is in a crash loop."""

    times: list[float] = attrs.field(factory=list)
    #: Failures since the model last became ready: the backoff exponent.
    consecutive: int = 0
    last_error: str | None = None
    exit_code: int | None = None
    log_tail: str = ""

    def record(self, now: float, error: str, exit_code: int | None, log_tail: str) -> None:
        self.times.append(now)
        self.consecutive += 1
        self.last_error, self.exit_code, self.log_tail = error, exit_code, log_tail

    def loaded(self) -> None:
        """The model became ready again: the next failure backs off from the start."""
        self.consecutive = 0

    def recent(self, now: float, window: float) -> int:
        return sum(1 for t in self.times if now - t <= window)

    def broken(self, now: float, failures: int, window: float) -> bool:
        """In a crash loop: ``failures`` failures within ``window`` seconds."""
        return self.recent(now, window) >= failures

    def next_start(self, base: float, ceiling: float) -> float:
        """Earliest time the model may start again: base * 2^(consecutive failures - 1) after the last."""
        if not self.consecutive:
            return -float("inf")
        return self.times[-1] + min(ceiling, base * 2.0 ** (self.consecutive - 1))
