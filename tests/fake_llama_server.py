#!/usr/bin/env python3
"""A small stand-in for llama-server, with fault injection, for fast tests.

Speaks the parts of llama-server's HTTP API routerd relies on (/health with 503 while loading,
chat/completions streaming and not, completions, embeddings, tokenize, props, slots) and accepts
llama-server's command line. Faults come from environment variables so a test can set them per
model through the backend args' environment... or through flags routerd passes verbatim:

  --fake-load-seconds S     answer 503 "Loading model" for S seconds first
  --fake-exit-during-load C exit with code C while loading
  --fake-crash-after N      die (SIGKILL itself) after streaming N chunks
  --fake-ignore-sigterm     ignore SIGTERM (routerd must SIGKILL after the grace)
  --fake-token-delay S      seconds between streamed tokens
  --fake-tokens N           tokens per completion (default 8)
  --fake-silent-load        print nothing while loading (to test the stall timeout)
  --fake-hang-after S       S seconds after loading, stop answering anything (/health included)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: What it says to --help, as llama-server does: routerd asks every binary which flags it knows.
HELP = """----- common params -----
-c,    --ctx-size N                     size of the prompt context
-np,   --parallel N                     number of server slots
-fit,  --fit [on|off]                   whether to adjust unset arguments to fit in device memory
-m,    --model FNAME                    model path
-mm,   --mmproj FILE                    path to a multimodal projector file
-a,    --alias STRING                   set model name aliases
--host HOST                             ip address to listen
--port PORT                             port to listen
--api-key KEY                           API key to use for authentication
                                        (env: LLAMA_API_KEY)
--metrics                               enable prometheus compatible metrics endpoint
--slot-save-path PATH                   path to save slot kv cache
"""
#: A build that predates routerd's flags (``--fake-old-build``, given by a wrapper script, as
#: an older llama.cpp or a fork would be): --help lists none of them, and they are refused.
OLD_BUILD_LACKS = ("--fit", "--alias", "--metrics", "--slot-save-path")


def answer_build_questions(argv: list[str]) -> None:
    """``--version`` and ``--help`` as llama-server answers them; a flag an old build does not
    know is an error, as it is for llama-server."""
    old, no_env_key = "--fake-old-build" in argv, "--fake-no-env-key" in argv
    if "--version" in argv:
        print("version: 4000 (0ldb01d)" if old else "version: 9999 (fake)", flush=True)
        print("built with a stand-in for tests", flush=True)
        sys.exit(0)
    if "--help" in argv:
        lines = HELP.splitlines()
        if old:
            lines = [line for line in lines if not any(flag in line for flag in OLD_BUILD_LACKS)]
        if no_env_key:
            lines = [line for line in lines if "env: LLAMA_API_KEY" not in line]
        print("\n".join(lines), flush=True)
        sys.exit(0)
    if old:
        for flag in OLD_BUILD_LACKS:
            if flag in argv:
                print(f"error: invalid argument: {flag}", file=sys.stderr, flush=True)
                sys.exit(1)


answer_build_questions(sys.argv[1:])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--alias", "-a", default="")
    p.add_argument("--parallel", "-np", type=int, default=4)
    p.add_argument("--fake-load-seconds", type=float, default=0.0)
    p.add_argument("--fake-exit-during-load", type=int, default=None)
    p.add_argument("--fake-crash-after", type=int, default=None)
    p.add_argument("--fake-ignore-sigterm", action="store_true")
    p.add_argument("--fake-token-delay", type=float, default=0.0)
    p.add_argument("--fake-tokens", type=int, default=8)
    p.add_argument("--fake-silent-load", action="store_true")
    p.add_argument("--fake-hang-after", type=float, default=None)
    # an embedding takes this long and, like llama-server's batch, does not stop for a client that left
    p.add_argument("--fake-batch-seconds", type=float, default=0.0)
    p.add_argument("--metrics", action="store_true")
    # serve a stand-in of llama.cpp's web UI at / (gzip, as llama-server sends its index.html.gz)
    p.add_argument("--fake-webui", action="store_true")
    p.add_argument("--ctx-size", "-c", type=int, default=4096)
    args, _unknown = p.parse_known_args()  # accept every real llama-server flag
    return args


ARGS = parse()
READY_AT = time.monotonic() + ARGS.fake_load_seconds
STATE: dict = {"in_flight": 0, "prompt_tokens": 0, "predicted": 0, "peak_in_flight": 0, "id_slots": []}
LOCK = threading.Lock()


def log(line: str) -> None:
    print(line, flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body are two writes: without this, Nagle and the client's delayed ACK hold
        # each keep-alive answer back 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt: str, *args: object) -> None:
        if "/health" not in self.path:  # like llama-server, which does not log health checks
            log("request: " + fmt % args)

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _loading(self) -> bool:
        if ARGS.fake_hang_after is not None and time.monotonic() >= READY_AT + ARGS.fake_hang_after:
            time.sleep(3600)  # hung: the connection stays open, nothing is answered
        if time.monotonic() < READY_AT:
            self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
            return True
        return False

    def _refused(self) -> bool:
        """Like llama-server with LLAMA_API_KEY set: every endpoint but /health wants the key."""
        key = os.environ.get("LLAMA_API_KEY")
        if not key or self.path == "/health":
            return False
        given = self.headers.get("Authorization", "").removeprefix("Bearer ") or self.headers.get("X-Api-Key", "")
        if given == key:
            return False
        self._json(401, {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}})
        return True

    def do_GET(self) -> None:
        if self._loading() or self._refused():
            return
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/props":
            self._json(200, {"total_slots": ARGS.parallel, "model_path": ARGS.model, "fake": True,
                             "fake_peak_in_flight": STATE["peak_in_flight"], "fake_id_slots": STATE["id_slots"],
                             "fake_last_body": STATE.get("last_body"),
                             "fake_upload_started": STATE.get("upload_started", False)})
        elif self.path == "/slots":
            busy = STATE["in_flight"]
            self._json(200, [{"id": i, "n_ctx": ARGS.ctx_size, "is_processing": i < busy,
                              "n_prompt_tokens": 100 if i < busy else 0, "next_token": [{"n_decoded": 0}]}
                             for i in range(ARGS.parallel)])
        elif self.path == "/metrics" and ARGS.metrics:  # like llama-server: only with --metrics
            text = ("# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
                    "# TYPE llamacpp:prompt_tokens_total counter\n"
                    f"llamacpp:prompt_tokens_total {STATE['prompt_tokens']}\n"
                    "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n"
                    "# TYPE llamacpp:tokens_predicted_total counter\n"
                    f"llamacpp:tokens_predicted_total {STATE['predicted']}\n"
                    "# HELP llamacpp:requests_processing Number of requests processing.\n"
                    "# TYPE llamacpp:requests_processing gauge\n"
                    f"llamacpp:requests_processing {STATE['in_flight']}\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": ARGS.alias or ARGS.model}]})
        elif self.path == "/" and ARGS.fake_webui:
            page = gzip.compress(b"<!doctype html><title>llama.cpp</title><p>fake web UI of " + ARGS.model.encode())
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        else:  # with the target as it arrived, for tests of what routerd forwards
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"},
                             "fake_target": self.path})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.path.startswith("/v1/audio/"):  # an upload: say it began before it is read whole
            STATE["upload_started"] = True
            self._audio(self.rfile.read(length))
            return
        raw = self.rfile.read(length)
        STATE["last_body"] = raw.decode("utf-8", "replace")  # as it arrived (props: fake_last_body)
        body = json.loads(raw or b"{}")
        if self._loading() or self._refused():
            return
        with LOCK:
            STATE["in_flight"] += 1
            STATE["peak_in_flight"] = max(STATE["peak_in_flight"], STATE["in_flight"])
            STATE["id_slots"].append(body.get("id_slot"))  # the slot each request asked for (props)
        try:
            self._post(body)
        except (BrokenPipeError, ConnectionResetError):
            log("client disconnected; generation cancelled")
        finally:
            with LOCK:
                STATE["in_flight"] -= 1

    def _audio(self, raw: bytes) -> None:
        """A transcription: the form's file size and model (llama-server answers audio-capable
        models here)."""
        boundary = self.headers.get("Content-Type", "").partition("boundary=")[2].strip('"').encode()
        fields = {}
        for part in raw.split(b"--" + boundary)[1:-1]:
            head, _, content = part.partition(b"\r\n\r\n")
            name = head.partition(b'name="')[2].partition(b'"')[0].decode()
            fields[name] = content[:-2]  # the CRLF before the next delimiter
        self._json(200, {"text": f"fake transcription of {len(fields.get('file', b''))} bytes",
                         "model": fields.get("model", b"").decode(), "received": len(raw)})

    def _post(self, body: dict) -> None:
        path = self.path
        if path in ("/tokenize",):
            self._json(200, {"tokens": [ord(c) for c in body.get("content", "")]})
        elif path == "/detokenize":
            self._json(200, {"content": "".join(chr(t) for t in body.get("tokens", []))})
        elif path in ("/v1/embeddings", "/embeddings", "/embedding"):
            time.sleep(ARGS.fake_batch_seconds)
            self._json(200, {"object": "list", "model": ARGS.alias,
                             "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]})
        elif path in ("/v1/chat/completions", "/v1/completions", "/completion", "/chat/completions"):
            n = int(body.get("max_tokens") or body.get("n_predict") or ARGS.fake_tokens)
            prompt = prompt_tokens(body)
            with LOCK:
                STATE["prompt_tokens"] += prompt
                STATE["predicted"] += n
            if body.get("stream"):
                self._stream(n, chat="chat" in path, prompt=prompt)
            else:
                for _ in range(n):  # like llama-server, notice a client that hung up while generating
                    time.sleep(ARGS.fake_token_delay)
                    if self._client_gone():
                        log("client disconnected; generation cancelled")
                        return
                text = " ".join(f"tok{i}" for i in range(n))
                choice = {"index": 0, "finish_reason": "length"}
                choice.update({"message": {"role": "assistant", "content": text}} if "chat" in path else {"text": text})
                self._json(200, {"object": "chat.completion", "model": ARGS.alias, "choices": [choice],
                                 "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                           "total_tokens": prompt + n}})
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

    def _stream(self, n: int, chat: bool, prompt: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        for i in range(n):
            if ARGS.fake_crash_after is not None and i >= ARGS.fake_crash_after:
                log("fake crash mid-stream")
                os.kill(os.getpid(), signal.SIGKILL)
            delta = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
            chunk(b"data: " + json.dumps({"choices": [{"index": 0, **delta}]}).encode() + b"\n\n")
            log(f"streamed token {i}")
            time.sleep(ARGS.fake_token_delay)
        # Like llama-server: the last chunk carries timings (usage only when asked for).
        last = {"choices": [{"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}],
                "timings": {"cache_n": 0, "prompt_n": prompt, "predicted_n": n}}
        chunk(b"data: " + json.dumps(last).encode() + b"\n\n")
        chunk(b"data: [DONE]\n\n")
        chunk(b"")


def prompt_tokens(body: dict) -> int:
    """A stand-in token count: one per word of the prompt or messages."""
    text = body.get("prompt") or " ".join(str(m.get("content", "")) for m in body.get("messages", [])
                                          if isinstance(m, dict))
    return max(1, len(str(text).split()))


def main() -> None:
    if ARGS.fake_ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = ThreadingHTTPServer((ARGS.host, ARGS.port), Handler)
    server.daemon_threads = True
    log(f"fake llama-server: listening on http://{ARGS.host}:{ARGS.port} model {ARGS.model}")
    if ARGS.fake_exit_during_load is not None:
        log("loading model... failing on purpose")
        time.sleep(0.05)
        sys.exit(ARGS.fake_exit_during_load)
    if not ARGS.fake_silent_load:
        threading.Thread(target=_loading_progress, daemon=True).start()
    server.serve_forever()


def _loading_progress() -> None:
    while time.monotonic() < READY_AT:
        log("loading model tensors ...")
        time.sleep(0.2)
    log("model loaded")


if __name__ == "__main__":
    main()
