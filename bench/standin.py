#!/usr/bin/env python3
"""A fast stand-in for llama-server, for measuring routerd's own cost (`make bench`).

llama-server on a 2-core machine answers a few hundred cheap requests and a few hundred
tokens a second; routerd's cost per request and per relayed event has to be measured at rates
above that. This server accepts llama-server's command line, answers ``/health`` at once,
``/tokenize`` and ``/v1/embeddings`` with small fixed bodies, and streams chat completions as
SSE events of llama-server's size and framing (chunked), paced by one timer for all streams:
``--standin-interval`` seconds between two events of a stream, ``max_tokens`` events per
stream. Plain asyncio protocols, no framework: it must cost far less than what it measures.

It is not a test double (tests/fake_llama_server.py injects faults); it only needs to be fast
and regular.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

EVENT = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" token"}}],'
         b'"created":1795415877,"id":"chatcmpl-standin","model":"standin","system_fingerprint":"b0-standin",'
         b'"object":"chat.completion.chunk"}\n\n')
LAST = b'data: [DONE]\n\n'
TOKENIZE = b'{"tokens":[28120,905]}'
EMBEDDING = json.dumps({"model": "standin", "object": "list", "usage": {"prompt_tokens": 2, "total_tokens": 2},
                        "data": [{"embedding": [0.0123] * 64, "index": 0, "object": "embedding"}]}).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def plain(status: int, body: bytes) -> bytes:
    reason = b"OK" if status == 200 else b"Not Found"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Keep-Alive: timeout=5, max=100000\r\n\r\n%s" % (status, reason, len(body), body))


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Keep-Alive: timeout=5, max=100000\r\n\r\n")


class Pacer:
    """One timer for every open stream: each tick writes one event to each."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.streams: dict[asyncio.Transport, int] = {}  # events left to send

    async def run(self) -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += self.interval
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            for transport, left in list(self.streams.items()):
                if transport.is_closing():
                    del self.streams[transport]
                elif left <= 1:
                    del self.streams[transport]
                    transport.write(chunk(EVENT) + chunk(LAST) + b"0\r\n\r\n")
                else:
                    self.streams[transport] = left - 1
                    transport.write(chunk(EVENT))


class Connection(asyncio.Protocol):
    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self.answer(method, path, body)

    def answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and path in ("/health", "/v1/health"):
            self.transport.write(plain(200, b'{"status":"ok"}'))
        elif method == "GET" and path in ("/v1/models", "/models"):
            self.transport.write(plain(200, b'{"object":"list","data":[{"id":"standin","object":"model"}]}'))
        elif path == "/tokenize":
            self.transport.write(plain(200, TOKENIZE))
        elif path in ("/v1/embeddings", "/embeddings", "/embedding"):
            self.transport.write(plain(200, EMBEDDING))
        elif path in ("/v1/chat/completions", "/v1/completions", "/completion"):
            request = json.loads(body or b"{}")
            events = int(request.get("max_tokens") or 16)
            if request.get("stream"):
                self.transport.write(SSE_HEAD)
                self.pacer.streams[self.transport] = events
            else:
                self.transport.write(plain(200, json.dumps({
                    "choices": [{"index": 0, "finish_reason": "length",
                                 "message": {"role": "assistant", "content": " token" * events}}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": events, "total_tokens": events + 4},
                }).encode()))
        else:
            self.transport.write(plain(
                404, b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'))


async def serve(host: str, port: int, interval: float) -> None:
    pacer = Pacer(interval)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(pacer), host, port, backlog=1024)
    print(f"main: server is listening on http://{host}:{port}", flush=True)
    async with server:
        await pacer.run()


#: What it says to --help: routerd asks every binary which of its flags it knows, and where it
#: reads its API key from, before starting it (routerd/llama_build.py).
HELP = """--model FNAME       model path (ignored)
--alias STRING      model name aliases (ignored)
--port PORT         port to listen
--fit [on|off]      (ignored)
--metrics           (ignored)
--mmproj FILE       (ignored)
--slot-save-path P  (ignored)
--api-key KEY       API key (ignored: the stand-in checks none)
                    (env: LLAMA_API_KEY)"""


def main() -> None:
    if "--version" in sys.argv[1:]:
        print("version: 0 (bench stand-in)", flush=True)
        return
    if "--help" in sys.argv[1:]:
        print(HELP, flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", "-m", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--standin-interval", type=float, default=0.01, help="seconds between two events of a stream")
    args, _ = parser.parse_known_args()  # every other llama-server flag is accepted and ignored
    try:
        asyncio.run(serve(args.host, args.port, args.standin_interval))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
