"""llama.cpp router mode's model-management API, answered by routerd.

Tools built for ``llama-server`` in router mode (its web UI, dashboards, editor plugins) list
models with ``GET /models``, load and unload them with ``POST /models/load`` and
``/models/unload``, pull and delete with ``POST /models`` and ``DELETE /models?model=``, follow
``GET /models/sse`` and read ``GET /props`` to learn they face a router. This module answers those
with router mode's shapes (``{"success": true}``, ``status.value`` of ``loaded``, ``loading``,
``unloaded`` or ``failed``), each model's entry carrying routerd's own fields besides. ``GET
/props?model=M`` and ``GET /metrics?model=M`` go to that model's llama-server (the proxy).

Every action is an operation (``front/operations.py``), the one routerctl runs: the memory
budget, groups and queues decide what actually runs, and the answer says what happened (a load
is ``loaded``, ``loading`` or ``queued`` for room; a refusal is an error in the OpenAI shape).
The state-changing calls need an admin key, or the local user (``Gate.require_admin_key``); the
route table has refused cross-site browser requests before these run. Nothing is decided here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from routerd import __version__, events
from routerd.backends.status import ModelStatus
from routerd.backends.supervisor import Supervisor
from routerd.errors import BadRequest
from routerd.events import EventType
from routerd.front.access import Caller, Gate, Receive, Scope, Send, caller_of
from routerd.front.admin import acting_caller
from routerd.front.api import EVENTS_KEEPALIVE
from routerd.front.exchange import cancel_on_disconnect
from routerd.front.operations import Operations, json_default, unstructure

#: routerd's model states as router mode words them (a stopping model takes no new request).
ROUTER_STATUS = {"ready": "loaded", "starting": "loading", "stopping": "unloaded", "unloaded": "unloaded",
                 "failed": "failed", "reachable": "loaded", "unreachable": "unloaded", "unknown": "unloaded"}
#: The events ``/models/sse`` sends, by routerd's event type: router mode's names, and the
#: ``status`` each puts in its ``data`` (None: not a model state).
SSE_EVENTS: dict[EventType, tuple[str, str | None]] = {
    EventType.MODEL_LOADING: ("model_status", "loading"), EventType.MODEL_PROGRESS: ("status_change", "loading"),
    EventType.MODEL_READY: ("status_change", "loaded"), EventType.MODEL_STOPPED: ("status_change", "unloaded"),
    EventType.MODEL_FAILED: ("status_change", "unloaded"), EventType.MODEL_CRASH_LOOP: ("status_change", "unloaded"),
    EventType.MODEL_LOAD_REFUSED: ("status_change", "unloaded"), EventType.PULL_PROGRESS: ("download_progress", None),
    EventType.PULL_DONE: ("download_finished", None), EventType.PULL_FAILED: ("download_failed", None),
    EventType.MODEL_REMOVED: ("model_removed", None)}
#: The events that say a load failed (router mode marks them ``failed``).
_FAILURES = frozenset({EventType.MODEL_FAILED, EventType.MODEL_CRASH_LOOP, EventType.MODEL_LOAD_REFUSED})
_VERSION_RE = re.compile(r"^(\S+)\s*\((?:build\s+)?([^,)]+)(?:,\s*(?:commit\s+)?([^)]+))?\)")


def build_info(llama_server_version: str) -> str:
    """llama-server's ``--version`` as router mode's ``build_info`` (pure): ``b{build}-{commit}``.

    >>> build_info("7123 (a1b2c3d)")
    'b7123-a1b2c3d'
    >>> build_info("0.6.0-dev (build 0, commit unknown)")
    'b0-unknown'
    """
    match = _VERSION_RE.match(llama_server_version)
    if match is None:
        return llama_server_version
    first, second, third = match.groups()
    if third is None:  # llama.cpp's own "BUILD (COMMIT)"
        return f"b{first}-{second.strip()}"
    return f"b{second.strip()}-{third.strip()}"


def model_entry(status: ModelStatus, args: list[str], multimodal: bool = False) -> dict[str, Any]:
    """One model as router mode's ``GET /models`` lists it, routerd's fields beside (pure);
    ``multimodal``: it has a projector (images in)."""
    value = ROUTER_STATUS.get(status.state, "unloaded")
    state: dict[str, Any] = {"value": value, "args": args}
    if value == "failed" or (status.exit_code not in (None, 0) and value == "unloaded"):
        state.update(failed=True, exit_code=status.exit_code, error=status.last_error)
    return {**unstructure(status), "id": status.name, "object": "model", "owned_by": "routerd", "created": 0,
            "tags": [], "architecture": {"input_modalities": ["text", "image"] if multimodal else ["text"],
                                         "output_modalities": ["text"]},
            "in_cache": status.source == "hf-cache", "can_remove": status.source == "hf-cache", "status": state}


def sse_message(event: events.Event) -> dict[str, Any] | None:
    """An event as ``/models/sse`` sends it (pure): router mode's ``{"model", "event", "data":
    {"status", ...}}``, routerd's fields in ``data`` beside; None for one it does not send."""
    found = SSE_EVENTS.get(event.type)
    if found is None:
        return None
    name, status = found
    data: dict[str, Any] = {"time": event.time, **{k: v for k, v in event.data.items() if k != "model"}}
    if status is not None:
        data["status"] = status
    if event.type in _FAILURES:
        data["failed"] = True
    if event.type is EventType.MODEL_READY:
        data["info"] = {"id": event.model, "object": "model", "owned_by": "routerd"}
    return {"model": event.model, "event": name, "data": data}


def register(app: QuartTrio, operations: Operations) -> None:
    """Add router mode's routes to the views app; each action runs ``operations``."""
    supervisor, gate = operations.supervisor, operations.gate

    @app.get("/props")
    async def router_props() -> Response:
        config = supervisor.config
        local = sum(1 for entry in supervisor.catalog if not entry.remote)
        # Router mode's own fields, as it answers them with no model (clients read role and
        # models_autoload; the rest is there so that none finds a field missing).
        return _json({"role": "router", "max_instances": config.backend.max_loaded_models or local,
                      "models_autoload": config.scheduler.autoload, "model_alias": "routerd", "model_path": "none",
                      "default_generation_settings": {"params": None, "n_ctx": 0}, "ui_settings": {},
                      "cors_proxy_enabled": False, "build_info": build_info(operations.llama_server_version),
                      "routerd": {"version": __version__, "llama_server": operations.llama_server_version,
                                  "max_loaded_models": config.backend.max_loaded_models}})

    @app.get("/models")
    async def router_models() -> Response:
        caller = caller_of(request.scope)
        data = []
        for status in supervisor.status():
            if caller.allows([status.name, *status.aliases]):
                entry = supervisor.catalog.get(status.name)
                data.append(model_entry(status, _args(supervisor, status), bool(entry and entry.mmproj)))
        return _json({"object": "list", "data": data})

    @app.post("/models/load")
    async def router_load() -> Response:
        model = await _model_of_body(gate, "POST /models/load", supervisor)
        running = supervisor.running(supervisor.catalog.resolve(model).name)
        if running is not None and not running.stop_requested:  # router mode's 400, in the OpenAI shape
            raise BadRequest(f"model {model!r} is already {'loaded' if running.accepting else 'loading'}",
                             code="model_already_running")
        result = await operations.request_load(model)
        return _json({"success": True, "model": result.model, "status": result.status, "message": result.message})

    @app.post("/models/unload")
    async def router_unload() -> Response:
        model = await _model_of_body(gate, "POST /models/unload", supervisor)
        if supervisor.running(supervisor.catalog.resolve(model).name) is None:
            raise BadRequest(f"model {model!r} is not running", code="model_not_running")
        result = await operations.unload(model)
        return _json({"success": True, **unstructure(result)})

    @app.post("/models")
    async def router_pull() -> Response:
        ref = await _model_of_body(gate, "POST /models")
        operations.pull_soon(ref)
        return _json({"success": True, "model": ref, "message": f"downloading {ref}: follow GET /models/sse"})

    @app.delete("/models")
    async def router_remove() -> Response:
        caller = acting_caller(gate, "DELETE /models")
        model = request.args.get("model", "")
        if not model:
            raise BadRequest("name the model to remove: DELETE /models?model=NAME", code="missing_model")
        gate.check_model(caller, model, supervisor.catalog.get(model))
        result = await operations.remove(model)
        return _json({"success": True, **unstructure(result)})


class ModelEvents:
    """``GET /models/sse``: model state changes, loading progress and downloads as router mode
    streams them (``data: {"event": ..., "model": ...}``), on raw ASGI like ``/events``."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller: Caller = caller_of(scope)
        bus = self.supervisor.bus
        with bus.subscribe(visible=events.visible_to(caller.allows, caller.is_admin)) as subscription:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, receive, nursery.cancel_scope)
                with subscription.scope:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]})
                    while True:
                        with trio.move_on_after(EVENTS_KEEPALIVE) as idle:
                            event = await anext(subscription, None)
                        if idle.cancelled_caught:
                            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                            continue
                        if event is None:
                            await send({"type": "http.response.body", "body": b"", "more_body": False})
                            break
                        message = sse_message(event)
                        if message is not None:
                            data = json.dumps(message, default=json_default).encode()
                            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n",
                                        "more_body": True})
                nursery.cancel_scope.cancel()


def _args(supervisor: Supervisor, status: ModelStatus) -> list[str]:
    """The llama-server arguments the model runs (or would run) with."""
    backend = supervisor.running(status.name) if status.pid is not None else None
    if backend is not None and backend.port is not None:
        return backend.spec.argv(backend.port)[1:]
    entry = supervisor.catalog.get(status.name)
    if entry is None or entry.remote:
        return []
    argv = supervisor.placement.spec(entry).argv(0)[1:]
    port = argv.index("--port")
    return argv[:port] + argv[port + 2:]  # chosen when it starts


async def _model_of_body(gate: Gate, action: str, supervisor: Supervisor | None = None) -> str:
    """The ``model`` of a router-mode action's JSON body, once its caller may act; with
    ``supervisor``, one of its models the caller's key may see."""
    caller = acting_caller(gate, action)
    try:
        body = json.loads(await request.get_data(as_text=False) or b"{}")
    except ValueError as exc:
        raise BadRequest(f"{action}: the body is not JSON ({exc}); send {{\"model\": \"NAME\"}}",
                         code="invalid_json") from None
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest(f"{action}: name the model, as {{\"model\": \"NAME\"}}", code="missing_model")
    if supervisor is not None:
        gate.check_model(caller, model, supervisor.catalog.get(model))
    return model


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=json_default), status=status, content_type="application/json")

