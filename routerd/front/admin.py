"""The status page and the admin HTTP API: what routerctl shows and does, for a browser.

Owns ``/ui/`` (the page: static files shipped in this package, no build step, no CDN, and
``/ui/event-types.js``, the event types' names made from ``events.EventType``, so the page
compares ``EVENT.*`` and never spells a type itself),
``/admin/whoami`` (what the page may offer), a model's recent llama-server lines
(``/admin/models/{model}/logs``; ``/events?logs=MODEL`` follows them) and the actions:
load, unload, reset and rescan. Each action is the operation routerctl runs
(``front/operations.py``) and answers the same fields; it needs an admin key, or the local user
(routerd on loopback only, no key made: ``Gate.local_user``), never an anonymous visitor from
elsewhere, and is logged with the key's name. A browser may send the actions only from this
page (the route table refuses cross-site ones). It must not decide anything itself.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

from quart import Response, request
from quart_trio import QuartTrio

from routerd.errors import BadRequest, NotFound
from routerd.events import EventType
from routerd.front.access import Caller, Gate, caller_of
from routerd.front.api import SNAPSHOT
from routerd.front.operations import Operations, json_default

log = logging.getLogger("routerd.admin")
#: The page's files, by name, with their content types.
UI_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
            "playground.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
MAX_LOG_LINES = 2000
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: The page's own headers: its files change only with routerd, so revalidate (an upgrade shows
#: at once); it runs only its own script and talks only to this routerd.
PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def event_types_module() -> str:
    """``/ui/event-types.js`` (pure): an ES module exporting ``EVENT``, every ``EventType`` by
    member name (``EVENT.MODEL_READY === "model.ready"``), frozen, and ``SNAPSHOT``, the type of
    the first message of ``GET /events``."""
    names = json.dumps({member.name: member.value for member in EventType}, indent=2)
    return ("// Made by routerd from routerd.events.EventType, the one definition of the event types.\n"
            f"export const EVENT = Object.freeze({names});\n"
            "// The first message of GET /events: the models, and the recent requests.\n"
            f"export const SNAPSHOT = {json.dumps(SNAPSHOT)};\n")


_EVENT_TYPES_JS = event_types_module().encode()


def register(app: QuartTrio, operations: Operations) -> None:
    """Add the page and the admin routes to the views app; the actions run ``operations``, and
    the checks use the gate and the catalog those work on."""
    supervisor, gate = operations.supervisor, operations.gate

    @app.get("/ui")
    async def ui_root() -> Response:
        return Response("", status=308, headers={"Location": "/ui/"})

    @app.get("/ui/")
    @app.get("/ui/<name>")
    async def ui_file(name: str = "index.html") -> Response:
        if name not in UI_FILES:
            raise NotFound(f"no file /ui/{name}", code="route_not_found")
        body = resources.files("routerd.front").joinpath("ui", name).read_bytes()
        return Response(body, content_type=UI_FILES[name], headers=PAGE_HEADERS)

    @app.get("/ui/event-types.js")
    async def event_types() -> Response:
        return Response(_EVENT_TYPES_JS, content_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/admin/whoami")
    async def whoami() -> Response:
        caller = caller_of(request.scope)
        local_user = caller.key is None and gate.local_user(request.scope["headers"])
        return _json({"key": caller.key.name if caller.key else None,
                      "admin": local_user or (caller.key is not None and caller.key.admin),
                      "keys_required": gate.required, "local_user": local_user})

    @app.get("/admin/models/<path:model>/logs")
    async def logs(model: str) -> Response:
        caller = caller_of(request.scope)
        gate.check_model(caller, model, supervisor.catalog.get(model))
        return _json(await operations.logs(model, _int_arg("lines", 100, 0, MAX_LOG_LINES)))

    @app.post("/admin/models/<path:model>/<action>")
    async def act(model: str, action: str) -> Response:
        caller = acting_caller(gate, f"POST /admin/models/{{model}}/{action}")
        entry = supervisor.catalog.resolve(model)
        log.info("admin: %s %s by key %r", action, entry.name, caller.name)
        if action == "load":
            return _json(await operations.load(entry.name))
        if action == "unload":
            return _json(await operations.unload(entry.name))
        if action == "reset":
            return _json(operations.reset(entry.name))
        raise NotFound(f"no action {action!r}: load, unload or reset", code="route_not_found")

    @app.post("/admin/rescan")
    async def rescan_models() -> Response:
        caller = acting_caller(gate, "POST /admin/rescan")
        log.info("admin: rescan by key %r", caller.name)
        return _json(await operations.rescan())


def acting_caller(gate: Gate, action: str) -> Caller:
    """The caller of a state-changing request, once it may act (an admin key, or the local
    user): the admin API's and router mode's one check."""
    caller = caller_of(request.scope)
    gate.require_admin_key(caller, action, request.scope["headers"])
    return caller


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name}={raw!r}: give a whole number from {low} to {high}", code="invalid_parameter")
    return int(raw)


def _json(result: object) -> Response:
    return Response(json.dumps(result, default=json_default), content_type="application/json")
