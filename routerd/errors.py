"""The one exception family of the daemon.

A RouterdError carries everything each edge needs to render it: the OpenAI error ``type`` and
``code``, the HTTP status, and the JSON-RPC error code. It is raised where the problem is known
and rendered once, by the HTTP API and by the control plane. This module must not import any
other routerd module.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RouterdError(Exception):
    """Base class: a failure to report to a client rather than a bug."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    rpc_code: ClassVar[int] = -32000
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, data: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.data = data or {}
        self.retry_after = retry_after

    def copy(self) -> RouterdError:
        """The same error, to raise again in another task."""
        return type(self)(self.message, code=self.code, data=self.data, retry_after=self.retry_after)

    def openai_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code}
        error.update(self.data)
        return {"error": error}

    def http_headers(self) -> list[tuple[str, str]]:
        """Headers that go with the error's HTTP response (Retry-After when known)."""
        if self.retry_after is None:
            return []
        return [("Retry-After", str(max(1, round(self.retry_after))))]


class BadRequest(RouterdError):
    status = 400
    type = "invalid_request_error"
    rpc_code = -32602
    code = "invalid_request"


class NotFound(RouterdError):
    status = 404
    type = "not_found_error"
    rpc_code = -32004
    code = "not_found"


class UnknownModel(NotFound):
    code = "model_not_found"
    rpc_code = -32001


class PayloadTooLarge(RouterdError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    rpc_code = -32602


class TooManyRequests(RouterdError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    rpc_code = -32005


class Unavailable(RouterdError):
    """The model cannot serve now (failed to start, shutting down, no memory)."""

    status = 503
    type = "unavailable_error"
    code = "unavailable"
    rpc_code = -32002


class LoadFailed(Unavailable):
    code = "backend_start_failed"


class InsufficientMemory(Unavailable):
    code = "insufficient_memory"
    rpc_code = -32003


class UpstreamFailed(RouterdError):
    """The backend died or broke the connection mid-request."""

    status = 502
    type = "server_error"
    code = "backend_failed"
    rpc_code = -32006


class ConfigError(RouterdError):
    """A config that does not validate; ``errors`` lists every problem with its path."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_config"
    rpc_code = -32007

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        super().__init__(f"{source} is invalid:\n  " + "\n  ".join(errors), data={"errors": errors})
