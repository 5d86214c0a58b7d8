"""The proxied requests, from the client's connection to a backend's and back: a lean ASGI app.

Owns the hot path: which requests are proxied (``is_proxied``), reading the body and its
``model``, queueing for a backend through the supervisor (with SSE keep-alive comments for a
stream that waits), sending the request upstream, relaying the answer chunk by chunk, and
rendering failures as OpenAI errors (in-band once a stream has started). A client that hangs up
cancels the relay, which closes the upstream socket (llama-server then stops generating) and
releases the backend. Every other request falls through to the Quart app (``api.py``).

It must not choose a backend or decide about memory: the supervisor does. It runs on raw ASGI
because a framework's request and response objects cost more than the rest of the relay.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import trio

from routerd import client_json, cors, scheduler
from routerd.access import ANONYMOUS, Caller, Gate
from routerd.backend import Backend
from routerd.errors import (BadRequest, HeadersTooLarge, PayloadTooLarge, RequestTimeout, RouterdError,
                            UpstreamFailed)
from routerd.supervisor import Supervisor
from routerd.upstream import NotDelivered, Response, UpstreamError, first_header

log = logging.getLogger("routerd.proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: POST routes proxied to the backend named by the body's "model".
PROXIED_POST = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/rerank", "/v1/reranking",
    "/reranking", "/completion", "/completions", "/infill", "/tokenize", "/detokenize", "/apply-template",
    "/embedding", "/embeddings", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
    "/chat/completions"})
#: GET endpoints of a backend reachable as /{model}/{endpoint} (the seed's convention).
SHORT_UPSTREAM_GET = frozenset({"health", "props", "slots", "metrics"})
#: GET paths under this prefix belong to the model views, whatever their last segment.
_VIEW_PREFIX = "/v1/models/"

#: Tries to deliver one request; only a request no backend received is tried again.
MAX_DELIVERY_ATTEMPTS = 3
#: How long a failed call waits for its backend's exit to be noticed (the exit watcher reads
#: the last output for up to 0.5 s first).
EXIT_NOTICE_TIME = 1.0

#: Never passed on: hop-by-hop headers, and credentials (a backend has its own key, and a
#: client's key is for routerd alone).
_NOT_FORWARDED = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                            b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
                            b"authorization", b"x-api-key", b"cookie", b"set-cookie"})
#: CORS is routerd's decision (server.cors_origins), never a backend's: llama-server allows every
#: origin by default.
_CORS_PREFIX = b"access-control-"
_EVENT_STREAM_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                         (b"x-accel-buffering", b"no")]


def is_proxied(method: str, path: str) -> bool:
    """Whether a request goes to a backend (pure): the proxied POST routes, GET /upstream/...,
    and GET /{model}/{health,props,slots,metrics}."""
    if method == "POST":
        return path in PROXIED_POST
    if method != "GET":
        return False
    if path.startswith("/upstream/"):
        return True
    model, _, endpoint = path[1:].rpartition("/")
    return bool(model) and endpoint in SHORT_UPSTREAM_GET and not path.startswith(_VIEW_PREFIX)


def forward_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers to pass on, either way: without hop-by-hop ones, credentials and CORS (pure;
    names are lower-case bytes)."""
    return [(k, v) for k, v in headers
            if (name := k.lower()) not in _NOT_FORWARDED and not name.startswith(_CORS_PREFIX)]


def model_and_stream(body: bytes) -> tuple[str, bool]:
    """The ``model`` field of a JSON request body (400 when missing or malformed), and whether
    it asks for a stream."""
    try:
        payload = client_json.loads(body)
    except client_json.InvalidJson as exc:
        raise BadRequest(f"request body is {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the request has no 'model' field: name the model to use (GET /v1/models lists them)",
                         code="missing_model")
    return model, payload.get("stream") is True


def split_model_path(rest: str, names: Iterable[str]) -> tuple[str, str]:
    """Split ``{model}/{path}`` (pure): the longest known model name or alias that prefixes it
    wins, so names with ``/`` and ``:`` (``org/repo:Q4_K_M``) are unambiguous; otherwise the
    first segment."""
    best = max((name for name in names if rest.startswith(name + "/")), key=len, default="")
    if not best:
        best = rest.split("/", 1)[0]
    return best, rest[len(best) + 1:]


def sse_error(error: RouterdError) -> bytes:
    """An error as one server-sent event, for a stream whose status line is already sent."""
    return b"data: " + json.dumps(error.openai_body()).encode() + b"\n\n"


#: Where a request's Caller is kept in its ASGI scope, for the views.
CALLER = "routerd.caller"
#: Paths open to anyone, key or not: load balancers and container runtimes probe them.
OPEN_PATHS = frozenset({"/health"})


def caller_of(scope: Scope) -> Caller:
    return scope.get(CALLER, ANONYMOUS)


class ProxyApp:
    """ASGI: proxied requests are relayed here; everything else goes to ``fallback``. Every
    request passes the access gate and CORS here first, whichever serves it."""

    def __init__(self, supervisor: Supervisor, gate: Gate, fallback: ASGIApp) -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        server = self.supervisor.config.server
        if server.cors_origins:
            allowed = cors.allowed_origin(first_header(scope["headers"], b"origin"), server.cors_origins)
            if scope["method"] == "OPTIONS" and first_header(scope["headers"], b"access-control-request-method"):
                await cors.answer_preflight(send, allowed)
                return
            if allowed:
                send = cors.with_headers(send, allowed)
        client = _Client(send)
        limit = server.max_headers
        if len(scope["headers"]) > limit:
            await client.fail(HeadersTooLarge(f"the request has {len(scope['headers'])} header fields; the limit "
                                              f"is {limit} (server.max_headers)"))
            return
        if scope["path"] not in OPEN_PATHS:
            try:
                scope[CALLER] = self.gate.authenticate(scope["headers"])
            except RouterdError as exc:
                log.info("refused %s %s from %s: %s", scope["method"], scope["path"], _peer(scope), exc.code)
                await client.fail(exc)
                return
        if not is_proxied(scope["method"], scope["path"]):
            await self.fallback(scope, receive, send)
            return
        try:
            await self._handle(scope, receive, client)
        except RouterdError as exc:
            await client.fail(exc)
        except Exception:
            log.exception("unhandled error on %s %s from %s", scope["method"], scope["path"], _peer(scope))
            await client.fail(RouterdError("internal error while relaying the request"))

    async def _handle(self, scope: Scope, receive: Receive, client: _Client) -> None:
        method, path = scope["method"], scope["path"]
        server = self.supervisor.config.server
        if method == "POST":
            with trio.move_on_after(server.body_timeout) as reading:
                body = await _read_body(scope, receive, server.max_body_bytes)
            if reading.cancelled_caught:
                raise RequestTimeout(f"the request body did not arrive within {server.body_timeout:g} s "
                                     "(server.body_timeout)")
            if body is None:
                return  # the client left while sending
            model, stream = model_and_stream(body)
            target = path
        else:
            body, stream = b"", False
            rest = path[len("/upstream/"):] if path.startswith("/upstream/") else path[1:]
            names = [name for name, _ in self.supervisor.catalog.names_and_aliases()]
            model, target = split_model_path(rest, names)
            target = "/" + target
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = scope["headers"]
        caller = caller_of(scope)
        self.gate.check_model(caller, model, self.supervisor.catalog.get(model))
        priority_header = first_header(headers, scheduler.PRIORITY_HEADER.lower().encode())
        priority = caller.priority(scheduler.parse_priority(priority_header.decode("latin-1")))
        with self.gate.admit(caller):  # 429 over the key's rate or concurrency
            await self._queue_and_relay(client, receive, model, priority, stream, method, target, headers, body)

    async def _queue_and_relay(self, client: _Client, receive: Receive, model: str, priority: int, stream: bool,
                               method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        ticket = self.supervisor.enqueue(model, priority)  # 429 here, before anything is sent
        async with trio.open_nursery() as nursery:  # lives as long as the request
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                await self._relay(client, model, ticket, stream, method, target, headers, body)
            except RouterdError as exc:
                await client.fail(exc)
            finally:
                self.supervisor.dequeue(model, ticket)
            nursery.cancel_scope.cancel()

    async def _relay(self, client: _Client, model: str, ticket: scheduler.Ticket, stream: bool, method: str,
                     target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        upstream, backend = await self._deliver(client, model, ticket, stream, method, target, headers, body)
        upstream.on_end = backend.release  # the slot is free once the backend is done, not the client
        try:
            await _answer(client, backend, upstream)
        finally:
            upstream.aclose_now()  # unfinished (client gone): closing tells llama-server to stop

    async def _deliver(self, client: _Client, model: str, ticket: scheduler.Ticket, stream: bool, method: str,
                       target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[Response, Backend]:
        """Send the request to a ready backend once its turn comes; the response and its backend.

        A request that never reached its backend (it died between our turn and our connect)
        goes back to its place in the queue and waits for the next backend: nothing was done
        for it, so nothing is lost by trying again. One that reached it is never sent twice.
        """
        supervisor = self.supervisor
        for attempt in range(1, MAX_DELIVERY_ATTEMPTS + 1):
            backend = await self._acquire(client, model, ticket, stream)
            supervisor.dequeue(model, ticket)
            pool = backend.upstream
            assert pool is not None, "an acquired backend is ready, and a ready backend has its pool"
            try:
                return await pool.request(method, target, headers=forward_headers(headers), body=body), backend
            except NotDelivered as exc:
                backend.distrust()  # before the slot is freed: nobody else is sent there meanwhile
                backend.release()
                if attempt == MAX_DELIVERY_ATTEMPTS:
                    raise await _failure(backend, exc) from None
                log.info("%s: request not delivered (%s); back in the queue for a working backend",
                         backend.name, exc)
                await _await_exit(backend)
                supervisor.requeue(model, ticket)
            except UpstreamError as exc:
                backend.release()
                raise await _failure(backend, exc) from None  # distrusts it before anyone else runs
            except BaseException:
                backend.release()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _acquire(self, client: _Client, model: str, ticket: scheduler.Ticket, stream: bool) -> Backend:
        """Wait for a backend. A stream that has to wait gets its event-stream headers now and an
        SSE comment every keep-alive interval (clients and proxies drop silent connections)."""
        interval = self.supervisor.config.scheduler.keepalive_interval if stream else math.inf
        while True:
            with trio.move_on_after(interval):
                return await self.supervisor.acquire_ticket(model, ticket)
            if not client.started:
                await client.start(200, _EVENT_STREAM_HEADERS, event_stream=True)
            await client.body(b": waiting for " + model.encode() + b"\n\n")


class _Client:
    """The client's side of one exchange: what has been sent decides how an error is told."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.event_stream = False
        self.finished = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]], *, event_stream: bool = False) -> None:
        self.started = True
        self.event_stream = event_stream
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, chunk: bytes, *, more: bool = True) -> None:
        self.finished = not more
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def fail(self, error: RouterdError) -> None:
        if self.finished:
            return
        if not self.started:
            payload = json.dumps(error.openai_body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
            headers += [(k.lower().encode(), v.encode()) for k, v in error.http_headers()]
            await self.start(error.status, headers)
            await self.body(payload, more=False)
        elif self.event_stream:  # the status line is sent: report in-band, as OpenAI streams do
            await self.body(sse_error(error), more=False)
        else:
            await self.body(b"", more=False)


async def _answer(client: _Client, backend: Backend, upstream: Response) -> None:
    """Relay the backend's answer: an event stream chunk by chunk, anything else whole (so a
    backend dying mid-body is still a clean 502)."""
    is_stream = upstream.header(b"content-type").startswith(b"text/event-stream")
    try:
        if not is_stream:
            whole = await upstream.read()
            if client.started:  # a waiting stream got a plain answer (an error): one event
                await client.body(b"data: " + whole.strip() + b"\n\n", more=False)
                return
            headers = forward_headers(upstream.headers) + [(b"content-length", b"%d" % len(whole))]
            await client.start(upstream.status, headers)
            await client.body(whole, more=False)
            return
        if not client.started:
            headers = forward_headers(upstream.headers)
            await client.start(upstream.status, headers + _EVENT_STREAM_HEADERS[1:], event_stream=True)
        async for chunk in upstream:
            await client.body(chunk)
        await client.body(b"", more=False)
    except UpstreamError as exc:
        log.warning("%s: answer broke: %s", backend.name, exc)
        raise await _failure(backend, exc, "mid-stream" if client.started else "") from None


async def _await_exit(backend: Backend) -> None:
    """After a failed call: give a dying backend a moment to be reaped (its exit status is the
    real reason, and a backend that is gone is not chosen again)."""
    with trio.move_on_after(EXIT_NOTICE_TIME):
        await backend.wait_gone()


async def _failure(backend: Backend, exc: BaseException, when: str = "") -> UpstreamFailed:
    """The 502 for a broken upstream call, with the backend's own reason when it died."""
    backend.distrust()
    await _await_exit(backend)
    why = backend.error or str(exc)
    return UpstreamFailed(f"backend for {backend.name!r} failed{' ' + when if when else ''}: {why}",
                          data={"exit_code": backend.exit_code})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body (413 past ``limit``), or None when the client disconnects."""
    declared = first_header(scope["headers"], b"content-length").decode("latin-1")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit} (server.max_body_bytes)")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (server.max_body_bytes)")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
