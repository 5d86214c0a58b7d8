"""Ollama's API on routerd's port: ``/api/*`` answered in Ollama's shapes, served by llama-server.

Owns answering Ollama's clients: the listings (``GET /api/version``, ``/api/tags``, ``/api/ps``,
``POST /api/show``) from what routerd knows of its models; the generation and embedding calls
(``POST /api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``) relayed through
routerd's own proxy (``ProxyApp.serve``) as OpenAI requests, so that queues, keys, limits, the
memory budget, loading and metrics are those of every other request, with a sink that turns
llama-server's event stream into Ollama's NDJSON line by line as tokens arrive (nothing is
buffered); ``keep_alive`` (0 unloads the model after the answer, a duration sets its idle TTL
for this load, a negative one keeps it loaded); ``POST /api/pull`` (routerd's pull, its progress
as Ollama's lines). Every error is Ollama's ``{"error": "..."}``, never OpenAI's shape.

The translations are ``ollama_shapes``' (pure); the route table sends ``/api/*`` here after the
access check. It must not talk HTTP to a backend: the proxy does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio

from routerd.backends.supervisor import Supervisor
from routerd.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, RequestTimeout, RouterdError
from routerd.front import ollama_shapes as shapes
from routerd.front.access import Scope, caller_of, cross_site
from routerd.front.client_io import RequestBody, ResponseSink, drain

if TYPE_CHECKING:
    from routerd.front.operations import Operations

log = logging.getLogger("routerd.ollama")

_JSON = [(b"content-type", b"application/json; charset=utf-8")]
_NDJSON = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
#: Seconds between two progress lines of a pull.
PULL_PROGRESS_INTERVAL = 0.5


async def fail(sink: ResponseSink, error: RouterdError) -> None:
    """An error in Ollama's shape, with its status."""
    headers = _JSON + [(k.lower().encode(), v.encode()) for k, v in error.http_headers()]
    await sink.answer(error.status, headers, shapes.encode({"error": error.message}))


async def _answer(sink: ResponseSink, data: Any) -> None:
    await sink.answer(200, _JSON, shapes.encode(data))


class Relay(Protocol):
    """What this module uses of the proxy (``proxy.ProxyApp``; only the route table imports it)."""

    supervisor: Supervisor

    async def serve(self, scope: Scope, body: RequestBody, sink: ResponseSink, label: str, queued: bool,
                    runs_to_end: bool = False) -> None: ...


class Ollama:
    """Answers ``/api/*`` (``serve``) over routerd's proxy and, for pulls, its operations."""

    def __init__(self, proxy: Relay, operations: Operations | None = None) -> None:
        self.proxy = proxy
        self.operations = operations

    @property
    def supervisor(self) -> Supervisor:
        return self.proxy.supervisor

    async def serve(self, scope: Scope, body: RequestBody, sink: ResponseSink, label: str, queued: bool,
                    runs_to_end: bool) -> None:
        """One request the access check has let through; ``label``, ``queued`` and
        ``runs_to_end`` are its route's (see ``routes.Route``)."""
        method, path = scope["method"], scope["path"]
        try:
            if method == "GET" and path in _VIEWS:
                await drain(body)
                await _answer(sink, _VIEWS[path](self, scope))
            elif method == "POST" and path in _CALLS:
                request = await self._read(scope, body)
                if request is None:
                    return  # the client left while sending
                await _CALLS[path](self, scope, body, sink, request, label, queued, runs_to_end)
            else:
                await drain(body)
                raise NotFound(f"{method} {path}: no such Ollama API")
        except RouterdError as exc:
            await fail(sink, exc)
        except shapes.ShapeError as exc:
            await fail(sink, BadRequest(str(exc)))

    # -- reading a request -------------------------------------------------------------------
    async def _read(self, scope: Scope, body: RequestBody) -> dict[str, Any] | None:
        server = self.supervisor.config.server
        data = body.received()
        if data is None:
            data = await _receive_all(body, server.max_body_bytes, server.body_timeout)
            if data is None:
                return None  # the client left while sending
        if len(data) > server.max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds {server.max_body_bytes} bytes (server.max_body_bytes)")
        try:
            request = json.loads(data or b"{}")
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        return request

    def _model(self, scope: Scope, request: dict[str, Any]) -> str:
        """The routerd name of the model the request names (``model`` or ``name``); 404 in
        Ollama's words for one unknown or outside the caller's key."""
        asked = request.get("model") or request.get("name")
        if not isinstance(asked, str) or not asked:
            raise BadRequest("model is required")
        supervisor, caller = self.supervisor, caller_of(scope)
        for name in shapes.candidates(asked):
            entry = supervisor.catalog.get(name)
            if entry is not None and caller.allows((entry.name, *entry.aliases)):
                return str(entry.name)
            if entry is None and name in supervisor.config.selectors and caller.allows((name,)):
                return name
        raise NotFound(shapes.not_found(asked), code="model_not_found")

    # -- the listings ------------------------------------------------------------------------
    def _version(self, scope: Scope) -> dict[str, Any]:
        from routerd import __version__
        return {"version": shapes.OLLAMA_VERSION, "routerd": __version__}

    def _visible(self, scope: Scope) -> list[Any]:
        caller = caller_of(scope)
        return [status for status in self.supervisor.status() if caller.allows([status.name, *status.aliases])]

    def _tags(self, scope: Scope) -> dict[str, Any]:
        return {"models": [shapes.model_entry(status.name, status.path, status.metadata, _mtime(status.path))
                           for status in self._visible(scope)]}

    def _ps(self, scope: Scope) -> dict[str, Any]:
        models = []
        for status in self._visible(scope):
            backend = self.supervisor.running(status.name) if status.pid is not None else None
            if backend is None or status.state not in ("ready", "starting"):
                continue
            memory = status.memory or {}
            devices = cast(dict[str, int], memory.get("measured") or memory.get("estimate") or {})
            size_vram = sum(size for device, size in devices.items() if device != "ram")
            size = sum(devices.values()) or int((status.metadata or {}).get("file_size") or 0)
            left = backend.idle_ttl_left()
            ttl_left = None if backend.idle_ttl <= 0 else (left if left is not None else backend.idle_ttl)
            context = int((status.metadata or {}).get("context_length") or 0)
            models.append(shapes.running_entry(status.name, status.path, status.metadata, size, size_vram, ttl_left,
                                               context))
        return {"models": models}

    async def _show(self, scope: Scope, body: RequestBody, sink: ResponseSink, request: dict[str, Any],
                    *_: object) -> None:
        entry = self.supervisor.catalog.get(self._model(scope, request))
        if entry is None:  # a selector: no file of its own
            raise NotFound(shapes.not_found(str(request.get("model") or request.get("name"))))
        metadata = self.supervisor.catalog.metadata(entry)
        await _answer(sink, shapes.show(entry.path, metadata, list(entry.args), bool(entry.mmproj),
                                        _mtime(entry.path)))

    # -- generation and embeddings through the proxy -------------------------------------------
    async def _chat(self, scope: Scope, body: RequestBody, sink: ResponseSink, request: dict[str, Any],
                    label: str, queued: bool, runs_to_end: bool) -> None:
        await self._generation(scope, body, sink, request, "chat", label, queued, runs_to_end)

    async def _generate(self, scope: Scope, body: RequestBody, sink: ResponseSink, request: dict[str, Any],
                        label: str, queued: bool, runs_to_end: bool) -> None:
        await self._generation(scope, body, sink, request, "generate", label, queued, runs_to_end)

    async def _generation(self, scope: Scope, body: RequestBody, sink: ResponseSink, request: dict[str, Any],
                          kind: str, label: str, queued: bool, runs_to_end: bool) -> None:
        began, since = time.monotonic(), trio.current_time()
        name = self._model(scope, request)
        keep = shapes.keep_alive_seconds(request.get("keep_alive"))
        self._may_keep_alive(scope, keep)
        if kind == "chat":
            path, payload = "/v1/chat/completions", shapes.chat_request(request, name)
            empty = not payload["messages"]
        else:
            path, payload = shapes.generate_request(request, name)
            empty = not request.get("prompt") and not request.get("images")
        shown = str(request.get("model") or request.get("name"))
        if empty:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            await self._load_or_unload(sink, name, shown, kind, keep, began)
            return
        translator = shapes.Translator(shown, kind, began)

        def at_end() -> None:
            translator.load = self._load_seconds(name, since)
            self._keep_alive(name, keep)
        out = _OllamaSink(sink, at_end, whole=translator.whole, feed=translator.feed, finish=translator.finish,
                          failed=lambda: translator.error is not None)
        await self.proxy.serve(_scope_for(scope, path), _Given(body, json.dumps(payload).encode()), out, label,
                               queued, runs_to_end)

    async def _embed(self, scope: Scope, body: RequestBody, sink: ResponseSink, request: dict[str, Any],
                     label: str, queued: bool, runs_to_end: bool) -> None:
        began, since = time.monotonic(), trio.current_time()
        name = self._model(scope, request)
        keep = shapes.keep_alive_seconds(request.get("keep_alive"))
        self._may_keep_alive(scope, keep)
        legacy = scope["path"] == "/api/embeddings"
        payload = shapes.embed_request(request, name, legacy)
        shown = str(request.get("model") or request.get("name"))

        def whole(data: bytes) -> dict[str, Any]:
            return shapes.embeddings(data, shown, legacy, began, self._load_seconds(name, since))
        out = _OllamaSink(sink, lambda: self._keep_alive(name, keep), whole=whole)
        await self.proxy.serve(_scope_for(scope, "/v1/embeddings"), _Given(body, json.dumps(payload).encode()), out,
                               label, queued, runs_to_end)

    async def _load_or_unload(self, sink: ResponseSink, name: str, shown: str, kind: str, keep: float | None,
                              began: float) -> None:
        supervisor = self.supervisor
        if keep == 0:
            entry = supervisor.catalog.get(name)
            if entry is not None and not entry.keep_loaded:
                supervisor.unload(name)
            reason = "unload"
        else:
            await supervisor.load(supervisor.select(name) if name not in supervisor.catalog else name)
            self._keep_alive(name, keep)
            reason = "load"
        line: dict[str, Any] = {"model": shown, "created_at": shapes.timestamp()}
        if kind == "chat":
            line["message"] = {"role": "assistant", "content": ""}
        else:
            line["response"] = ""
        line.update(done=True, done_reason=reason, total_duration=int((time.monotonic() - began) * 1e9))
        await _answer(sink, line)

    def _load_seconds(self, name: str, since: float) -> float:
        """How long the request waited for its model to load (0 when it was ready)."""
        if name not in self.supervisor.catalog:
            return 0.0
        backend = self.supervisor.running(name)
        ready_at = getattr(backend, "ready_at", None)
        return max(0.0, ready_at - since) if ready_at is not None and ready_at > since else 0.0

    def _may_keep_alive(self, scope: Scope, seconds: float | None) -> None:
        """``keep_alive`` 0 (unload) or negative (keep loaded) decides for every client of the
        model: an operator's call, like router mode's unload (an admin key, or the local user),
        and never from another site's page."""
        if seconds is None or seconds > 0:
            return
        action = f"keep_alive {'0 (unload)' if seconds == 0 else '-1 (keep loaded)'}"
        refused = cross_site(scope["headers"])
        if refused is not None:
            raise Forbidden(f"{action} changes what routerd runs, and this request comes from another site's page "
                            f"({refused})", code="cross_site_request")
        if self.operations is not None:
            self.operations.gate.require_admin_key(caller_of(scope), action, scope["headers"])

    def _keep_alive(self, name: str, seconds: float | None) -> None:
        """``keep_alive`` after an answer: 0 unloads the model (once its requests are done), a
        duration is its idle TTL for this load, a negative one keeps it (TTL 0: never idle)."""
        supervisor = self.supervisor
        entry = supervisor.catalog.get(name)
        if seconds is None or entry is None or entry.keep_loaded:  # pinned: its config decides
            return
        if seconds == 0:
            log.info("%s: unloaded after an Ollama request's keep_alive 0", name)
            supervisor.unload(name)
            return
        for backend in supervisor.models.replicas(supervisor.catalog.resolve(name).name):
            backend.set_idle_ttl(0.0 if seconds < 0 else seconds)

    # -- pulls -------------------------------------------------------------------------------
    async def _pull(self, scope: Scope, body: RequestBody, sink: ResponseSink, request: dict[str, Any],
                    *_: object) -> None:
        operations = self.operations
        if operations is None:
            raise RouterdError("pulls are not available here")
        asked = request.get("model") or request.get("name")
        if not isinstance(asked, str) or not asked:
            raise BadRequest("model is required")
        operations.gate.require_admin_key(caller_of(scope), "POST /api/pull", scope["headers"])
        ref = shapes.pull_ref(asked)
        streaming = shapes.wants_stream(request)
        if not streaming:
            await operations.pull(ref, None)
            await _answer(sink, {"status": "success"})
            return
        await sink.start(200, _NDJSON)
        await sink.body(shapes.encode({"status": "pulling manifest"}), True)
        last = 0.0

        async def progress(params: dict[str, Any]) -> None:
            nonlocal last
            done, total = int(params.get("bytes") or 0), params.get("total")
            if total is not None and done < total and time.monotonic() - last < PULL_PROGRESS_INTERVAL:
                return
            last = time.monotonic()
            line = {"status": "downloading", "digest": "sha256:" + shapes.digest(str(params.get("file"))),
                    "total": int(total or 0), "completed": done}
            await sink.body(shapes.encode(line), True)
        try:
            result = await operations.pull(ref, None, progress)
        except RouterdError as exc:
            await sink.body(shapes.encode({"error": exc.message}), False)
            return
        await sink.body(shapes.encode({"status": "verifying sha256 digest"}) + shapes.encode(
            {"status": "writing manifest"}) + shapes.encode({"status": "success", "model": result.model}), False)


_VIEWS: dict[str, Callable[[Ollama, Scope], dict[str, Any]]] = {
    "/api/version": Ollama._version, "/api/tags": Ollama._tags, "/api/ps": Ollama._ps}
_CALLS: dict[str, Callable[..., Any]] = {
    "/api/show": Ollama._show, "/api/chat": Ollama._chat, "/api/generate": Ollama._generate,
    "/api/embed": Ollama._embed, "/api/embeddings": Ollama._embed, "/api/pull": Ollama._pull}


def _mtime(path: str) -> float | None:
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def _scope_for(scope: Scope, path: str) -> Scope:
    """The request's scope as the proxy sees the OpenAI request it becomes (the same state:
    the caller the access check found)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"transfer-encoding")]
    return cast(Scope, {**scope, "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers})


class _Given:
    """The translated request's body (``RequestBody``): all there, the client's leaving watched
    on its own connection."""

    awaiting_continue = False

    def __init__(self, original: RequestBody, data: bytes) -> None:
        self._original = original
        self._data: bytes | None = data

    def received(self) -> bytes | None:
        data, self._data = self._data, None
        return data

    async def receive(self) -> tuple[bytes, bool] | None:
        data, self._data = self._data, None
        return (data, False) if data is not None else None

    def watch(self, on_leave: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        return self._original.watch(on_leave)


class _OllamaSink:
    """A ``ResponseSink`` for the proxy that writes Ollama's answer to the client's sink: an
    event stream's lines as NDJSON as they come (``feed``, then ``finish``), a whole answer as
    one object (``whole``), an error as ``{"error": ...}``. ``at_end`` runs before the last
    line goes out (keep_alive, the load time)."""

    chunked = False

    def __init__(self, sink: ResponseSink, at_end: Callable[[], None], *, whole: Callable[[bytes], dict[str, Any]],
                 feed: Callable[[bytes], list[bytes]] | None = None, finish: Callable[[], bytes] | None = None,
                 failed: Callable[[], bool] = lambda: False) -> None:
        self._sink = sink
        self._at_end = at_end
        self._whole = whole
        self._feed = feed
        self._finish = finish
        self._failed = failed
        self._ended = False

    def add_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._sink.add_headers(headers)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._sink.start(status, _NDJSON + _routing(headers))

    async def answer(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        if status >= 400:
            await self._sink.answer(status, _JSON + _routing(headers), shapes.encode(
                {"error": shapes.error_message(data)}))
            return
        self._end()
        await self._sink.answer(status, _JSON + _routing(headers), shapes.encode(self._whole(data)))

    async def body(self, data: bytes, more: bool) -> None:
        lines = self._feed(data) if self._feed is not None else []
        if not more and self._finish is not None and not self._failed():
            self._end()
            lines.append(self._finish())
        out = b"".join(lines)
        if out or not more:
            await self._sink.body(out, more)

    async def raw(self, data: bytes, more: bool) -> None:
        raise NotImplementedError("the proxy is told this sink is not chunked")

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._at_end()


def _routing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The routing headers (``x-routerd-*``) of the proxy's answer, the rest being OpenAI's."""
    return [(k, v) for k, v in headers if k.lower().startswith(b"x-routerd-")]


async def _receive_all(body: RequestBody, limit: int, within: float) -> bytes | None:
    """The rest of a request body (413 past ``limit``, 408 after ``within`` s), or None when
    the client left."""
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(within):
        while True:
            piece = await body.receive()
            if piece is None:
                return None
            parts.append(piece[0])
            size += len(piece[0])
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes (server.max_body_bytes)")
            if not piece[1]:
                return b"".join(parts)
    raise RequestTimeout(f"the request body did not arrive within {within:g} s (server.body_timeout)")
