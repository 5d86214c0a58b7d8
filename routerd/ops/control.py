"""The control plane: JSON-RPC 2.0 over a Unix socket, one JSON object per line.

Owns the socket (path, mode 0660 set through the umask, stale-file replacement, refusing to
start beside a live routerd), peer-credential checks, the connection limit, batches,
notifications, and the method table; one connection's framing is ``jsonrpc.py``'s. Methods are
the operations of ``front/operations.py`` (the admin HTTP API runs the same ones and answers the
same fields); none holds logic of its own beyond shaping params and turning progress into
notifications. Authorization is here (peer credentials), never in the operations. See
docs/control-protocol.md.
"""

from __future__ import annotations

import errno
import grp
import inspect
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import attrs
import trio
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from routerd import client_json
from routerd.config import CONVERTER, ControlConfig, flatten_errors
from routerd.errors import ConfigError, NotWritable, RouterdError, StartupError
from routerd.front.keys import KeySettings
from routerd.front.operations import LogsResult, Operations
from routerd.ops.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PERMISSION_DENIED,
    TOO_MANY_CONNECTIONS,
    Connection,
    RpcError,
    cancel_on_hangup,
    error_reply,
    try_send,
    valid_id,
)

log = logging.getLogger("routerd.control")
#: Deepest nesting of arrays and objects in a request; routerd's own requests need 3.
MAX_DEPTH = 32
#: Most requests in one batch.
MAX_BATCH = 64

#: Methods that change something: each call is logged with the caller's uid.
STATE_CHANGING = frozenset({"load", "unload", "reload", "rescan", "reset", "import", "pull", "keys.add",
                            "keys.revoke"})


# -- params (typed, structured with cattrs) ------------------------------------------------
@attrs.frozen
class NoParams:
    pass


@attrs.frozen
class ModelParams:
    model: str


@attrs.frozen
class StatusParams:
    model: str | None = None


@attrs.frozen
class LoadParams:
    model: str
    wait: bool = False


@attrs.frozen
class UnloadParams:
    model: str
    force: bool = False


@attrs.frozen
class PullParams:
    model: str
    file: str | None = None


@attrs.frozen
class PathParams:
    path: str


@attrs.frozen
class LogsParams:
    model: str
    lines: int = 100
    follow: bool = False


@attrs.frozen(kw_only=True)
class KeyAddParams(KeySettings):
    """The key's settings, flat beside its name (as routerctl sends them)."""

    name: str


@attrs.frozen
class NameParams:
    name: str


@attrs.frozen
class EventsParams:
    #: Also one event per finished request.
    requests: bool = False


def _structure_params(raw: Any, cls: type) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object (by-name parameters)")
    try:
        return CONVERTER.structure(raw, cls)
    except (ClassValidationError, ForbiddenExtraKeysError) as exc:
        details = flatten_errors(exc, "params")
        raise RpcError(INVALID_PARAMS, "invalid params: " + "; ".join(details), {"errors": details}) from None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def authorize(uid: int, gid: int, *, own_uid: int, group: str) -> str | None:
    """None when the peer may use the socket, else why not (pure apart from the group database)."""
    if uid in (0, own_uid):
        return None
    if group:
        try:
            entry = grp.getgrnam(group)
        except KeyError:
            return f"control.group {group!r} does not exist"
        if gid == entry.gr_gid:
            return None
        try:
            user = pwd.getpwuid(uid)
            if entry.gr_gid in os.getgrouplist(user.pw_name, user.pw_gid) or user.pw_name in entry.gr_mem:
                return None
        except KeyError:
            pass
        return f"uid {uid} is not root, routerd's user, or a member of group {group!r}"
    return f"uid {uid} is not root or routerd's user (set control.group to allow a group)"


#: A method: its params and the client's connection in, its result (or a coroutine of it) out.
Method = Callable[[Any, Connection], Any]


class CallCounter(Protocol):
    """Where each call is counted (``routerd.ops.metrics.Metrics``)."""

    def control_call(self, method: str, outcome: str) -> None: ...


class ControlServer:
    def __init__(self, operations: Operations, path: str, settings: ControlConfig | None = None, *,
                 counter: CallCounter | None = None) -> None:
        self.operations = operations
        self.counter = counter
        self.path = path
        self.settings = settings or ControlConfig()
        self._connections: set[Connection] = set()
        self._scope = trio.CancelScope()
        ops = operations
        # Each method: its params' type, and the operation it runs (a coroutine, or an answer).
        self._methods: dict[str, tuple[type, Method]] = {
            "ping": (NoParams, lambda p, conn: "pong"),
            "version": (NoParams, lambda p, conn: ops.version()),
            "status": (StatusParams, lambda p, conn: ops.overview() if p.model is None else ops.model(p.model)),
            "models": (NoParams, lambda p, conn: ops.models()),
            "load": (LoadParams, lambda p, conn: ops.load(p.model, wait=p.wait,
                                                           progress=partial(conn.notify, "progress"))),
            "unload": (UnloadParams, lambda p, conn: ops.unload(p.model, force=p.force)),
            "reload": (NoParams, lambda p, conn: ops.reload()),
            "rescan": (NoParams, lambda p, conn: ops.rescan()),
            "logs": (LogsParams, self._logs),
            "memory": (NoParams, lambda p, conn: ops.memory()),
            "reset": (ModelParams, lambda p, conn: ops.reset(p.model)),
            "import": (PathParams, lambda p, conn: ops.import_models(p.path)),
            "pull": (PullParams, lambda p, conn: ops.pull(p.model, p.file, partial(conn.notify, "progress"))),
            # logged (never the key) by call()
            "keys.add": (KeyAddParams, lambda p, conn: ops.add_key(p.name, p.settings())),
            "keys.list": (NoParams, lambda p, conn: ops.list_keys()),
            "keys.revoke": (NameParams, lambda p, conn: ops.revoke_key(p.name)),
            "events": (EventsParams, self._events),
        }

    # -- socket ---------------------------------------------------------------------------
    async def _refuse_if_live(self) -> None:
        if not await trio.Path(self.path).exists():
            return
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(self.path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                os.unlink(self.path)  # stale: its routerd is gone
                log.info("replaced stale control socket %s", self.path)
                return
            raise
        finally:
            probe.close()
        raise StartupError(f"another routerd is already listening on {self.path}; stop it first "
                           f"(routerctl --socket {self.path} status) or set control.socket to another path")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise NotWritable(f"cannot create the control socket's directory {directory}: {exc.strerror}; "
                              "fix its permissions or set control.socket to a path routerd may write") from None
        await self._refuse_if_live()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window with wider permissions
        try:
            await sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise NotWritable(f"cannot create the control socket {self.path}: {exc.strerror}; "
                              "fix its directory's permissions or set control.socket") from None
        finally:
            os.umask(old_umask)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        try:
            with self._scope:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener])
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Stop serving: the listener and open connections end, the socket file is removed."""
        self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One client's whole connection. Nothing it sends or causes may escape from here: an
        exception leaving a handler would end ``serve_listeners`` and the daemon with it."""
        try:
            peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
        except OSError:
            peer = (0, -1, -1)
        conn = Connection(stream, peer=peer, idle_timeout=self.settings.idle_timeout)
        try:
            with conn.scope:
                await self._serve_connection(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to clean beyond this connection
        except Exception:
            log.exception("control: connection of %s failed", conn)
            await try_send(conn, error_reply(None, RpcError(INTERNAL_ERROR, "internal error; see routerd's log")))
        finally:
            self._connections.discard(conn)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_connection(self, conn: Connection) -> None:
        why = authorize(conn.uid, conn.gid, own_uid=os.getuid(), group=self.settings.group)
        if why:
            log.warning("control: refused connection of %s: %s", conn, why)
            await conn.refuse(RpcError(PERMISSION_DENIED, f"permission denied: {why}"))
            return
        if not self._make_room_for_connection():
            log.warning("control: refused connection of %s: %d connections are busy (control.max_connections)",
                        conn, len(self._connections))
            await conn.refuse(RpcError(TOO_MANY_CONNECTIONS, f"too many control connections ({len(self._connections)} "
                                                             "busy; control.max_connections); retry when one ends"))
            return
        self._connections.add(conn)
        try:
            async for line in conn.lines():
                conn.busy = True
                try:
                    reply = await self.handle_line(line, conn)
                    if reply is not None:
                        await conn.send(reply)
                finally:
                    conn.busy = False
                    conn.idle_since = trio.current_time()
        except RpcError as exc:  # framing: the line itself is unusable, so is the connection
            log.warning("control: closing the connection of %s: %s", conn, exc.message)
            await try_send(conn, error_reply(None, exc))

    def _make_room_for_connection(self) -> bool:
        """Whether another connection may be served, closing the longest-idle one if needed.

        Idle clients never lock others out: at the limit, the one idle longest is closed (it may
        reconnect); only when every connection is running a method is the newcomer refused.
        """
        if len(self._connections) < self.settings.max_connections:
            return True
        idle = [conn for conn in self._connections if not conn.busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda conn: conn.idle_since)
        log.info("control: closing the idle connection of %s to make room (control.max_connections)", oldest)
        self._connections.discard(oldest)
        oldest.scope.cancel()
        return True

    # -- protocol -------------------------------------------------------------------------
    async def handle_line(self, line: bytes, conn: Connection) -> Any:
        try:
            message = client_json.loads(line, max_depth=MAX_DEPTH)
        except client_json.InvalidJson as exc:
            log.info("control: parse error from %s: %s", conn, exc)
            return error_reply(None, RpcError(PARSE_ERROR, f"parse error: {exc}"))
        if isinstance(message, list):
            if not message:
                return error_reply(None, RpcError(INVALID_REQUEST, "invalid request: empty batch"))
            if len(message) > MAX_BATCH:
                return error_reply(None, RpcError(INVALID_REQUEST, f"invalid request: a batch holds at most "
                                                              f"{MAX_BATCH} requests, this one {len(message)}"))
            replies = [await self.handle_one(item, conn) for item in message]
            return [r for r in replies if r is not None] or None
        return await self.handle_one(message, conn)

    async def handle_one(self, message: Any, conn: Connection) -> dict[str, Any] | None:
        if (not isinstance(message, dict) or message.get("jsonrpc") != "2.0"
                or not isinstance(message.get("method"), str)):
            request_id = message.get("id") if isinstance(message, dict) else None
            return error_reply(request_id if valid_id(request_id) else None, RpcError(
                INVALID_REQUEST, "invalid request: need an object with jsonrpc \"2.0\" and a method"))
        request_id = message.get("id")
        is_notification = "id" not in message
        if not valid_id(request_id):
            return error_reply(None, RpcError(INVALID_REQUEST, "invalid request: id must be a string, number or null"))
        try:
            result = await self.call(message["method"], message.get("params"), conn)
        except RpcError as exc:
            return None if is_notification else error_reply(request_id, exc)
        return None if is_notification else {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def call(self, method: str, raw_params: Any, conn: Connection) -> Any:
        if method not in self._methods:
            self._count("unknown", "error")  # a label: never the client's text
            shown = method if len(method) <= 64 else method[:64] + "..."
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {shown!r}; known: {', '.join(sorted(self._methods))}")
        params_type, handler = self._methods[method]
        outcome = "error"
        try:
            params = _structure_params(raw_params, params_type)
            if method in STATE_CHANGING:
                log.info("control: %s %s by uid %d (pid %d)", method, _brief(raw_params), conn.uid, conn.pid)
            result = handler(params, conn)
            if inspect.isawaitable(result):
                result = await result
            outcome = "ok"
            return result
        except RpcError:
            raise
        except ConfigError as exc:
            raise RpcError(exc.rpc_code, exc.message, {"errors": exc.errors}) from None
        except RouterdError as exc:
            raise RpcError(exc.rpc_code, exc.message, exc.openai_body()["error"]) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:
            log.exception("control method %s from %s failed", method, conn)
            raise RpcError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}") from None
        finally:
            self._count(method, outcome)

    def _count(self, method: str, outcome: str) -> None:
        if self.counter is not None:
            self.counter.control_call(method, outcome)

    # -- methods --------------------------------------------------------------------------
    async def _logs(self, params: LogsParams, conn: Connection) -> LogsResult:
        if not params.follow:
            return await self.operations.logs(params.model, params.lines)

        async def send(line: str) -> None:
            await conn.notify("log", {"model": model, "line": line})

        model = self.operations.supervisor.catalog.resolve(params.model).name
        result = LogsResult(model=model, lines=[], running=False)  # what a follow ends with
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_hangup, conn, nursery.cancel_scope)
            result = await self.operations.logs(model, params.lines, follow=send)
            nursery.cancel_scope.cancel()
        return result

    async def _events(self, params: EventsParams, conn: Connection) -> dict[str, Any]:
        """Each event as an ``event`` notification until the client hangs up (or falls too far
        behind: then a ``dropped`` event ends it)."""
        with self.operations.supervisor.bus.subscribe(requests=params.requests) as subscription:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_hangup, conn, nursery.cancel_scope)
                with subscription.scope:
                    async for event in subscription:
                        await conn.notify("event", event.to_dict())
                nursery.cancel_scope.cancel()
        return {"ended": "dropped" if subscription.dropped else "client left"}


def _brief(params: Any) -> str:
    """Params for a log line: short, whatever the client sent."""
    text = json.dumps(params) if params is not None else "{}"
    return text if len(text) <= 200 else text[:200] + "..."
