#!/usr/bin/env python3
"""The design's floor, for `make bench`: what routerd's HTTP front costs before routerd does anything.

routerd's cost per request and per relayed event sits on a fixed design (hypercorn's protocol
code and trio, behind routerd.front.http_server). To tell what routerd's own logic adds from
what the design costs, this serves two trivial ASGI apps on that same front, with the daemon's
hypercorn settings (``http_server.hypercorn_config`` of the default ``[server]``, which is what
bench/cost.py runs routerd with, and the same write timeout):

- ``--app front``: answers ``/tokenize`` and ``/v1/embeddings`` with a small fixed body and
  streams ``max_tokens`` SSE events, one every ``--interval`` s, for chat completions: the front
  alone, no upstream.
- ``--app relay``: sends every POST to ``--upstream-port`` (the stand-in) over routerd's own
  upstream client and relays the answer: a proxy with no routing, queueing, metrics or
  disconnect watching.

Figures only (bench/cost.py reads this process's CPU); it is not part of routerd.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routerd.backends.upstream import ConnectionPool  # noqa: E402
from routerd.config import ServerConfig  # noqa: E402
from routerd.front import http_server  # noqa: E402
from standin import EMBEDDING, EVENT, LAST, TOKENIZE  # noqa: E402

Scope = dict[str, Any]


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def _with_lifespan(app: Any) -> Any:
    """``app`` for HTTP, with the lifespan protocol acknowledged around it (hypercorn waits for it)."""
    async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    return wrapped


def front_app(interval: float) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        body = await _body(receive)
        if scope["path"] == "/v1/chat/completions":
            events = json.loads(body or b"{}").get("max_tokens", 10)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            deadline = trio.current_time()
            for _ in range(events):
                deadline += interval
                await trio.sleep_until(deadline)
                await send({"type": "http.response.body", "body": EVENT, "more_body": True})
            await send({"type": "http.response.body", "body": LAST})
            return
        answer = EMBEDDING if scope["path"] == "/v1/embeddings" else TOKENIZE
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})
    return app


def relay_app(upstream_port: int) -> Any:
    pool = ConnectionPool(upstream_port, max_idle=512)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        body = await _body(receive)
        response = await pool.request(scope["method"], scope["path"], body=body,
                                      headers=[(b"content-type", b"application/json")])
        try:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.header(b"content-type"))]})
            async for part in response:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.aclose_now()
    return app


async def main(args: argparse.Namespace) -> None:
    server = ServerConfig(host="127.0.0.1", port=args.port)  # routerd's defaults, as bench/cost.py runs it
    app = front_app(args.interval) if args.app == "front" else relay_app(args.upstream_port)
    await http_server.serve(_with_lifespan(app), http_server.hypercorn_config(server),
                            shutdown_trigger=trio.sleep_forever, send_timeout=server.send_timeout,
                            plain_on_hypercorn=args.server == "hypercorn")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", choices=("front", "relay"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between two events of a stream")
    parser.add_argument("--upstream-port", type=int, default=0, help="the stand-in's port (--app relay)")
    parser.add_argument("--server", choices=("routerd", "hypercorn"), default="routerd",
                        help="who serves plain HTTP/1.1: routerd's own handler, or hypercorn (the reference)")
    trio.run(main, parser.parse_args())
