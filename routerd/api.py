"""The HTTP front: the proxy's hot path in front of a quart-trio app for everything else.

``create_app`` returns the ASGI app hypercorn serves. Proxied requests go to ``proxy.ProxyApp``;
this module owns the rest: the read-only views (``/v1/models``, ``/health``, ``/memory``), the
OpenAI error shape for routing errors (404, 405, 413). It holds no state of its own: everything
comes from the supervisor passed to ``create_app``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import attrs
import cattrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from routerd import __version__, proxy
from routerd.access import Gate
from routerd.errors import NotFound, PayloadTooLarge, RouterdError
from routerd.supervisor import Supervisor

log = logging.getLogger("routerd.api")
_converter = cattrs.Converter()

#: Longest a rendered /v1/models body is reused while nothing changed (seconds).
MODELS_VIEW_MAX_AGE = 1.0
#: The views this app serves at fixed paths (GET).
VIEW_PATHS = frozenset({"/health", "/v1/models", "/memory"})
#: Distinct key scopes whose /v1/models body is kept.
MODELS_VIEWS_KEPT = 64


def error_response(error: RouterdError) -> Response:
    return Response(json.dumps(error.openai_body()), status=error.status, headers=error.http_headers(),
                    content_type="application/json")


def create_app(supervisor: Supervisor, gate: Gate) -> proxy.ProxyApp:
    """The whole HTTP front as one ASGI app; ``gate`` has checked each request's key before
    any view runs, and the views show a caller only what its key's scope covers."""
    return proxy.ProxyApp(supervisor, gate, fallback=_views_app(supervisor, gate))


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
    return (path in proxy.PROXIED_POST or path in VIEW_PATHS or path.startswith("/v1/models/")
            or proxy.is_proxied("GET", path))


def _json(data: Any) -> Response:
    return Response(json.dumps(data, default=_default), content_type="application/json")


def _default(value: Any) -> Any:
    if attrs.has(type(value)):
        return _converter.unstructure(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
