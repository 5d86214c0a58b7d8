"""The views, ``/metrics`` and ``/events``: what the HTTP front answers itself.

Owns the read-only views (``/v1/models``, ``/health``, ``/memory``) on a quart-trio app, the two
long or hot observability endpoints on raw ASGI (``/metrics``, ``/events``), and the OpenAI error
shape for routing errors (404, 405, 413). Which requests reach these is the route table's
decision (``routes.py``, which also builds the whole app); 404 versus 405 is asked of it too.
It holds no state of its own: everything comes from the supervisor and the metrics given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qs

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from routerd import __version__, events
from routerd.backends.supervisor import Supervisor
from routerd.errors import NotFound, PayloadTooLarge, RouterdError
from routerd.front.access import Caller, Gate, Receive, Scope, Send, caller_of
from routerd.front.exchange import cancel_on_disconnect
from routerd.front.operations import json_default, unstructure

log = logging.getLogger("routerd.api")

#: Longest a rendered /v1/models body is reused while nothing changed (seconds).
MODELS_VIEW_MAX_AGE = 1.0
#: Seconds of silence after which an /events stream gets a comment (proxies drop idle connections).
EVENTS_KEEPALIVE = 15.0
#: Distinct key scopes whose /v1/models body is kept.
MODELS_VIEWS_KEPT = 64
#: The type of an /events stream's first message (the models now, and the recent requests): not
#: an event on the bus, so not an ``EventType``; the page reads it from ``/ui/event-types.js``.
SNAPSHOT = "snapshot"


def error_response(error: RouterdError) -> Response:
    return Response(json.dumps(error.openai_body()), status=error.status, headers=Headers(error.http_headers()),
                    content_type="application/json")


class MetricsSource(Protocol):
    """What ``GET /metrics`` serves (``routerd.metrics.Metrics``)."""

    content_type: str

    # ``timeout`` bounds each backend's scrape, not the render: a cancel scope cannot say that.
    async def render(self, *, backends: bool, backend_timeout: float) -> bytes: ...


class Observability:
    """``GET /metrics`` (Prometheus text) and ``GET /events`` (server-sent events), on raw ASGI:
    a scrape is frequent and an event stream is long, and neither needs a framework."""

    def __init__(self, supervisor: Supervisor, gate: Gate, metrics: MetricsSource) -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = caller_of(scope)
        try:
            if scope["path"] == "/metrics":
                self.gate.require_admin(caller, "GET /metrics")  # every model's name and load
                settings = self.supervisor.config.metrics
                body = await self.metrics.render(backends=settings.backends, backend_timeout=settings.backend_timeout)
                await send_whole(send, 200, self.metrics.content_type, body)
                return
            query = parse_qs(scope["query_string"].decode("latin-1"))
            with_requests = query.get("requests", ["0"])[-1].lower() in ("1", "true", "yes")
            logs = query.get("logs", [""])[-1] or None
            if logs is not None:  # a model's llama-server lines: a name its key may see
                self.gate.check_model(caller, logs, self.supervisor.catalog.get(logs))
                logs = self.supervisor.catalog.resolve(logs).name
            await self._events(receive, send, caller, with_requests, logs)
        except RouterdError as exc:
            await send_whole(send, exc.status, "application/json", json.dumps(exc.openai_body()).encode(),
                              exc.http_headers())

    async def _events(self, receive: Receive, send: Send, caller: Caller, with_requests: bool,
                      logs: str | None) -> None:
        bus = self.supervisor.bus
        visible = events.visible_to(caller.allows, caller.is_admin)
        with bus.subscribe(requests=with_requests, logs=logs, visible=visible) as subscription:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
                with subscription.scope:  # cut once dropped and its grace is over
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]})
                    snapshot = [{"model": status.name, "state": status.state, "queued": status.queued,
                                 "in_flight": status.in_flight} for status in self.supervisor.status()
                                if caller.allows([status.name, *status.aliases])]
                    recent = [event.to_dict() for event in bus.recent_requests() if visible(event)] \
                        if with_requests else []
                    await _send_event(send, SNAPSHOT, {"type": SNAPSHOT, "models": snapshot, "requests": recent})
                    while True:
                        with trio.move_on_after(EVENTS_KEEPALIVE) as idle:
                            event = await anext(subscription, None)
                        if idle.cancelled_caught:
                            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                        elif event is None:  # dropped, and the final event was read
                            await send({"type": "http.response.body", "body": b"", "more_body": False})
                            break
                        else:
                            await _send_event(send, str(event.seq), event.to_dict())
                nursery.cancel_scope.cancel()


async def _send_event(send: Send, event_id: str, data: dict[str, Any]) -> None:
    body = b"id: " + event_id.encode() + b"\ndata: " + json.dumps(data, default=json_default).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def send_whole(send: Send, status: int, content_type: str, body: bytes,
                      headers: list[tuple[str, str]] | None = None) -> None:
    head = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    head += [(k.lower().encode(), v.encode()) for k, v in headers or []]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def views_app(supervisor: Supervisor, gate: Gate, *, is_wrong_method: Callable[[str, str], bool]) -> QuartTrio:
    """The Quart app of the views (admin adds its routes to it); ``is_wrong_method(method,
    path)`` is the route table's word on 405 versus 404."""
    app = QuartTrio("routerd", static_folder=None)  # no /static/ rule: the page is /ui/ (admin)
    app.config["MAX_CONTENT_LENGTH"] = supervisor.config.server.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "version": __version__, **supervisor.counts()})

    models_view: dict[tuple[str, ...], tuple[int, float, str]] = {}  # the last /v1/models body per scope

    @app.get("/v1/models")
    async def list_models() -> Response:
        # Clients and UIs poll this; with many models rendering it is the cost. Reuse the last
        # body while nothing changed (version) and it is under a second old (measured memory and
        # TTLs move without events). One body per key scope: a key sees only its models.
        caller = caller_of(request.scope)
        view = caller.key.models if caller.key else ()
        now = trio.current_time()
        cached = models_view.get(view)
        if cached and cached[0] == supervisor.version and now - cached[1] < MODELS_VIEW_MAX_AGE:
            return Response(cached[2], content_type="application/json")
        data = []
        for status in supervisor.status():
            if not caller.allows([status.name, *status.aliases]):
                continue
            for shown in [status.name, *status.aliases]:
                entry = {"id": shown, "object": "model", "created": 0, "owned_by": "routerd",
                         **unstructure(status)}
                if shown != status.name:
                    entry["alias_of"] = status.name
                data.append(entry)
        for name, selector in supervisor.config.selectors.items():
            if caller.allows([name]):
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "routerd",
                             "selector": {"strategy": selector.strategy, "targets": list(selector.targets),
                                          "per_target": selector.per_target}})
        body = json.dumps({"object": "list", "data": data}, default=json_default)
        if len(models_view) > MODELS_VIEWS_KEPT:
            models_view.clear()
        models_view[view] = (supervisor.version, now, body)
        return Response(body, content_type="application/json")

    @app.get("/v1/models/<path:model>")
    async def show_model(model: str) -> Response:
        gate.check_model(caller_of(request.scope), model, supervisor.catalog.get(model))
        entry = supervisor.catalog.resolve(model)
        return _json({"id": model, "object": "model", **unstructure(supervisor.model_status(entry))})

    @app.get("/memory")
    async def memory() -> Response:
        # Every model's name and footprint: not for a key scoped to some of them.
        gate.require_admin(caller_of(request.scope), "GET /memory")
        return _json(supervisor.memory_view())

    @app.route("/<path:rest>", methods=["GET"])
    async def unrouted(rest: str) -> Response:
        # Reached by a GET or HEAD the route table gives no other handler.
        if is_wrong_method(request.method, request.path):
            raise MethodNotAllowed(["POST"])
        raise NotFound(f"no route GET /{rest}", code="route_not_found")

    @app.errorhandler(RouterdError)
    async def routerd_error(error: RouterdError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = error.code or 500
        if code == 413:
            return error_response(PayloadTooLarge(
                f"request body exceeds the limit of {supervisor.config.server.max_body_bytes} bytes "
                "(server.max_body_bytes)"))
        if code == 404:
            return error_response(NotFound(f"no route {request.method} {request.path}", code="route_not_found"))
        if code == 405 and not is_wrong_method(request.method, request.path):  # only the GET catch-all matched
            return error_response(NotFound(f"no route {request.method} {request.path}", code="route_not_found"))
        if code == 405:
            err = RouterdError(f"method {request.method} not allowed on {request.path}", code="method_not_allowed")
            err.status, err.type = 405, "invalid_request_error"  # type: ignore[misc]
            return error_response(err)
        err = RouterdError(error.description or error.name, code=error.name.lower().replace(" ", "_"))
        err.status = code  # type: ignore[misc]
        err.type = "invalid_request_error" if code < 500 else "server_error"  # type: ignore[misc]
        return error_response(err)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s from %s", request.method, request.path, request.remote_addr)
        return error_response(RouterdError(f"internal error: {type(error).__name__}"))

    return app


def _json(data: Any) -> Response:
    return Response(json.dumps(data, default=json_default), content_type="application/json")
