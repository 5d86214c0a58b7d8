"""What happens inside routerd, as events: one bus, synchronous listeners, bounded subscribers.

Owns the event record, publishing, and the two ways to receive events. *Listeners* (the metrics
and the request log) are plain functions called as each event is published, so a counter can
never miss one. *Subscribers* (``GET /events``, ``routerctl events``) each get a bounded buffer
read at their own pace: publishing never waits for them, and one that falls ``buffer`` events
behind is dropped, with a final ``dropped`` event after what it had buffered and a short grace to
read it before its connection is cut.

It knows no HTTP, JSON-RPC or backends: backends, the supervisor and its parts (queues,
placement), remotes, the catalog service and the proxy publish; the edges subscribe. The types
are ``EventType`` (``event_types.py``); their fields are listed in docs/metrics.md.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from routerd.event_types import EventType

__all__ = ["Bus", "Event", "EventType", "Subscription", "visible_to"]


#: Seconds a dropped subscriber has to read what it had buffered before it is cut off.
DROP_GRACE = 5.0
#: Finished requests kept for a new subscriber's first look (the status page's request log).
RECENT_REQUESTS = 200


@attrs.frozen
class Event:
    """One thing that happened: ``type`` (``model.ready``...), the model it concerns (None for the
    daemon's own), and its fields."""

    seq: int
    time: float
    type: EventType
    model: str | None
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "type": self.type, "model": self.model, **self.data}


Listener = Callable[[Event], None]


class Subscription:
    """One consumer's view of the bus: iterate it; it ends after a ``dropped`` event."""

    def __init__(self, buffer: int, *, requests: bool, visible: Callable[[Event], bool],
                 drop_grace: float = DROP_GRACE, logs: str | None = None) -> None:
        self.buffer = buffer
        #: The model whose llama-server lines this subscriber follows (``MODEL_LOG`` events).
        self.logs = logs
        self.drop_grace = drop_grace
        self.requests = requests
        self.visible = visible
        self.dropped = False
        self._events: collections.deque[Event] = collections.deque()
        self._arrived = trio.Event()
        #: Cancelled ``DROP_GRACE`` s after a drop: the consumer's own scope (see ``Bus.subscribe``).
        self.scope = trio.CancelScope()

    def offer(self, event: Event, make_dropped: Callable[[str], Event]) -> None:
        if self.dropped or (event.type == EventType.REQUEST and not self.requests) or not self.visible(event):
            return
        if event.type == EventType.MODEL_LOG and event.model != self.logs:
            return
        if len(self._events) >= self.buffer:
            self.dropped = True
            self._events.append(make_dropped(f"this consumer fell {self.buffer} events behind "
                                             "(metrics.event_buffer); reconnect to resume"))
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + self.drop_grace)
        else:
            self._events.append(event)
        self._arrived.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._events:
            if self.dropped:
                raise StopAsyncIteration
            await self._arrived.wait()
            self._arrived = trio.Event()
        return self._events.popleft()

    def pending(self) -> int:
        return len(self._events)


class Bus:
    """Where events are published. One per daemon."""

    def __init__(self, buffer: int = 1000, *, drop_grace: float = DROP_GRACE) -> None:
        self.buffer = buffer
        self.drop_grace = drop_grace
        self._listeners: list[Listener] = []
        self._subscriptions: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._recent_requests: collections.deque[Event] = collections.deque(maxlen=RECENT_REQUESTS)

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` with every event, as it is published (it must not block or raise)."""
        self._listeners.append(listener)

    def publish(self, type_: EventType, model: str | None = None, **data: Any) -> Event:
        event = Event(next(self._seq), time.time(), type_, model, data)
        if type_ == EventType.REQUEST:
            self._recent_requests.append(event)
        for listener in self._listeners:
            listener(event)
        for subscription in self._subscriptions:
            subscription.offer(event, self._dropped_event)
        return event

    def _dropped_event(self, reason: str) -> Event:
        return Event(next(self._seq), time.time(), EventType.DROPPED, None, {"reason": reason})

    def recent_requests(self) -> list[Event]:
        """The last ``RECENT_REQUESTS`` finished requests, oldest first."""
        return list(self._recent_requests)

    def follows_logs(self, model: str) -> bool:
        """Whether a subscriber follows ``model``'s lines (publish ``MODEL_LOG`` events only then)."""
        return any(subscription.logs == model for subscription in self._subscriptions)

    @contextmanager
    def subscribe(self, *, requests: bool = False, logs: str | None = None,
                  visible: Callable[[Event], bool] = lambda event: True) -> Iterator[Subscription]:
        """A subscription for the ``with`` block (``logs``: a model whose llama-server lines to
        follow too). Run the consumer inside ``subscription.scope``: it is cancelled
        ``drop_grace`` s after the subscriber is dropped."""
        subscription = Subscription(self.buffer, requests=requests, visible=visible, drop_grace=self.drop_grace,
                                    logs=logs)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)


def visible_to(allows: Callable[[Iterable[str]], bool], is_admin: bool) -> Callable[[Event], bool]:
    """A subscriber's filter from its key (pure): its models' events; the daemon's own (rescans,
    reloads) only for keys that see every model."""
    def visible(event: Event) -> bool:
        if event.model is None:
            return is_admin
        return allows([event.model])
    return visible
