"""Prometheus metrics: routerd's own, and each running llama-server's, in one scrape.

Owns the daemon's registry (never prometheus_client's global one), the counters and histograms
fed by events as they happen (``observe`` listens on the bus, so nothing is counted twice or
missed), the gauges read from the supervisor at scrape time (states, queues, memory), and
fetching the children's ``/metrics`` and ``/slots`` once per scrape, each bounded by
``metrics.backend_timeout``. Label values are catalog names and routerd's own words (routes,
reasons, error codes), never raw client input: a request for an unknown model counts under
``model=""``.

A scrape reads no GGUF file (estimates are cached per spec) and walks no /proc tree: one status
file per running llama-server. It must not start, stop or queue anything: a scrape only reads
(measuring a backend updates the memory manager's record of its peak, as every status view
does). Names are listed in docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from routerd import __version__, events, llama_args
from routerd.backends.backend import Backend, State
from routerd.backends.placement import spec_for
from routerd.backends.supervisor import Supervisor
from routerd.backends.upstream import UpstreamError
from routerd.events import EventType

log = logging.getLogger("routerd.metrics")

#: Latencies of LLM requests run from a cached /tokenize to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Content type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = tuple(state.value for state in State)


@attrs.frozen
class BuildInfo:
    version: str
    llama_server: str
    llama_server_version: str


class Metrics:
    """One daemon's metrics. Feed it events (``observe``) and control calls; ``render`` a scrape."""

    content_type = CONTENT_TYPE

    def __init__(self, supervisor: Supervisor, build: BuildInfo, *, started: float | None = None) -> None:
        self.supervisor = supervisor
        self.build = build
        self.started = time.time() if started is None else started
        #: KV-cache utilisation per model, from the children's /slots at the last scrape.
        self._kv: dict[str, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_* for routerd itself: CPU, RSS, fds
        r = self.registry
        self.requests = Counter("routerd_requests", "Proxied requests finished, by model, route and HTTP status",
                                ["model", "route", "status"], registry=r)
        self.duration = Histogram("routerd_request_duration_seconds", "Time from request to the end of its answer",
                                  ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("routerd_time_to_first_byte_seconds",
                              "Time from request to the first byte of the backend's answer sent to the client",
                              ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("routerd_queue_wait_seconds",
                                    "Time a request waited for a slot of its model (loading included)",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("routerd_requests_rejected", "Requests routerd answered with its own error, by reason "
                                "(the error code: queue_full, queue_timeout, insufficient_memory, model_failed...)",
                                ["model", "reason"], registry=r)
        self.cancelled = Counter("routerd_requests_cancelled", "Requests whose client hung up before the end",
                                 ["model"], registry=r)
        self.prompt_tokens = Counter("routerd_prompt_tokens", "Prompt tokens of finished requests (usage or timings)",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("routerd_completion_tokens",
                                         "Completion tokens of finished requests (usage or timings)", ["model"],
                                         registry=r)
        self.response_bytes = Counter("routerd_response_bytes", "Bytes of answers sent to clients", ["model"],
                                      registry=r)
        self.loads = Counter("routerd_loads", "Backend starts by outcome (ready, failed, cancelled)",
                             ["model", "outcome"], registry=r)
        self.load_duration = Histogram("routerd_load_duration_seconds", "Time from spawn to ready",
                                       ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.stops = Counter("routerd_stops", "Backends stopped, by cause (idle, memory, group, turn, reload, "
                             "operator, shutdown, unresponsive)", ["model", "cause"], registry=r)
        self.evictions = Counter("routerd_evictions", "Backends stopped to make room for another model, by cause "
                                 "(memory, group, turn)", ["model", "cause"], registry=r)
        self.failures = Counter("routerd_backend_failures", "Backends that exited unexpectedly or failed to load",
                                ["model"], registry=r)
        self.restarts = Counter("routerd_restarts", "Backend starts after a failure", ["model"], registry=r)
        self.crash_loops = Counter("routerd_crash_loops", "Times a model was marked failed by the crash-loop breaker",
                                   ["model"], registry=r)
        self.control_calls = Counter("routerd_control_calls", "Control-socket calls by method and outcome",
                                     ["method", "outcome"], registry=r)
        self.rescans = Counter("routerd_rescans", "Catalog rescans by trigger and outcome", ["trigger", "outcome"],
                               registry=r)
        self.reloads = Counter("routerd_reloads", "Config reloads by outcome", ["outcome"], registry=r)
        self.pulls = Counter("routerd_pulls", "Downloads into the Hugging Face cache by outcome", ["outcome"],
                             registry=r)
        self.load_refusals = Counter("routerd_load_refusals", "Loads nobody waited for that admission refused",
                                     ["model", "code"], registry=r)
        self.slot_saves = Counter("routerd_slot_saves", "Models whose conversations (KV slots) were saved before "
                                  "they stopped", ["model"], registry=r)
        self.slot_restores = Counter("routerd_slot_restores", "Models whose saved conversations were restored as they "
                                     "started", ["model"], registry=r)
        self.slots_moved = Counter("routerd_slots", "KV slots saved and restored", ["model", "direction"],
                                   registry=r)
        self.slot_tokens = Counter("routerd_slot_tokens", "Tokens of KV cache saved and restored (prefill not "
                                   "repeated when restored)", ["model", "direction"], registry=r)
        self.slot_bytes = Counter("routerd_slot_bytes", "Bytes of KV cache saved and restored",
                                  ["model", "direction"], registry=r)
        self.slot_seconds = Counter("routerd_slot_seconds", "Seconds spent saving and restoring KV slots",
                                    ["model", "direction"], registry=r)
        self.slot_files_removed = Counter("routerd_slot_files_removed", "Saved slot files removed, by reason",
                                          ["model", "reason"], registry=r)
        self.removals = Counter("routerd_models_removed", "Pulled models removed from the Hugging Face cache",
                                registry=r)
        r.register(_Snapshot(self))
        #: Each (model, route)'s children of the request metrics: found by label once, not per request.
        self._series: dict[tuple[str, str], _RequestSeries] = {}

    # -- events -------------------------------------------------------------------------------
    def observe(self, event: events.Event) -> None:
        """Count one event (a bus listener)."""
        handler = self._handlers.get(event.type)
        if handler is not None:
            handler(self, event.model or "", event.data)

    def _request(self, model: str, data: dict[str, Any]) -> None:
        route = data["route"]
        series = self._series.get((model, route))
        if series is None:  # a model and route seen for the first time: its children, once
            series = self._series[(model, route)] = _RequestSeries(self, model, route)
        status = data["status"]
        counter = series.by_status.get(status)
        if counter is None:
            counter = series.by_status[status] = self.requests.labels(model, route, str(status))
        counter.inc()
        series.duration.observe(data["duration"])
        if data["ttfb"] is not None:
            series.ttfb.observe(data["ttfb"])
        if data["queue_wait"] is not None:
            series.queue_wait.observe(data["queue_wait"])
        if data["error"] and status != 502:
            self.rejected.labels(model, data["error"]).inc()
        if data["cancelled"]:
            series.cancelled.inc()
        if data["prompt_tokens"]:
            series.prompt_tokens.inc(data["prompt_tokens"])
        if data["completion_tokens"]:
            series.completion_tokens.inc(data["completion_tokens"])
        series.response_bytes.inc(data["bytes_out"])

    def _loading(self, model: str, data: dict[str, Any]) -> None:
        if data.get("restart"):
            self.restarts.labels(model).inc()

    def _ready(self, model: str, data: dict[str, Any]) -> None:
        self.loads.labels(model, "ready").inc()
        self.load_duration.labels(model).observe(data["load_seconds"])

    def _stopped(self, model: str, data: dict[str, Any]) -> None:
        if data.get("while_loading"):
            self.loads.labels(model, "cancelled").inc()
        self.stops.labels(model, data["cause"]).inc()

    def _failed(self, model: str, data: dict[str, Any]) -> None:
        if data.get("while_loading"):
            self.loads.labels(model, "failed").inc()
        self.failures.labels(model).inc()

    def _evicted(self, model: str, data: dict[str, Any]) -> None:
        self.evictions.labels(model, data["cause"]).inc()

    def _crash_loop(self, model: str, data: dict[str, Any]) -> None:
        self.crash_loops.labels(model).inc()

    def _rescan(self, model: str, data: dict[str, Any]) -> None:
        self.rescans.labels(data["trigger"], "ok" if data.get("ok", True) else "error").inc()

    def _reload(self, model: str, data: dict[str, Any]) -> None:
        self.reloads.labels("ok" if data.get("ok") else "error").inc()

    def _pulled(self, model: str, data: dict[str, Any]) -> None:
        self.pulls.labels("ok").inc()

    def _pull_failed(self, model: str, data: dict[str, Any]) -> None:
        self.pulls.labels("error").inc()

    def _load_refused(self, model: str, data: dict[str, Any]) -> None:
        self.load_refusals.labels(model, data.get("code") or "unknown").inc()

    def _slots_moved(self, model: str, data: dict[str, Any], direction: str) -> None:
        (self.slot_saves if direction == "saved" else self.slot_restores).labels(model).inc()
        self.slots_moved.labels(model, direction).inc(data["slots"])
        self.slot_tokens.labels(model, direction).inc(data["tokens"])
        self.slot_bytes.labels(model, direction).inc(data["bytes"])
        self.slot_seconds.labels(model, direction).inc(data["seconds"])

    def _slots_saved(self, model: str, data: dict[str, Any]) -> None:
        self._slots_moved(model, data, "saved")

    def _slots_restored(self, model: str, data: dict[str, Any]) -> None:
        self._slots_moved(model, data, "restored")

    def _slots_removed(self, model: str, data: dict[str, Any]) -> None:
        self.slot_files_removed.labels(model, data["reason"]).inc(len(data["files"]))

    def _removed(self, model: str, data: dict[str, Any]) -> None:
        self.removals.inc()

    _handlers = {EventType.REQUEST: _request, EventType.MODEL_LOADING: _loading, EventType.MODEL_READY: _ready,
                 EventType.MODEL_STOPPED: _stopped, EventType.MODEL_FAILED: _failed,
                 EventType.MODEL_EVICTED: _evicted, EventType.MODEL_CRASH_LOOP: _crash_loop,
                 EventType.CATALOG_RESCAN: _rescan, EventType.CONFIG_RELOAD: _reload, EventType.PULL_DONE: _pulled,
                 EventType.PULL_FAILED: _pull_failed, EventType.MODEL_REMOVED: _removed,
                 EventType.MODEL_LOAD_REFUSED: _load_refused, EventType.SLOTS_SAVED: _slots_saved,
                 EventType.SLOTS_RESTORED: _slots_restored, EventType.SLOTS_REMOVED: _slots_removed}
    #: Event types no metric counts, and why: their effect is read at scrape time (states,
    #: queue depths, remote reachability are gauges) or they are not countable facts (log lines,
    #: loading progress, a subscriber's own drop). Tests hold handled + ignored to ``EventType``.
    IGNORED_EVENTS = frozenset({EventType.MODEL_PROGRESS, EventType.MODEL_LOG, EventType.MODEL_STOPPING,
                                EventType.QUEUE_HIGH, EventType.QUEUE_NORMAL, EventType.REMOTE_REACHABLE,
                                EventType.REMOTE_UNREACHABLE, EventType.DROPPED, EventType.PULL_PROGRESS})

    def control_call(self, method: str, outcome: str) -> None:
        """Count a control call (``method`` must be a known method name or "unknown")."""
        self.control_calls.labels(method, outcome).inc()

    # -- a scrape -----------------------------------------------------------------------------
    async def render(self, *, backends: bool = True, backend_timeout: float = 1.0) -> bytes:
        """The whole exposition: routerd's registry, then every running llama-server's own (each
        given ``backend_timeout`` s: a slow one is left out, the others still count)."""
        scraped: list[_Scraped] = []
        if backends:
            scraped = await scrape_backends(self._ready_backends(), backend_timeout)
        self._kv = {s.model: s.kv_utilization for s in scraped if s.kv_utilization is not None}
        text = generate_latest(self.registry)
        return text + generate_latest(_Families(merge_families(scraped)))

    def _ready_backends(self) -> list[Backend]:
        found = []
        for entry in self.supervisor.catalog:
            backend = self.supervisor.running(entry.name)
            if backend is not None and backend.state is State.READY and backend.upstream is not None:
                found.append(backend)
        return found


@attrs.define
class _Scraped:
    model: str
    families: list[Metric]
    kv_utilization: float | None


async def scrape_backends(backends: Iterable[Backend], each_within: float) -> list[_Scraped]:
    """Each backend's /metrics and /slots, fetched concurrently; one that fails or takes more
    than ``each_within`` s is left out (a bound per backend, which a caller's scope cannot give)."""
    results: list[_Scraped] = []

    async def scrape(backend: Backend) -> None:
        pool = backend.upstream
        if pool is None:
            return
        with trio.move_on_after(each_within):
            try:
                status, body = await pool.get("/metrics")
                families = parse_families(body) if status == 200 else []
                status, slots = await pool.get("/slots")
                kv = kv_utilization(json.loads(slots), _ctx_size(backend)) if status == 200 else None
            except (UpstreamError, ValueError, TypeError, KeyError) as exc:
                log.debug("scraping %s failed: %s", backend.name, exc)
                return
            results.append(_Scraped(backend.name, families, kv))

    async with trio.open_nursery() as nursery:
        for backend in backends:
            nursery.start_soon(scrape, backend)
    return results


def parse_families(text: bytes) -> list[Metric]:
    return list(text_string_to_metric_families(text.decode("utf-8", "replace")))


def kv_utilization(slots: Any, ctx_size: int | None) -> float | None:
    """Fraction of the context cells held by requests in flight, from llama-server's /slots
    (pure): prompt tokens plus tokens decoded, over the whole context (``--ctx-size``, which the
    slots share). llama-server 11434 exports no KV-cache gauge of its own."""
    if not isinstance(slots, list) or not slots:
        return None
    cells = ctx_size or max(int(slot.get("n_ctx", 0)) for slot in slots)
    if cells <= 0:
        return None
    held = 0
    for slot in slots:
        if slot.get("is_processing"):
            decoded = sum(int(t.get("n_decoded", 0)) for t in slot.get("next_token", []) if isinstance(t, dict))
            held += int(slot.get("n_prompt_tokens", 0)) + decoded
    return min(1.0, held / cells)


def _ctx_size(backend: Backend) -> int | None:
    value = llama_args.flag_value([*backend.spec.flags, *backend.spec.extra], "--ctx-size")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def merge_families(scraped: Iterable[_Scraped]) -> list[Metric]:
    """The children's families, one per name, each sample labelled with its model (pure).

    A counter whose samples lack the ``_total`` suffix (llama-server's ``n_tokens_max``) is
    passed on untyped: the text format names a counter's samples ``NAME_total``.
    """
    merged: dict[str, Metric] = {}
    for one in scraped:
        for family in one.families:
            kind = family.type
            if kind == "counter" and any(not s.name.endswith("_total") for s in family.samples):
                kind = "unknown"
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, kind)
            for sample in family.samples:
                target.add_sample(sample.name, {**sample.labels, "model": one.model}, sample.value)
    return list(merged.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class _RequestSeries:
    """The children of the request metrics for one model and route."""

    def __init__(self, metrics: Metrics, model: str, route: str) -> None:
        self.by_status: dict[int, Any] = {}
        self.duration = metrics.duration.labels(model, route)
        self.ttfb = metrics.ttfb.labels(model, route)
        self.queue_wait = metrics.queue_wait.labels(model)
        self.cancelled = metrics.cancelled.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.completion_tokens = metrics.completion_tokens.labels(model)
        self.response_bytes = metrics.response_bytes.labels(model)


class _Snapshot:
    """The gauges read from the supervisor at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        supervisor = metrics.supervisor
        build = metrics.build
        info = InfoMetricFamily("routerd_build", "routerd's version and its llama-server",
                                value={"version": build.version, "llama_server": build.llama_server,
                                       "llama_server_version": build.llama_server_version})
        yield info
        builds = InfoMetricFamily("routerd_model_build", "Each local model's llama-server: the binary, its version, "
                                  "and the flags routerd adds that it lacks", labels=["model"])
        for entry in supervisor.catalog:
            if entry.remote:
                continue
            spec = supervisor.placement.spec(entry)
            known = supervisor.builds.known(spec.binary)
            if known is not None:
                builds.add_metric([entry.name], {"binary": known.path, "version": known.version,
                                                 "package": known.package or "",
                                                 "lacks": ",".join(spec.lacking(known))})
        yield builds
        yield GaugeMetricFamily("routerd_start_time_seconds", "When routerd started (Unix time)", metrics.started)
        yield GaugeMetricFamily("routerd_uptime_seconds", "Seconds since routerd started",
                                time.time() - metrics.started)
        entries = list(supervisor.catalog)
        yield GaugeMetricFamily("routerd_catalog_models", "Models in the catalog", len(entries))

        state = GaugeMetricFamily("routerd_model_state", "1 for the state each model is in", labels=["model", "state"])
        queued = GaugeMetricFamily("routerd_queued_requests", "Requests waiting for a slot of the model "
                                   "(scale-out contract: an endpoint picker's queue depth)", labels=["model"])
        running = GaugeMetricFamily("routerd_running_requests", "Requests being served by the model's backend "
                                    "(scale-out contract)", labels=["model"])
        in_flight = GaugeMetricFamily("routerd_in_flight_requests", "Requests routerd holds for the model: queued "
                                      "plus running", labels=["model"])
        slots = GaugeMetricFamily("routerd_backend_slots", "Parallel slots of the model's running backend",
                                  labels=["model"])
        kv = GaugeMetricFamily("routerd_kv_cache_utilization", "Fraction of the backend's context cells held by "
                               "requests in flight, 0..1 (scale-out contract)", labels=["model"])
        crash = GaugeMetricFamily("routerd_model_crash_looping", "1 while the crash-loop breaker holds the model",
                                  labels=["model"])
        estimate = GaugeMetricFamily("routerd_model_memory_estimate_bytes", "Estimated footprint per device",
                                     labels=["model", "device"])
        measured = GaugeMetricFamily("routerd_model_memory_measured_bytes", "Memory the running backend uses now",
                                     labels=["model", "device"])
        peak = GaugeMetricFamily("routerd_model_memory_peak_bytes", "Largest use measured for the model's spec",
                                 labels=["model", "device"])
        memory = supervisor.memory
        for entry in entries:
            name = entry.name
            current = supervisor.state_of(name)
            for value in STATES:
                state.add_metric([name, value], 1.0 if value == current else 0.0)
            backend = supervisor.running(name)
            depth = supervisor.queued(name)
            busy = backend.in_flight if backend is not None else 0
            queued.add_metric([name], depth)
            running.add_metric([name], busy)
            in_flight.add_metric([name], depth + busy)
            crash.add_metric([name], 1.0 if supervisor.crash_looping(name) else 0.0)
            if backend is not None:
                slots.add_metric([name], backend.spec.slots)
                if name in metrics._kv:
                    kv.add_metric([name], metrics._kv[name])
            spec = spec_for(entry, supervisor.config, supervisor.binary)
            footprint = memory.estimate(spec)
            for device, nbytes in (footprint.per_device.items() if footprint else ()):
                estimate.add_metric([name, device], nbytes)
            seen = memory.measure(backend) if backend is not None else memory.measured(spec)
            for device, nbytes in (seen.current.items() if seen and backend is not None else ()):
                measured.add_metric([name, device], nbytes)
            for device, nbytes in (seen.per_device.items() if seen else ()):
                peak.add_metric([name, device], nbytes)
        yield from (state, queued, running, in_flight, slots, kv, crash, estimate, measured, peak)

        devices = memory.report(supervisor.residents())
        for key, help_text in (("total", "Device memory"),
                               ("budget", "Memory routerd may plan with (total minus reserve)"),
                               ("used", "Memory routerd counts as held by its backends"),
                               ("free", "Budget not held by routerd's backends")):
            family = GaugeMetricFamily(f"routerd_device_memory_{key}_bytes", help_text, labels=["device"])
            for row in devices:
                amount = row[key]
                assert isinstance(amount, int | float), (key, amount)
                family.add_metric([str(row["device"])], float(amount))
            yield family
        yield GaugeMetricFamily("routerd_event_subscribers", "Open /events and `routerctl events` consumers",
                                supervisor.bus.subscribers)


def build_info(binary: str, version: str) -> BuildInfo:
    return BuildInfo(__version__, binary, version)
