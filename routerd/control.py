"""The control plane: JSON-RPC 2.0 over a Unix socket, one JSON object per line.

Owns the socket (path, mode 0660 set through the umask, stale-file replacement, refusing to
start beside a live routerd), peer-credential checks, framing, batches, notifications, and the
method table. Methods call the supervisor and the daemon; none holds logic of its own beyond
shaping params and results. See docs/control-protocol.md.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import cattrs
import trio
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from routerd import __version__
from routerd.config import flatten_errors
from routerd.errors import ConfigError, RouterdError

if TYPE_CHECKING:
    from routerd.backend import Backend
    from routerd.daemon import Daemon
    from routerd.logring import LogLine
    from routerd.supervisor import Supervisor

log = logging.getLogger("routerd.control")
MAX_LINE = 1 << 20

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
PERMISSION_DENIED = -32010


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
class ModelParams:
    model: str


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


_params_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
_converter = cattrs.Converter()


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def _structure_params(raw: Any, cls: type) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object (by-name parameters)")
    try:
        return _params_converter.structure(raw, cls)
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


class Connection:
    """One client: reads lines, answers each request, may send notifications in between."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def send(self, message: dict[str, Any] | list[dict[str, Any]]) -> None:
        await self.stream.send_all(json.dumps(message, default=_json_default).encode() + b"\n")

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        await self.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def hung_up(self) -> None:
        """Return when the client closes its end; for long methods that only send meanwhile.

        Anything the client sends in the meantime is kept for the next request.
        """
        while chunk := await self.stream.receive_some(65536):
            self._buffer += chunk

    async def lines(self) -> Any:
        while True:
            while b"\n" not in self._buffer:
                if len(self._buffer) > MAX_LINE:
                    raise RpcError(INVALID_REQUEST, f"request line longer than {MAX_LINE} bytes")
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                yield line


def _json_default(value: Any) -> Any:
    if attrs.has(type(value)):
        return _converter.unstructure(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


Method = Callable[[Any, Connection], Awaitable[Any]]


class ControlServer:
    def __init__(self, daemon: Daemon, path: str, *, allowed_group: str = "") -> None:
        self.daemon = daemon
        self.path = path
        self.allowed_group = allowed_group
        self._scope = trio.CancelScope()
        self._methods: dict[str, tuple[type, Method]] = {
            "ping": (NoParams, self._ping),
            "version": (NoParams, self._version),
            "status": (StatusParams, self._status),
            "models": (NoParams, self._models),
            "load": (LoadParams, self._load),
            "unload": (UnloadParams, self._unload),
            "reload": (NoParams, self._reload),
            "rescan": (NoParams, self._rescan),
            "logs": (LogsParams, self._logs),
            "memory": (NoParams, self._memory),
            "reset": (ModelParams, self._reset),
            "import": (PathParams, self._import),
            "pull": (PullParams, self._pull),
        }

    # -- socket ---------------------------------------------------------------------------
    async def _refuse_if_live(self) -> None:
        if not os.path.exists(self.path):
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
        raise RouterdError(f"another routerd is already listening on {self.path}; stop it first "
                           f"(routerctl --socket {self.path} status) or set control.socket to another path")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        await self._refuse_if_live()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window with wider permissions
        try:
            await sock.bind(self.path)
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
        conn = Connection(stream)
        try:
            _, uid, gid = peer_credentials(stream.socket)  # type: ignore[arg-type]
            why = authorize(uid, gid, own_uid=os.getuid(), group=self.allowed_group)
            if why:
                log.warning("refused control connection: %s", why)
                await conn.send({"jsonrpc": "2.0", "id": None,
                                 "error": RpcError(PERMISSION_DENIED, f"permission denied: {why}").body()})
                return
            async for line in conn.lines():
                reply = await self.handle_line(line, conn)
                if reply is not None:
                    await conn.send(reply)
        except RpcError as exc:
            await _try_send(conn, {"jsonrpc": "2.0", "id": None, "error": exc.body()})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to clean beyond this connection
        finally:
            await stream.aclose()

    # -- protocol -------------------------------------------------------------------------
    async def handle_line(self, line: bytes, conn: Connection) -> Any:
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(None, RpcError(PARSE_ERROR, f"parse error: {exc}"))
        if isinstance(message, list):
            if not message:
                return _error(None, RpcError(INVALID_REQUEST, "invalid request: empty batch"))
            replies = [await self.handle_one(item, conn) for item in message]
            return [r for r in replies if r is not None] or None
        return await self.handle_one(message, conn)

    async def handle_one(self, message: Any, conn: Connection) -> dict[str, Any] | None:
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or not isinstance(message.get("method"), str):
            return _error(message.get("id") if isinstance(message, dict) else None,
                          RpcError(INVALID_REQUEST, "invalid request: need an object with jsonrpc \"2.0\" and a method"))
        request_id = message.get("id")
        is_notification = "id" not in message
        if request_id is not None and not isinstance(request_id, (str, int)):
            return _error(None, RpcError(INVALID_REQUEST, "invalid request: id must be a string, number or null"))
        try:
            result = await self.call(message["method"], message.get("params"), conn)
        except RpcError as exc:
            return None if is_notification else _error(request_id, exc)
        return None if is_notification else {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def call(self, method: str, raw_params: Any, conn: Connection) -> Any:
        if method not in self._methods:
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {method!r}; known: {', '.join(sorted(self._methods))}")
        params_type, handler = self._methods[method]
        params = _structure_params(raw_params, params_type)
        try:
            return await handler(params, conn)
        except ConfigError as exc:
            raise RpcError(exc.rpc_code, exc.message, {"errors": exc.errors}) from None
        except RouterdError as exc:
            raise RpcError(exc.rpc_code, exc.message, exc.openai_body()["error"]) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:
            log.exception("control method %s failed", method)
            raise RpcError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}") from None

    # -- methods --------------------------------------------------------------------------
    async def _ping(self, params: NoParams, conn: Connection) -> str:
        return "pong"

    async def _version(self, params: NoParams, conn: Connection) -> dict[str, Any]:
        return {"version": __version__, "llama_server": self.daemon.supervisor.binary}

    async def _status(self, params: StatusParams, conn: Connection) -> dict[str, Any]:
        supervisor = self.daemon.supervisor
        if params.model is not None:
            return {"model": supervisor.model_status(supervisor.catalog.resolve(params.model))}
        return {"version": __version__, "pid": os.getpid(), "uptime": time.time() - self.daemon.started,
                "config": self.daemon.config.source, "listen": self.daemon.http_urls, "socket": self.path,
                "summary": self.daemon.status_line(), "models": supervisor.status()}

    async def _models(self, params: NoParams, conn: Connection) -> dict[str, Any]:
        return {"models": self.daemon.supervisor.status()}

    async def _load(self, params: LoadParams, conn: Connection) -> dict[str, Any]:
        supervisor = self.daemon.supervisor
        entry = supervisor.catalog.resolve(params.model)
        if not params.wait:
            supervisor.load_soon(entry.name)
            return {"model": entry.name, "state": "starting"}
        sent = _Progress(entry.name, conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sent.follow, supervisor)
            backend = await supervisor.load(entry.name)
            nursery.cancel_scope.cancel()
        await sent.catch_up(backend)  # lines printed between the last wake-up and ready
        return {"model": entry.name, "state": backend.state.value, "pid": backend.pid, "port": backend.port,
                "load_seconds": (backend.ready_at or 0) - backend.started_at}

    async def _unload(self, params: UnloadParams, conn: Connection) -> dict[str, Any]:
        supervisor = self.daemon.supervisor
        entry = supervisor.catalog.resolve(params.model)
        backend = supervisor.unload(entry.name, force=params.force)
        if backend is None:
            return {"model": entry.name, "state": "unloaded", "was_running": False}
        await backend.wait_gone()
        return {"model": entry.name, "state": "unloaded", "was_running": True, "exit_code": backend.exit_code}

    async def _reload(self, params: NoParams, conn: Connection) -> Any:
        return await self.daemon.reload()

    async def _rescan(self, params: NoParams, conn: Connection) -> Any:
        return await self.daemon.rescan()

    async def _import(self, params: PathParams, conn: Connection) -> dict[str, Any]:
        return {"path": params.path, "added": await self.daemon.import_models(params.path)}

    async def _logs(self, params: LogsParams, conn: Connection) -> dict[str, Any]:
        supervisor = self.daemon.supervisor
        entry = supervisor.catalog.resolve(params.model)
        backend = supervisor.backend(entry.name)
        if backend is None:
            return {"model": entry.name, "lines": [], "running": False}
        last = backend.log.last_seq
        lines = backend.log.tail(params.lines)
        if not params.follow:
            return {"model": entry.name, "lines": [line.text for line in lines], "running": not backend.gone}
        for line in lines:
            await conn.notify("log", {"model": entry.name, "line": line.text})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_hangup, conn, nursery.cancel_scope)
            async for line in backend.log.follow(last):
                await conn.notify("log", {"model": entry.name, "line": line.text})
            nursery.cancel_scope.cancel()
        return {"model": entry.name, "lines": [], "running": False}

    async def _pull(self, params: PullParams, conn: Connection) -> dict[str, Any]:
        def progress(name: str, done: int, total: int | None) -> None:  # called from the download thread
            message = {"jsonrpc": "2.0", "method": "progress",
                       "params": {"model": params.model, "file": name, "bytes": done, "total": total}}
            try:
                trio.from_thread.run(conn.send, message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left; the download goes on

        return await self.daemon.pull(params.model, params.file, progress)

    async def _reset(self, params: ModelParams, conn: Connection) -> dict[str, Any]:
        supervisor = self.daemon.supervisor
        entry = supervisor.catalog.resolve(params.model)
        had_failures = supervisor.reset(entry.name)
        return {"model": entry.name, "had_failures": had_failures, "state": supervisor.state_of(entry.name)}

    async def _memory(self, params: NoParams, conn: Connection) -> dict[str, Any]:
        return self.daemon.supervisor.memory_view()


class _Progress:
    """Sends a loading backend's output as ``progress`` notifications, each line once."""

    def __init__(self, model: str, conn: Connection) -> None:
        self.model = model
        self.conn = conn
        self.last_seq = -1

    async def follow(self, supervisor: Supervisor) -> None:
        backend = None
        while backend is None:  # admission may evict others first; the backend appears after
            backend = supervisor.running(self.model)
            if backend is None:
                await supervisor.wait_changed()
        await self.conn.notify("progress", {"model": self.model, "state": backend.state.value, "pid": backend.pid})
        async for line in backend.log.follow(self.last_seq):
            await self._send(backend, line)

    async def catch_up(self, backend: Backend) -> None:
        for line in backend.log.tail(backend.log.capacity):
            if line.seq > self.last_seq:
                await self._send(backend, line)

    async def _send(self, backend: Backend, line: LogLine) -> None:
        self.last_seq = line.seq
        await self.conn.notify("progress", {"model": self.model, "state": backend.state.value, "line": line.text})


def _error(request_id: Any, exc: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": exc.body()}


async def _cancel_on_hangup(conn: Connection, scope: trio.CancelScope) -> None:
    await conn.hung_up()
    scope.cancel()


async def _try_send(conn: Connection, message: dict[str, Any]) -> None:
    try:
        await conn.send(message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
