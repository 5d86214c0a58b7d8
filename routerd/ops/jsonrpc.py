"""JSON-RPC 2.0 over a byte stream, one JSON object per line: the control socket's framing.

Owns one client's connection (reading request lines up to a limit, the idle timeout, keeping
what arrives while a long method runs, refusing and hanging up cleanly), the error codes, the
error object and the reply shapes, and writing every message with the one serialiser
(``front.operations.json_default``). It knows no method, no permission and no daemon: those are
``control.py``'s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import trio

from routerd.front.operations import json_default

log = logging.getLogger("routerd.control")
#: Longest request line (bytes); a longer one is an error and ends the connection.
MAX_LINE = 1 << 20

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
PERMISSION_DENIED, TOO_MANY_CONNECTIONS = -32010, -32011


class RpcError(Exception):
    """A JSON-RPC error: its code, message and optional data, answered as the reply's ``error``."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class Connection:
    """One client: reads lines, answers each request, may send notifications in between."""

    def __init__(self, stream: trio.SocketStream, *, peer: tuple[int, int, int] = (0, -1, -1),
                 idle_timeout: float = math.inf) -> None:
        self.stream = stream
        self.pid, self.uid, self.gid = peer
        self.idle_timeout = idle_timeout
        #: A method is running for this client (it is not idle, and is never evicted).
        self.busy = False
        self.idle_since = trio.current_time()
        self.scope = trio.CancelScope()
        self._buffer = b""

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"

    async def send(self, message: dict[str, Any] | list[dict[str, Any]]) -> None:
        await self.stream.send_all(json.dumps(message, default=json_default).encode() + b"\n")

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        await self.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def refuse(self, error: RpcError) -> None:
        """Answer ``error`` and end the connection so that the client reads it: what it sent
        meanwhile is read and dropped (closing with unread data would reset the connection)."""
        await self.send(error_reply(None, error))
        await self.stream.send_eof()
        with trio.move_on_after(1.0):
            while await self.stream.receive_some(65536):
                pass

    async def hung_up(self) -> None:
        """Return when the client closes its end; for long methods that only send meanwhile.

        Anything the client sends in the meantime is kept for the next request, up to a line's
        limit: a client that keeps sending past it is treated as gone.
        """
        while len(self._buffer) <= MAX_LINE and (chunk := await self.stream.receive_some(65536)):
            self._buffer += chunk

    async def lines(self) -> AsyncIterator[bytes]:
        """Each request line; ends when the client closes, or has been idle ``idle_timeout`` s."""
        while True:
            deadline = trio.current_time() + self.idle_timeout
            while b"\n" not in self._buffer:
                if len(self._buffer) > MAX_LINE:
                    raise RpcError(INVALID_REQUEST, f"request line longer than {MAX_LINE} bytes (the limit)")
                with trio.move_on_at(deadline):
                    chunk = await self.stream.receive_some(65536)
                    if not chunk:
                        return
                    self._buffer += chunk
                    continue
                log.info("control: closing the connection of %s, idle for %g s (control.idle_timeout)",
                         self, self.idle_timeout)
                return
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                yield line


def valid_id(request_id: Any) -> bool:
    """Whether a request's id is one JSON-RPC allows (a string, a number or null; never a bool)."""
    return request_id is None or (isinstance(request_id, (str, int)) and not isinstance(request_id, bool))


def error_reply(request_id: Any, exc: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": exc.body()}


async def cancel_on_hangup(conn: Connection, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once the client closes its end (a long method's watcher)."""
    await conn.hung_up()
    scope.cancel()


async def try_send(conn: Connection, message: dict[str, Any]) -> None:
    """Send ``message`` unless the client has gone: the last word of a failing connection."""
    try:
        await conn.send(message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
