"""The HTTP front: the proxy's hot path in front of a quart-trio app for everything else.

``create_app`` returns the ASGI app hypercorn serves. Proxied requests go to ``proxy.ProxyApp``;
this module owns the rest: the read-only views (``/v1/models``, ``/health``, ``/memory``), the
two long or hot observability endpoints on raw ASGI (``/metrics``, ``/events``), and the OpenAI
error shape for routing errors (404, 405, 413). It holds no state of its own: everything comes
from the supervisor and the metrics passed to ``create_app``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qs

import attrs
import cattrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from routerd import __version__, events
from routerd.backends.supervisor import Supervisor
from routerd.errors import NotFound, PayloadTooLarge, RouterdError
from routerd.front import admin, proxy
from routerd.front.access import Gate

log = logging.getLogger("routerd.api")
_converter = cattrs.Converter()

#: Longest a rendered /v1/models body is reused while nothing changed (seconds).
MODELS_VIEW_MAX_AGE = 1.0
#: The views this app serves at fixed paths (GET).
VIEW_PATHS = frozenset({"/health", "/v1/models", "/memory", "/metrics", "/events"})
#: Seconds of silence after which an /events stream gets a comment (proxies drop idle connections).
EVENTS_KEEPALIVE = 15.0
#: Distinct key scopes whose /v1/models body is kept.
MODELS_VIEWS_KEPT = 64


def error_response(error: RouterdError) -> Response:
    return Response(json.dumps(error.openai_body()), status=error.status, headers=error.http_headers(),
                    content_type="application/json")


class MetricsSource(Protocol):
    """What ``GET /metrics`` serves (``routerd.metrics.Metrics``)."""

    content_type: str

    async def render(self, *, backends: bool, timeout: float) -> bytes: ...


def create_app(supervisor: Supervisor, gate: Gate, metrics: MetricsSource,
               rescan: Callable[[], Awaitable[Any]]) -> proxy.ProxyApp:
    """The whole HTTP front as one ASGI app; ``gate`` has checked each request's key before
    any view runs, and the views show a caller only what its key's scope covers. ``rescan`` is
    the daemon's (for the page's rescan button)."""
    views = _views_app(supervisor, gate)
    admin.register(views, supervisor, gate, rescan)
    observability = _Observability(supervisor, gate, metrics)

    async def fallback(scope: proxy.Scope, receive: proxy.Receive, send: proxy.Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in ("/metrics", "/events"):
            await observability(scope, receive, send)
        else:
            await views(scope, receive, send)

    return proxy.ProxyApp(supervisor, gate, fallback=fallback)


class _Observability:
    """``GET /metrics`` (Prometheus text) and ``GET /events`` (server-sent events), on raw ASGI:
    a scrape is frequent and an event stream is long, and neither needs a framework."""

    def __init__(self, supervisor: Supervisor, gate: Gate, metrics: MetricsSource) -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.metrics = metrics

    async def __call__(self, scope: proxy.Scope, receive: proxy.Receive, send: proxy.Send) -> None:
        caller = proxy.caller_of(scope)
        try:
            if scope["path"] == "/metrics":
                self.gate.require_admin(caller, "GET /metrics")  # every model's name and load
                settings = self.supervisor.config.metrics
                body = await self.metrics.render(backends=settings.backends, timeout=settings.backend_timeout)
                await _send_whole(send, 200, self.metrics.content_type, body)
                return
            query = parse_qs(scope["query_string"].decode("latin-1"))
            with_requests = query.get("requests", ["0"])[-1].lower() in ("1", "true", "yes")
            logs = query.get("logs", [""])[-1] or None
            if logs is not None:  # a model's llama-server lines: a name its key may see
                self.gate.check_model(caller, logs, self.supervisor.catalog.get(logs))
                logs = self.supervisor.catalog.resolve(logs).name
            await self._events(receive, send, caller, with_requests, logs)
        except RouterdError as exc:
            await _send_whole(send, exc.status, "application/json", json.dumps(exc.openai_body()).encode(),
                              exc.http_headers())

    async def _events(self, receive: proxy.Receive, send: proxy.Send, caller: Any, with_requests: bool,
                      logs: str | None) -> None:
        bus = self.supervisor.bus
        visible = events.visible_to(caller.allows, caller.is_admin)
        with bus.subscribe(requests=with_requests, logs=logs, visible=visible) as subscription:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.cancel_on_disconnect, receive, nursery.cancel_scope)
                with subscription.scope:  # cut once dropped and its grace is over
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]})
                    snapshot = [{"model": status.name, "state": status.state, "queued": status.queued,
                                 "in_flight": status.in_flight} for status in self.supervisor.status()
                                if caller.allows([status.name, *status.aliases])]
                    recent = [event.to_dict() for event in bus.recent_requests() if visible(event)] \
                        if with_requests else []
                    await _send_event(send, "snapshot", {"type": "snapshot", "models": snapshot, "requests": recent})
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


async def _send_event(send: proxy.Send, event_id: str, data: dict[str, Any]) -> None:
    body = b"id: " + event_id.encode() + b"\ndata: " + json.dumps(data, default=str).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _send_whole(send: proxy.Send, status: int, content_type: str, body: bytes,
                      headers: list[tuple[str, str]] | None = None) -> None:
    head = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    head += [(k.lower().encode(), v.encode()) for k, v in headers or []]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _views_app(supervisor: Supervisor, gate: Gate) -> QuartTrio:
    app = QuartTrio("routerd")
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
        caller = proxy.caller_of(request.scope)
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
                         **_converter.unstructure(status)}
                if shown != status.name:
                    entry["alias_of"] = status.name
                data.append(entry)
        for name, selector in supervisor.config.selectors.items():
            if caller.allows([name]):
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "routerd",
                             "selector": {"strategy": selector.strategy, "targets": list(selector.targets),
                                          "per_target": selector.per_target}})
        body = json.dumps({"object": "list", "data": data}, default=_default)
        if len(models_view) > MODELS_VIEWS_KEPT:
            models_view.clear()
        models_view[view] = (supervisor.version, now, body)
        return Response(body, content_type="application/json")

    @app.get("/v1/models/<path:model>")
    async def show_model(model: str) -> Response:
        gate.check_model(proxy.caller_of(request.scope), model, supervisor.catalog.get(model))
        entry = supervisor.catalog.resolve(model)
        return _json({"id": model, "object": "model", **_converter.unstructure(supervisor.model_status(entry))})

    @app.get("/memory")
    async def memory() -> Response:
        # Every model's name and footprint: not for a key scoped to some of them.
        gate.require_admin(proxy.caller_of(request.scope), "GET /memory")
        return _json(supervisor.memory_view())

    @app.route("/<path:rest>", methods=["GET"])
    async def unrouted(rest: str) -> Response:
        # Reached only by what the proxy did not take (see proxy.is_proxied).
        if request.path in proxy.PROXIED_POST:
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
        if code == 405 and not _route_exists(request.path):  # only the GET catch-all matched
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


def _route_exists(path: str) -> bool:
    """Whether some method is served at ``path`` (a wrong method there is 405, not 404)."""
    return (path in proxy.PROXIED_POST or path in VIEW_PATHS or path.startswith(("/v1/models/", "/admin/"))
            or proxy.is_proxied("GET", path))


def _json(data: Any) -> Response:
    return Response(json.dumps(data, default=_default), content_type="application/json")


def _default(value: Any) -> Any:
    if attrs.has(type(value)):
        return _converter.unstructure(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
