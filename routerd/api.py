"""The HTTP front: OpenAI-compatible and llama-server routes on a quart-trio app.

Owns routing, reading the ``model`` out of request bodies, the OpenAI error shape for every
error, and the read-only views (``/v1/models``, ``/health``, ``/memory``, upstream GETs). It holds
no state of its own: everything comes from the supervisor passed to ``create_app``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import attrs
import cattrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from routerd import __version__, proxy, scheduler
from routerd.backend import Backend
from routerd.errors import BadRequest, NotFound, PayloadTooLarge, RouterdError
from routerd.supervisor import Supervisor

log = logging.getLogger("routerd.api")
_converter = cattrs.Converter()

#: POST routes proxied to the backend named by the body's "model".
PROXIED_POST = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/rerank",
                "/v1/reranking", "/reranking", "/completion", "/completions", "/infill", "/tokenize",
                "/detokenize", "/apply-template", "/embedding", "/embeddings", "/v1/responses",
                "/v1/messages", "/v1/messages/count_tokens", "/chat/completions")
#: Longest a rendered /v1/models body is reused while nothing changed (seconds).
MODELS_VIEW_MAX_AGE = 1.0
#: GET endpoints of a backend reachable as /{model}/{endpoint} (the seed's convention).
SHORT_UPSTREAM_GET = ("health", "props", "slots", "metrics")


def error_response(error: RouterdError) -> Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return Response(json.dumps(error.openai_body()), status=error.status, headers=headers,
                    content_type="application/json")


def model_and_stream(body: bytes) -> tuple[str, bool]:
    """The ``model`` field of a JSON request body (400 when missing or malformed), and whether
    it asks for a stream."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the request has no 'model' field: name the model to use (GET /v1/models lists them)",
                         code="missing_model")
    return model, payload.get("stream") is True


def create_app(supervisor: Supervisor) -> QuartTrio:
    app = QuartTrio("routerd")
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as they last
    app.config["MAX_CONTENT_LENGTH"] = supervisor.config.server.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    async def relay(model: str, method: str, path: str, body: bytes, *, stream: bool = False) -> Response:
        priority = scheduler.parse_priority(request.headers.get(scheduler.PRIORITY_HEADER))
        ticket = supervisor.enqueue(model, priority)  # 429 here, before any byte is sent
        backend = None
        try:
            with trio.move_on_after(supervisor.config.scheduler.keepalive_interval if stream else math.inf):
                backend = await supervisor.acquire_ticket(model, ticket)
        finally:
            supervisor.dequeue(model, ticket)
        if backend is None:
            # A streaming client still waiting (its model is loading or busy): answer now with an
            # event stream kept alive by SSE comments until its turn. The ticket keeps its place.
            return _stream_response(_keepalive_then_relay(model, ticket, method, path, body,
                                                          list(request.headers.items()), request.query_string))
        return await _forward(backend, method, path, body)

    async def _forward(backend: Backend, method: str, path: str, body: bytes) -> Response:
        upstream = await proxy.open_upstream(backend, method, path, headers=request.headers.items(),
                                             body=body, query=request.query_string)
        if not upstream.is_event_stream:  # a whole answer: a backend dying mid-body is a clean 502
            return Response(await upstream.read_all(), status=upstream.status, headers=upstream.headers())
        response = Response(upstream, status=upstream.status, headers=upstream.headers())
        response.timeout = None
        return response

    async def _keepalive_then_relay(model: str, ticket: scheduler.Ticket, method: str, path: str, body: bytes,
                                    headers: list[tuple[str, str]], query: bytes) -> AsyncIterator[bytes]:
        supervisor.requeue(model, ticket)  # only once the stream runs: nothing is left queued otherwise
        try:
            while True:
                with trio.move_on_after(supervisor.config.scheduler.keepalive_interval):
                    backend = await supervisor.acquire_ticket(model, ticket)
                    break
                yield b": waiting for " + model.encode() + b"\n\n"
            upstream = await proxy.open_upstream(backend, method, path, headers=headers, body=body, query=query)
            whole = None if upstream.is_event_stream else await upstream.read_all()
        except RouterdError as exc:  # the status line is sent: report in-band, as OpenAI streams do
            yield proxy.sse_error(exc)
            return
        finally:
            supervisor.dequeue(model, ticket)
        if whole is not None:  # the backend answered without a stream (an error): one event
            yield b"data: " + whole.strip() + b"\n\n"
            return
        async with aclosing(upstream):
            async for chunk in upstream:
                yield chunk

    async def proxied_post() -> Response:
        limit = supervisor.config.server.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {limit} "
                                  "(server.max_body_bytes)")
        body = await request.get_data(cache=False)
        model, stream = model_and_stream(body)
        return await relay(model, "POST", request.path, body, stream=stream)

    for path in PROXIED_POST:
        app.add_url_rule(path, f"proxy {path}", proxied_post, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "version": __version__, **supervisor.counts()})

    models_view: dict[str, tuple[int, float, str]] = {}  # the last /v1/models body, by version

    @app.get("/v1/models")
    async def list_models() -> Response:
        # Clients and UIs poll this; with many models rendering it is the cost. Reuse the last
        # body while nothing changed (version) and it is under a second old (measured memory and
        # TTLs move without events).
        now = trio.current_time()
        cached = models_view.get("body")
        if cached and cached[0] == supervisor.version and now - cached[1] < MODELS_VIEW_MAX_AGE:
            return Response(cached[2], content_type="application/json")
        data = []
        for status in supervisor.status():
            for shown in [status.name, *status.aliases]:
                entry = {"id": shown, "object": "model", "created": 0, "owned_by": "routerd",
                         **_converter.unstructure(status)}
                if shown != status.name:
                    entry["alias_of"] = status.name
                data.append(entry)
        body = json.dumps({"object": "list", "data": data}, default=_default)
        models_view["body"] = (supervisor.version, now, body)
        return Response(body, content_type="application/json")

    @app.get("/v1/models/<path:model>")
    async def show_model(model: str) -> Response:
        entry = supervisor.catalog.resolve(model)
        return _json({"id": model, "object": "model", **_converter.unstructure(supervisor.model_status(entry))})

    @app.get("/memory")
    async def memory() -> Response:
        return _json(supervisor.memory_view())

    @app.route("/upstream/<path:rest>", methods=["GET"])
    async def upstream(rest: str) -> Response:
        model, sub = split_model_path(rest, supervisor)
        return await relay(model, "GET", "/" + sub, b"")

    @app.route("/<path:rest>", methods=["GET"])
    async def short_upstream(rest: str) -> Response:
        if request.path in PROXIED_POST:
            raise MethodNotAllowed(["POST"])
        model, _, endpoint = rest.rpartition("/")
        if endpoint not in SHORT_UPSTREAM_GET or not model:
            raise NotFound(f"no route GET /{rest}", code="route_not_found")
        return await relay(model, "GET", "/" + endpoint, b"")

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
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RouterdError(f"internal error: {type(error).__name__}"))

    return app


def split_model_path(rest: str, supervisor: Supervisor) -> tuple[str, str]:
    """Split ``/upstream/{model}/{path}``: the longest known model name or alias wins, so names
    with ``/`` and ``:`` (``org/repo:Q4_K_M``) are unambiguous."""
    best = ""
    for name, _ in supervisor.catalog.names_and_aliases():
        if rest.startswith(name + "/") and len(name) > len(best):
            best = name
    if not best:
        head = rest.split("/", 1)[0]
        supervisor.catalog.resolve(head)  # raises UnknownModel with suggestions
        best = head
    return best, rest[len(best) + 1:]


def _stream_response(chunks: AsyncIterator[bytes]) -> Response:
    response = Response(chunks, status=200, content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response


def _json(data: Any) -> Response:
    return Response(json.dumps(data, default=_default), content_type="application/json")


def _default(value: Any) -> Any:
    if attrs.has(type(value)):
        return _converter.unstructure(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
