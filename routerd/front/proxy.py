"""The proxied requests, from the client's connection to a backend's and back: a lean ASGI handler.

Owns the hot path: reading the body, its ``model`` (a selector's resolved to a target) and its
session, queueing for an endpoint through the supervisor (with SSE keep-alive comments for a
stream that waits), sending the request upstream (under the model's name there, for a remote),
relaying the answer chunk by chunk, and rendering failures as OpenAI errors (in-band once a
stream has started). A client that hangs up cancels the relay, which closes the upstream socket
(llama-server then stops generating) and releases the endpoint.

Which requests come here is the route table's decision (``routes.route``), and only the route
table calls it. It must not choose an endpoint or decide about memory: the supervisor does. It
runs on raw ASGI because a framework's request and response objects cost more than the rest of
the relay.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable

import trio

from routerd import events
from routerd.backends import scheduler
from routerd.backends.endpoints import SESSION_HEADER, Endpoint, Lease
from routerd.backends.supervisor import Supervisor
from routerd.backends.upstream import NotDelivered, Response, UpstreamError, first_header
from routerd.errors import BadRequest, PayloadTooLarge, RequestTimeout, RouterdError, UpstreamFailed
from routerd.front import feedback
from routerd.front.access import Gate, Scope, caller_of, check_request, peer
from routerd.front.client_io import RequestBody, ResponseSink, drain
from routerd.front.exchange import Exchange
from routerd.front.requested import (
    FORM_POST,
    MODEL_QUERY_GET,
    SLOTTED_POST,
    forward_headers,
    model_in_query,
    read_request,
    renamed,
    split_model_path,
    with_slot,
)
from routerd.front.uploads import read_upload
from routerd.rewriting import rewritten

log = logging.getLogger("routerd.proxy")

#: Seconds between two looks at what a request waits for, when its client gets loading feedback.
FEEDBACK_INTERVAL = 1.0
#: How long routerd waits for the end of an answer whose client left, when the backend cannot
#: stop that work midway (embeddings, reranking: one batch each), before giving up its slot.
ABANDONED_WORK_LIMIT = 10.0
#: Tries to deliver one request; only a request no backend received is tried again.
MAX_DELIVERY_ATTEMPTS = 3
#: Response headers naming the model that served (a selector's choice) and its endpoint.
MODEL_HEADER = b"x-routerd-model"
ENDPOINT_HEADER = b"x-routerd-endpoint"
_EVENT_STREAM_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                         (b"x-accel-buffering", b"no")]

class ProxyApp:
    """Relays the requests the route table gives it (``serve``) and records each one."""

    def __init__(self, supervisor: Supervisor, gate: Gate) -> None:
        self.supervisor = supervisor
        self.gate = gate

    async def serve(self, scope: Scope, body: RequestBody, sink: ResponseSink, label: str, queued: bool,
                    runs_to_end: bool = False) -> None:
        """Relay one request (CORS already added to ``sink``): the access check, then the
        relay; ``label`` is the route it is counted under, ``queued`` whether it takes a slot,
        ``runs_to_end`` whether llama-server finishes its work even for a client that left."""
        client = Exchange(sink)
        client.runs_to_end = runs_to_end
        try:
            config = self.supervisor.config
            try:
                check_request(self.gate, scope, max_headers=config.server.max_headers,
                              metrics_open=config.metrics.open)
            except RouterdError as exc:
                await drain(body)
                await client.fail(exc)
                return
            try:
                await self._handle(scope, body, client, queued)
            except RouterdError as exc:
                await client.fail(exc)
            except Exception:
                log.exception("unhandled error on %s %s from %s", scope["method"], scope["path"], peer(scope))
                await client.fail(RouterdError("internal error while relaying the request"))
        finally:  # cancelled too (hypercorn cancels a handler whose client left): it finished
            self._finished(scope, client, label)

    def _finished(self, scope: Scope, client: Exchange, label: str) -> None:
        """Publish the request's record (metrics and the request log listen)."""
        now = time.monotonic()
        status = client.status if client.status is not None else 499  # nothing sent: the client left
        tokens = client.tokens()
        self.supervisor.bus.publish(
            events.EventType.REQUEST, client.model,
            route=label, method=scope["method"], status=status,
            duration=now - client.began, ttfb=None if client.first_byte is None else client.first_byte - client.began,
            queue_wait=client.queue_wait, prompt_tokens=tokens[0] if tokens else None,
            completion_tokens=tokens[1] if tokens else None, bytes_in=client.bytes_in, bytes_out=client.bytes_out,
            client=peer(scope), key=caller.key.name if (caller := caller_of(scope)).key else None,
            cancelled=client.cancelled or not client.finished, stream=client.event_stream,
            error=client.error, selector=client.selector, endpoint=client.endpoint,
            rewritten=client.rewritten or None)

    async def _handle(self, scope: Scope, body_in: RequestBody, client: Exchange, queued: bool) -> None:
        method, path = scope["method"], scope["path"]
        server = self.supervisor.config.server
        user = None
        if method == "POST" and path in FORM_POST:  # an upload: relayed as it arrives
            client.upload = await read_upload(scope, body_in, server.max_body_bytes, server.body_timeout)
            if client.upload is None:
                client.cancelled = True
                return
            body, model, stream, target = client.upload.head, client.upload.model, False, path
            client.bytes_in = len(body) + client.upload.remaining
        elif method == "POST":
            whole = await _read_body(scope, body_in, server.max_body_bytes, server.body_timeout)
            if whole is None:
                client.cancelled = True
                return  # the client left while sending
            body = whole
            client.bytes_in = len(body)
            requested = read_request(body)
            model, stream, user = requested.model, requested.stream, requested.user
            target = path
        elif path in MODEL_QUERY_GET:  # router mode's /props?model=M: the query names it
            body, stream, target = b"", False, path
            model = model_in_query(scope["query_string"]) or ""
        else:
            body, stream = b"", False
            rest = path[len("/upstream/"):] if path.startswith("/upstream/") else path[1:]
            names = [name for name, _ in self.supervisor.catalog.names_and_aliases()]
            model, target = split_model_path(rest, names)
            # The path arrives decoded (%20 is a space): escape it again for the request line.
            target = "/" + urllib.parse.quote(target, safe="/:@!$&'()*+,;=")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = scope["headers"]
        caller = caller_of(scope)
        if model in self.supervisor.config.selectors and model not in self.supervisor.catalog:
            self.gate.check_selector(caller, model)
            client.selector = model
            model = self.supervisor.select(model)
        entry = self.supervisor.catalog.get(model)
        client.model = entry.name if entry is not None else ""  # a label: never the client's text
        if client.selector is None:
            self.gate.check_model(caller, model, entry)
        if entry is not None and entry.rewrite is not None and body and client.upload is None:
            body, client.rewritten = rewritten(body, entry.rewrite)
            if client.rewritten:  # an override may have changed what the proxy reads
                requested = read_request(body)
                stream, user = requested.stream, requested.user
        if entry is not None and not self.supervisor.config.scheduler.autoload and not entry.remote \
                and self.supervisor.running(entry.name) is None:
            raise BadRequest(f"model {entry.name!r} is not loaded, and routerd loads models only when asked "
                             "(scheduler.autoload = false): load it with `routerctl load NAME`, POST /models/load "
                             "or the status page", code="model_not_loaded")
        if stream and path in feedback.CHAT_ROUTES and entry is not None:
            client.feedback = self.supervisor.config.loading_feedback(entry.name)
        priority_header = first_header(headers, scheduler.PRIORITY_HEADER.lower().encode())
        priority = caller.priority(scheduler.parse_priority(priority_header.decode("latin-1")))
        session = first_header(headers, SESSION_HEADER.lower().encode()).decode("latin-1") or user
        if entry is not None:
            client.routing_headers.append((MODEL_HEADER, entry.name.encode()))
        with self.gate.admit(caller):  # 429 over the key's rate or concurrency
            await self._queue_and_relay(client, body_in, model, priority, queued, stream, method,
                                        target, headers, body, session)

    async def _queue_and_relay(self, client: Exchange, body_in: RequestBody, model: str, priority: int, queued: bool,
                               stream: bool, method: str, target: str, headers: Iterable[tuple[bytes, bytes]],
                               body: bytes, session: str | None) -> None:
        """Relay the request; one that takes a slot (``queued``) waits its turn in the model's
        queue, one that does not skips it (then it has no ticket)."""
        # 429 here, before anything is sent
        ticket = self.supervisor.enqueue(model, priority) if queued else None
        with trio.CancelScope() as request_scope:  # cancelled when the client leaves
            def left() -> None:
                client.left()
                if client.runs_to_end and client.sent:
                    # Sent to a backend that cannot stop this work midway: its slot stays taken
                    # until the answer ends, so no other request is sent into a busy backend
                    # (which piled work up when clients gave up under load).
                    request_scope.deadline = min(request_scope.deadline,
                                                 trio.current_time() + ABANDONED_WORK_LIMIT)
                else:
                    request_scope.cancel()

            async with body_in.watch(left):
                try:
                    await self._relay(client, model, ticket, stream, method, target, headers, body, session)
                except RouterdError as exc:
                    await client.fail(exc)
                finally:
                    if ticket is not None:
                        self.supervisor.dequeue(ticket)

    async def _relay(self, client: Exchange, model: str, ticket: scheduler.Ticket | None, stream: bool, method: str,
                     target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes, session: str | None) -> None:
        upstream, endpoint = await self._deliver(client, model, ticket, stream, method, target, headers, body,
                                                 session)
        upstream.on_end = endpoint.release  # the slot is free once the backend is done, not the client
        try:
            await _answer(client, endpoint, upstream)
        finally:
            upstream.aclose_now()  # unfinished (client gone): closing tells llama-server to stop

    async def _deliver(self, client: Exchange, model: str, ticket: scheduler.Ticket | None, stream: bool, method: str,
                       target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes, session: str | None,
                       ) -> tuple[Response, Endpoint]:
        """Send the request to an endpoint once its turn comes; the response and its endpoint.

        A request that never reached its endpoint (a backend died between our turn and our
        connect, a remote could not be reached) goes back to its place in the queue and is
        sent to another endpoint of the pool, or the next backend: nothing was done for it, so
        nothing is lost by trying again. One that reached it is never sent twice.
        """
        supervisor = self.supervisor
        waiting_since = trio.current_time() if ticket is None else ticket.enqueued
        for attempt in range(1, MAX_DELIVERY_ATTEMPTS + 1):
            lease = await self._acquire(client, model, ticket, stream, session)
            endpoint = lease.endpoint
            if ticket is not None:
                supervisor.dequeue(ticket)
            if client.queue_wait is None:
                client.queue_wait = trio.current_time() - waiting_since
            client.endpoint = endpoint.key
            pool = endpoint.upstream
            try:
                if pool is None:
                    raise NotDelivered(f"{endpoint.label} stopped taking requests")
                upload = client.upload
                renaming = lease.upstream_model is not None and body and upload is None  # a form goes as it is
                sent = renamed(body, lease.upstream_model) if renaming and lease.upstream_model else body
                if session is not None and sent and target.partition("?")[0] in SLOTTED_POST:
                    slot = endpoint.slot_for_session(session)  # where its saved conversation is
                    if slot is not None:
                        sent = with_slot(sent, slot)
                rest = (upload.remaining, upload.rest()) if upload is not None and upload.remaining else None
                return await pool.request(method, target, headers=forward_headers(headers), body=sent,
                                          on_sent=client.was_sent, rest=rest), endpoint
            except NotDelivered as exc:
                endpoint.distrust()  # before the slot is freed: nobody else is sent there meanwhile
                endpoint.release()
                if attempt == MAX_DELIVERY_ATTEMPTS:
                    raise await _failure(endpoint, exc) from None
                log.info("%s: request not delivered (%s); back in the queue for a working endpoint",
                         endpoint.label, exc)
                await endpoint.failure_reason(exc)
                if ticket is not None:
                    supervisor.requeue(ticket)
            except UpstreamError as exc:
                endpoint.release()
                raise await _failure(endpoint, exc) from None  # distrusts it before anyone else runs
            except BaseException:
                endpoint.release()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _acquire(self, client: Exchange, model: str, ticket: scheduler.Ticket | None, stream: bool,
                       session: str | None) -> Lease:
        """Wait for an endpoint (with no ticket: for a ready one, not a free slot). A stream that
        has to wait gets its event-stream headers now and an SSE comment every keep-alive
        interval (clients and proxies drop silent connections), or, with loading feedback, a
        chunk saying what it waits for."""
        lease = self.supervisor.acquire_now(model, ticket, session)
        if lease is not None:
            return lease
        if ticket is None:
            return await self.supervisor.acquire_unqueued(model, session)
        if not stream:
            return await self.supervisor.acquire_ticket(model, ticket, session)
        waiting = _Waiting()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting.acquire, self.supervisor, model, ticket, session)
            describe = None
            if client.feedback:
                def describe() -> str:
                    return feedback.describe(self.supervisor.wait_info(model, ticket))
            await keep_informed(client, waiting.done, interval=self.supervisor.config.scheduler.keepalive_interval,
                                model=model, describe=describe)
        return waiting.result()


async def keep_informed(client: Exchange, done: trio.Event, *, interval: float, model: str,
                        describe: Callable[[], str] | None = None) -> None:
    """Until ``done``, tell a waiting stream's client it is still waiting: an SSE comment every
    ``interval`` s, or with ``describe`` (loading feedback) a chunk saying what it waits for,
    looked at every ``FEEDBACK_INTERVAL`` s and sent when it changed or ``interval`` s after the
    last. The event-stream headers go out with the first. The wait runs in another task and only
    sets ``done``: a send to the client is never cut in the middle."""
    tick = min(interval, FEEDBACK_INTERVAL) if describe is not None else interval
    said, said_at = "", trio.current_time()
    completion_id, created = feedback.completion_id(), int(time.time())
    while True:
        with trio.move_on_after(tick):
            await done.wait()
            return
        if not client.started:
            await client.start(200, _EVENT_STREAM_HEADERS, event_stream=True)
        now = trio.current_time()
        if describe is not None:
            text = describe()
            if text != said or now - said_at >= interval:
                said, said_at = text, now
                await client.body(feedback.reasoning_chunk(client.model, text, completion_id=completion_id,
                                                           created=created))
        else:
            await client.body(b": waiting for " + model.encode() + b"\n\n")


class _Waiting:
    """An endpoint being acquired in its own task (see ``ProxyApp._acquire``)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self._lease: Lease | None = None
        self._error: RouterdError | None = None

    async def acquire(self, supervisor: Supervisor, model: str, ticket: scheduler.Ticket,
                      session: str | None) -> None:
        try:
            self._lease = await supervisor.acquire_ticket(model, ticket, session)
        except RouterdError as exc:
            self._error = exc
        finally:
            self.done.set()

    def result(self) -> Lease:
        if self._error is not None:
            raise self._error
        assert self._lease is not None, "acquire() ended without a lease or an error"
        return self._lease


async def _answer(client: Exchange, backend: Endpoint, upstream: Response) -> None:
    """Relay the backend's answer: an event stream chunk by chunk, anything else whole (so a
    backend dying mid-body is still a clean 502)."""
    is_stream = upstream.header(b"content-type").startswith(b"text/event-stream")
    try:
        if not is_stream:
            whole = await upstream.read()
            client.answer_began()
            client.answer = whole
            if client.started:  # a waiting stream got a plain answer (an error): one event
                await client.body(b"data: " + whole.strip() + b"\n\n", more=False)
                return
            await client.send_whole(upstream.status, forward_headers(upstream.headers), whole)
            return
        client.answer_began()
        if not client.started:
            headers = forward_headers(upstream.headers)
            await client.start(upstream.status, headers + _EVENT_STREAM_HEADERS[1:], event_stream=True)
        elif client.status != upstream.status:  # a waiting stream's status was sent as 200
            client.status = upstream.status
        if client.chunked and upstream.chunked:  # both sides chunked: the chunks pass as they came
            async def deliver(framed: bytes, data: list[bytes], more: bool) -> None:
                for piece in data:
                    client.keep_for_usage(piece)
                await client.raw(framed, sum(map(len, data)), more=more)

            await upstream.pass_chunks(deliver)
            return
        async for chunk in upstream:
            client.keep_for_usage(chunk)
            await client.body(chunk)
        await client.body(b"", more=False)
    except UpstreamError as exc:
        log.warning("%s: answer broke: %s", backend.label, exc)
        raise await _failure(backend, exc, "mid-stream" if client.started else "") from None


async def _failure(endpoint: Endpoint, exc: BaseException, when: str = "") -> UpstreamFailed:
    """The 502 for a broken upstream call, with a backend's own reason when it died."""
    endpoint.distrust()
    why = await endpoint.failure_reason(exc)
    return UpstreamFailed(f"{endpoint.label} failed{' ' + when if when else ''}: {why}",
                          data={"exit_code": getattr(endpoint, "exit_code", None), "endpoint": endpoint.key})


async def _read_body(scope: Scope, body: RequestBody, limit: int, within: float) -> bytes | None:
    """The whole request body (413 past ``limit``, 408 if it takes over ``within`` s), or None
    when the client disconnects."""
    declared = first_header(scope["headers"], b"content-length").decode("latin-1")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit} (server.max_body_bytes)")
    here = body.received()
    if here is not None and len(here) <= limit:  # nearly always: it came with the head
        return here
    with trio.move_on_after(within):
        return await _read_rest(body, limit, here)
    raise RequestTimeout(f"the request body did not arrive within {within:g} s (server.body_timeout)")


async def _read_rest(body: RequestBody, limit: int, here: bytes | None) -> bytes | None:
    if here is not None:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (server.max_body_bytes)")
    parts: list[bytes] = []
    size = 0
    while True:
        piece = await body.receive()
        if piece is None:
            return None
        chunk, more = piece
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (server.max_body_bytes)")
        if not more:
            if not parts:
                return chunk
            parts.append(chunk)
            return b"".join(parts)
        parts.append(chunk)
