"""The route table: for every method and path, which handler serves it; and the app that dispatches on it.

Owns ``route(method, path)`` (pure), the one decision of where a request goes: the proxy's hot
path (the POST routes whose body names a model), passthrough to a backend (``/upstream/...``,
``/{model}/props`` and the like, ``/props?model=M``), the views (``/v1/models``, ``/health``,
``/memory``), ``/events``, ``/metrics``, admin (``/admin/...``), llama.cpp router mode's API
(``/props``, ``/models...``), Ollama's API (``/api/...``), llama.cpp's web UI (``/``), the status
page (``/ui/...``), a wrong method on a known path (405) and what is not found (404). ``Front``
is the ASGI app hypercorn serves: CORS first, then the route, then (for what changes state) the
cross-site check, then the access check, then the handler; ``create_app`` builds it.

The Quart app serves the views, admin, the page and the 404/405 answers; its URL rules must
agree with this table (tests/test_routes.py checks every one). This is the only module that
imports the proxy. It must not serve anything itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from quart_trio import QuartTrio

from routerd.backends.supervisor import Supervisor
from routerd.backends.upstream import first_header
from routerd.errors import Forbidden, RouterdError
from routerd.front import access, admin, api, cors, ollama, router_mode, webui
from routerd.front.access import Gate
from routerd.front.client_io import AsgiBody, AsgiSink, RequestBody, ResponseSink, drain
from routerd.front.exchange import Exchange
from routerd.front.h1_request import Request
from routerd.front.operations import Operations
from routerd.front.proxy import ProxyApp
from routerd.front.requested import MODEL_QUERY_GET, model_in_query


class Surface(enum.Enum):
    """Which handler serves a request."""

    #: POST model routes: the body names the model (``proxy``).
    PROXY = "proxy"
    #: GET ``/upstream/{model}/...`` and ``/{model}/{health,props,slots,metrics}`` (``proxy``).
    PASSTHROUGH = "passthrough"
    #: ``/health``, ``/v1/models``, ``/v1/models/{model}``, ``/memory`` (Quart, ``api``).
    VIEWS = "views"
    #: ``GET /events``, ``GET /metrics`` (raw ASGI, ``api.Observability``).
    EVENTS = "events"
    METRICS = "metrics"
    #: ``/admin/...`` (Quart, ``admin``).
    ADMIN = "admin"
    #: ``/ui`` and ``/ui/{file}`` (Quart, ``admin``).
    PAGE = "page"
    #: llama.cpp router mode's API: ``/props``, ``/models``, ``/models/load|unload`` (Quart,
    #: ``router_mode``), and ``GET /models/sse`` (raw ASGI, ``router_mode.ModelEvents``).
    ROUTER = "router"
    MODEL_EVENTS = "model_events"
    #: Ollama's API: every method on ``/api/...`` (``ollama``; chat, generate and embeddings
    #: through the proxy).
    OLLAMA = "ollama"
    #: ``/``: llama.cpp's web UI from the llama-server routerd runs, else routerd's page (``webui``).
    WEBUI = "webui"
    #: OPTIONS without a CORS preflight: Quart's automatic answer with ``Allow``.
    METHODS = "methods"
    #: A path some route serves, with another method: 405 (Quart's error handler).
    WRONG_METHOD = "wrong_method"
    #: 404 (Quart's error handler).
    NOT_FOUND = "not_found"


@attrs.frozen
class Route:
    """Where one request goes; the proxied ones also say how they are counted and queued."""

    surface: Surface
    #: The route a proxied request is counted under: a fixed set, never client text.
    label: str = "other"
    #: Whether a proxied request takes one of the backend's slots (and so waits its turn in the
    #: model's queue) or is answered beside them (reads, the tokenizer routes).
    queued: bool = False
    #: Whether llama-server finishes the request's work even when its client has left (one
    #: batch per request, nothing to stop between tokens).
    runs_to_end: bool = False
    #: Whether it changes what runs or what is stored (loads, unloads, pulls, deletes, resets):
    #: a browser may send it only from routerd's own page (``access.cross_site``).
    changes_state: bool = False

    @property
    def proxied(self) -> bool:
        return self.surface is Surface.PROXY or self.surface is Surface.PASSTHROUGH


#: POST routes proxied to the backend named by the body's "model".
PROXIED_POST = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/rerank", "/v1/reranking",
    "/reranking", "/completion", "/completions", "/infill", "/tokenize", "/detokenize", "/apply-template",
    "/embedding", "/embeddings", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
    "/chat/completions", "/v1/audio/transcriptions", "/v1/audio/translations"})
#: POST routes llama-server answers on its HTTP threads, without a slot: they skip the queue
#: (a /tokenize never waits behind a long generation).
SLOT_FREE_POST = frozenset({"/tokenize", "/detokenize", "/apply-template", "/v1/messages/count_tokens"})
#: POST routes whose work llama-server does in one batch, which a client leaving cannot stop.
BATCH_POST = frozenset({"/v1/embeddings", "/embedding", "/embeddings", "/v1/rerank", "/rerank", "/v1/reranking",
                        "/reranking"})
#: GET endpoints of a backend reachable as /{model}/{endpoint} (the seed's convention).
SHORT_UPSTREAM_GET = frozenset({"health", "props", "slots", "metrics"})
#: Fixed paths served on GET (and HEAD, but for /metrics and /events) by the views.
VIEW_PATHS = frozenset({"/health", "/v1/models", "/memory", "/metrics", "/events"})
#: Router mode's model-management paths.
ROUTER_PATHS = frozenset({"/props", "/models", "/models/load", "/models/unload", "/models/sse"})
#: GET paths under this prefix belong to the model views, whatever their last segment.
_MODEL_VIEW_PREFIX = "/v1/models/"
_ADMIN_MODELS_PREFIX = "/admin/models/"

# One value per outcome, made once: routing a request allocates nothing.
_PROXIED = {path: Route(Surface.PROXY, path, path not in SLOT_FREE_POST, path in BATCH_POST) for path in PROXIED_POST}
_UPSTREAM = Route(Surface.PASSTHROUGH, "/upstream")
_SHORT_UPSTREAM = {endpoint: Route(Surface.PASSTHROUGH, "/{model}/" + endpoint) for endpoint in SHORT_UPSTREAM_GET}
_VIEWS = Route(Surface.VIEWS)
_ADMIN = Route(Surface.ADMIN)
_ADMIN_ACTION = Route(Surface.ADMIN, changes_state=True)
_ROUTER = Route(Surface.ROUTER)
_ROUTER_ACTION = Route(Surface.ROUTER, changes_state=True)
_ROUTER_ACTIONS = {"/models/load": _ROUTER_ACTION, "/models/unload": _ROUTER_ACTION, "/models": _ROUTER_ACTION}
_BY_QUERY = {path: Route(Surface.PASSTHROUGH, path + "?model") for path in MODEL_QUERY_GET}
_PAGE = Route(Surface.PAGE)
_METHODS = Route(Surface.METHODS)
_WRONG_METHOD = Route(Surface.WRONG_METHOD)
_NOT_FOUND = Route(Surface.NOT_FOUND)
#: GET only: HEAD on these is not found (their handlers are raw ASGI, not Quart's GET rules).
_GET_ONLY = {"/metrics": Route(Surface.METRICS), "/events": Route(Surface.EVENTS),
             "/models/sse": Route(Surface.MODEL_EVENTS)}
#: GET and HEAD (Quart answers HEAD for its GET rules).
#: Ollama's API (``/api/...``): its calls counted, queued and finished like the OpenAI routes
#: they become; anything else there is Ollama's 404.
_OLLAMA = {("POST", "/api/chat"): Route(Surface.OLLAMA, "/api/chat", queued=True),
           ("POST", "/api/generate"): Route(Surface.OLLAMA, "/api/generate", queued=True),
           ("POST", "/api/embed"): Route(Surface.OLLAMA, "/api/embed", queued=True, runs_to_end=True),
           ("POST", "/api/embeddings"): Route(Surface.OLLAMA, "/api/embeddings", queued=True, runs_to_end=True),
           ("POST", "/api/pull"): Route(Surface.OLLAMA, "/api/pull", changes_state=True)}
_OLLAMA_OTHER = Route(Surface.OLLAMA, "/api")
_READS = {"/health": _VIEWS, "/v1/models": _VIEWS, "/memory": _VIEWS, "/ui": _PAGE, "/ui/": _PAGE,
          "/admin/whoami": _ADMIN, "/props": _ROUTER, "/models": _ROUTER, "/": Route(Surface.WEBUI)}


def route(method: str, path: str, model_query: bool = False) -> Route:
    """Where ``method path`` goes (pure). ``path`` is the decoded ASGI path; ``model_query``
    whether its query names a model (``?model=``)."""
    if path.startswith("/api/") and method != "OPTIONS":
        return _OLLAMA.get((method, path), _OLLAMA_OTHER)
    if method == "POST":
        proxied = _PROXIED.get(path)
        if proxied is not None:
            return proxied
        if path == "/admin/rescan" or _admin_action(path):
            return _ADMIN_ACTION
        action = _ROUTER_ACTIONS.get(path)
        if action is not None:
            return action
    elif method == "DELETE" and path == "/models":
        return _ROUTER_ACTION
    elif method == "GET" or method == "HEAD":
        if method == "GET":
            if model_query and path in MODEL_QUERY_GET:
                return _BY_QUERY[path]
            fixed = _GET_ONLY.get(path)
            if fixed is not None:
                return fixed
            passthrough = _passthrough(path)
            if passthrough is not None:
                return passthrough
        read = _READS.get(path)
        if read is not None:
            return read
        if path.startswith(_MODEL_VIEW_PREFIX) and len(path) > len(_MODEL_VIEW_PREFIX):
            return _VIEWS
        if path.startswith("/ui/") and "/" not in path[4:]:
            return _PAGE
        if _admin_logs(path):
            return _ADMIN
        # Quart's GET catch-all: 405 only for the POST model routes.
        return _WRONG_METHOD if path in PROXIED_POST else _NOT_FOUND
    elif method == "OPTIONS":
        return _NOT_FOUND if path == "/" else _METHODS  # Quart answers OPTIONS on every rule's path
    return _WRONG_METHOD if _served_somehow(path) else _NOT_FOUND


def is_proxied(method: str, path: str) -> bool:
    """Whether a request goes to a backend (pure)."""
    return route(method, path).proxied


def is_wrong_method(method: str, path: str) -> bool:
    """Whether ``method path`` is a 405 rather than a 404 (pure; the views' error handler asks)."""
    return route(method, path).surface is Surface.WRONG_METHOD


def _passthrough(path: str) -> Route | None:
    if path.startswith("/upstream/"):
        return _UPSTREAM
    if path.startswith(_MODEL_VIEW_PREFIX):
        return None
    model, _, endpoint = path[1:].rpartition("/")
    return _SHORT_UPSTREAM.get(endpoint) if model else None


def _admin_logs(path: str) -> bool:
    """``/admin/models/{model}/logs``, the model's name possibly with slashes."""
    model = path[len(_ADMIN_MODELS_PREFIX):-len("/logs")]
    return path.startswith(_ADMIN_MODELS_PREFIX) and path.endswith("/logs") and _model_segment(model)


def _admin_action(path: str) -> bool:
    """``/admin/models/{model}/{action}``."""
    if not path.startswith(_ADMIN_MODELS_PREFIX):
        return False
    model, _, action = path[len(_ADMIN_MODELS_PREFIX):].rpartition("/")
    return bool(action) and _model_segment(model)


def _model_segment(model: str) -> bool:
    """Whether a path's model part is one Quart's ``<path:...>`` converter takes."""
    return bool(model) and not model.startswith("/")


def _served_somehow(path: str) -> bool:
    """Whether some method is served at ``path`` (so another method there is 405, not 404)."""
    return (path in PROXIED_POST or path in VIEW_PATHS or path in ROUTER_PATHS
            or path.startswith((_MODEL_VIEW_PREFIX, "/admin/"))
            or _passthrough(path) is not None)


class Front:
    """Every request passes CORS, is routed by ``route``, passes the access check and goes to
    its handler: the proxy, the observability endpoints or the Quart app. routerd's own HTTP/1.1
    connections call ``handle``; hypercorn (HTTP/2) calls the ASGI entry, ``__call__``."""

    def __init__(self, supervisor: Supervisor, gate: Gate, proxy: ProxyApp, observability: api.Observability,
                 views: QuartTrio) -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.proxy = proxy
        self.observability = observability
        self.model_events = router_mode.ModelEvents(supervisor)
        self.webui = webui.WebUI(supervisor)
        self.ollama = ollama.Ollama(proxy)
        self.views = views

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":  # lifespan: Quart's
            await self.views(scope, receive, send)
            return
        sink = AsgiSink(send)
        await self._serve(scope, AsgiBody(receive), sink, lambda: (receive, sink.asgi_send()))

    async def handle(self, scope: HTTPScope, request: Request) -> None:
        """One request on routerd's own HTTP/1.1 connection (``h1_connection``)."""
        await self._serve(scope, request, request, request.asgi)

    async def _serve(self, scope: HTTPScope, body: RequestBody, sink: ResponseSink,
                     asgi: Callable[[], tuple[ASGIReceiveCallable, ASGISendCallable]]) -> None:
        config = self.supervisor.config
        server = config.server
        if server.cors_origins:
            allowed = cors.allowed_origin(first_header(scope["headers"], b"origin"), server.cors_origins)
            if scope["method"] == "OPTIONS" and first_header(scope["headers"], b"access-control-request-method"):
                await cors.answer_preflight(sink, allowed)
                return
            if allowed:
                sink.add_headers(cors.response_headers(allowed))
        query = scope["query_string"]
        found = route(scope["method"], scope["path"], bool(query) and model_in_query(query) is not None)
        surface = found.surface
        if surface is Surface.PROXY or surface is Surface.PASSTHROUGH:
            await self.proxy.serve(scope, body, sink, found.label, found.queued, found.runs_to_end)
            return
        try:
            if found.changes_state:
                refused = access.cross_site(scope["headers"])
                if refused is not None:
                    raise Forbidden(f"{scope['method']} {scope['path']} changes what routerd runs or stores, and this "
                                    f"request comes from another site's page ({refused}): only routerd's own page "
                                    "may send it from a browser", code="cross_site_request")
            access.check_request(self.gate, scope, max_headers=server.max_headers, metrics_open=config.metrics.open)
        except RouterdError as exc:
            await drain(body)
            await (ollama.fail(sink, exc) if surface is Surface.OLLAMA else Exchange(sink).fail(exc))
            return
        if surface is Surface.OLLAMA:
            await self.ollama.serve(scope, body, sink, found.label, found.queued, found.runs_to_end)
            return
        receive, send = asgi()
        if surface is Surface.METRICS or surface is Surface.EVENTS:
            await self.observability(scope, receive, send)
        elif surface is Surface.MODEL_EVENTS:
            await self.model_events(scope, receive, send)
        elif surface is Surface.WEBUI:
            await self.webui(scope, receive, send)
        else:
            await self.views(scope, receive, send)


def create_app(operations: Operations, metrics: api.MetricsSource) -> Front:
    """The whole HTTP front as one ASGI app, over ``operations``' supervisor and gate (one of
    each, shared with the control socket): the gate has checked each request's key before any
    view runs, the views show a caller only what its key's scope covers, and the admin API runs
    ``operations``."""
    supervisor, gate = operations.supervisor, operations.gate
    views = api.views_app(supervisor, gate, is_wrong_method=is_wrong_method)
    admin.register(views, operations)
    router_mode.register(views, operations)
    front = Front(supervisor, gate, ProxyApp(supervisor, gate), api.Observability(supervisor, gate, metrics), views)
    front.ollama.operations = operations  # /api/pull
    return front
