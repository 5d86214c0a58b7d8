"""The kinds of event routerd publishes, defined once, with nothing else imported.

``routerd.events`` (the bus) and every consumer name them from here; ``routerctl`` imports this
module alone, so printing an event costs it no trio or attrs import.
"""

from __future__ import annotations

import enum


class EventType(enum.StrEnum):
    """Every kind of event, defined once: publishers, the metrics, the request log, routerctl and
    the page (which reads them from ``GET /ui/event-types.js``) all name them from here, so a typo is
    a type error rather than a metric that silently never moves. Fields: docs/events.md."""

    MODEL_LOADING = "model.loading"
    #: Loading progress read from the llama-server's output.
    MODEL_PROGRESS = "model.progress"
    MODEL_READY = "model.ready"
    MODEL_STOPPING = "model.stopping"
    MODEL_STOPPED = "model.stopped"
    MODEL_FAILED = "model.failed"
    MODEL_EVICTED = "model.evicted"
    MODEL_CRASH_LOOP = "model.crash_loop"
    #: A load nobody waited for (``routerctl load`` without --wait, router mode's
    #: ``POST /models/load``, preload) that admission refused: no room, a crash loop...
    MODEL_LOAD_REFUSED = "model.load_refused"
    #: Each line a running llama-server prints: published only while someone follows that model.
    MODEL_LOG = "model.log"
    QUEUE_HIGH = "queue.high"
    QUEUE_NORMAL = "queue.normal"
    REMOTE_REACHABLE = "remote.reachable"
    REMOTE_UNREACHABLE = "remote.unreachable"
    CATALOG_RESCAN = "catalog.rescan"
    #: A download into the Hugging Face cache (``routerctl pull``, ``POST /models``): bytes so
    #: far of one file (a few a second at most), then its end.
    PULL_PROGRESS = "pull.progress"
    PULL_DONE = "pull.done"
    PULL_FAILED = "pull.failed"
    #: A model's conversations (llama-server's KV slots) saved before it stopped, restored when
    #: it started again, and saved files removed (unreadable, another key, the disk budget).
    SLOTS_SAVED = "slots.saved"
    SLOTS_RESTORED = "slots.restored"
    SLOTS_REMOVED = "slots.removed"
    #: A pulled model removed from the cache (``DELETE /models``).
    MODEL_REMOVED = "model.removed"
    CONFIG_RELOAD = "config.reload"
    #: The one event per finished request: sent only to subscribers that ask for it.
    REQUEST = "request"
    #: The last event a dropped subscriber receives.
    DROPPED = "dropped"
