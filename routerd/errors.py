"""The one exception family of the daemon.

A RouterdError carries everything each edge needs to render it: the OpenAI error ``type`` and
``code``, the HTTP status, and the JSON-RPC error code. It is raised where the problem is known
and rendered once, by the HTTP API and by the control plane. This module must not import any
other routerd module.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

#: ``routerd serve`` exit statuses (sysexits.h where one fits): documented in the README.
EXIT_INTERNAL = 1  # a bug: routerd says so and points at --debug
EXIT_USAGE = 2  # a bad command line (argparse's own)
EXIT_UNAVAILABLE = 69  # something is in the way: the port, another routerd's socket
EXIT_CANTCREAT = 73  # a directory routerd must write is not writable
EXIT_CONFIG = 78  # the config is invalid or unreadable, or llama-server cannot be found


class RouterdError(Exception):
    """Base class: a failure to report to a client rather than a bug."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    rpc_code: ClassVar[int] = -32000
    #: How ``routerd serve`` exits when this error stops it from starting.
    exit_status: ClassVar[int] = EXIT_INTERNAL
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
        return [("Retry-After", str(max(1, math.ceil(self.retry_after))))]  # never too early


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


class Unauthorized(RouterdError):
    """No API key, or one routerd does not know (or has expired): OpenAI's 401."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    rpc_code = -32010

    def http_headers(self) -> list[tuple[str, str]]:
        return [("WWW-Authenticate", 'Bearer realm="routerd"'), *super().http_headers()]


class Forbidden(RouterdError):
    """A valid key that may not do this (an admin action with a key that is not admin)."""

    status = 403
    type = "permission_error"
    code = "admin_key_required"
    rpc_code = -32010


class _BodyUnread(RouterdError):
    """Answered before the request's body was read: the connection cannot carry another
    request, and saying so stops a keep-alive client from sending one into a closing socket."""

    def http_headers(self) -> list[tuple[str, str]]:
        return [("Connection", "close"), *super().http_headers()]


class PayloadTooLarge(_BodyUnread):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    rpc_code = -32602


class RequestTimeout(_BodyUnread):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    rpc_code = -32602


class HeadersTooLarge(RouterdError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"
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


class StartupError(RouterdError):
    """routerd cannot start because something is in its way (a port, another routerd)."""

    exit_status = EXIT_UNAVAILABLE
    code = "startup_failed"


class NotWritable(StartupError):
    """A directory routerd must write to (state, control socket) is not writable."""

    exit_status = EXIT_CANTCREAT
    code = "not_writable"


class ConfigError(RouterdError):
    """A config that does not validate; ``errors`` lists every problem with its path."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_config"
    rpc_code = -32007
    exit_status = EXIT_CONFIG

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        super().__init__(f"{source} is invalid:\n  " + "\n  ".join(errors), data={"errors": errors})


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``'s (nested) exception groups, or ``[exc]`` (pure)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]
