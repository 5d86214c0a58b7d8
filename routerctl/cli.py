"""routerctl: manage a running routerd over its control socket.

Owns argument parsing, the JSON-RPC client (blocking, one connection per command), and which
output each command prints (``output.py`` words it for people; ``--json`` prints the answer).
Exit codes: 0 ok, 1 the daemon reported an error, 2 usage error, 3 the daemon is not reachable.
It imports nothing from the daemon but the socket default and the event types.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from routerctl.output import (
    ProgressLine,
    format_event,
    print_details,
    print_keys,
    print_memory,
    print_models,
    print_new_key,
    print_reload,
    print_status,
)
from routerd.paths import client_socket_candidates

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    pass


class DaemonError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "error"))
        self.error = error


class Client:
    """A JSON-RPC 2.0 client over one Unix-socket connection (line-delimited)."""

    def __init__(self, paths: list[str], timeout: float | None = 30.0) -> None:
        """Connect to the first of ``paths`` that answers."""
        failures = []
        for path in paths:
            self.path = path
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path)
                break
            except OSError as exc:
                self._sock.close()
                failures.append(f"{path}: {exc.strerror or exc}")
        else:
            raise Unreachable(f"cannot reach routerd at {'; '.join(failures)}. "
                              "Is it running? Start it with `routerd serve` (or `systemctl start routerd`), "
                              "or point at its socket with --socket / $ROUTERD_SOCKET.") from None
        self._file = self._sock.makefile("rb")
        self._next_id = 1

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_notification: Callable[[dict[str, Any]], None] | None = None) -> Any:
        request_id = self._next_id
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
            for reply in self._replies():
                if "id" not in reply and "method" in reply:
                    if on_notification:
                        on_notification(reply)
                    continue
                if "error" in reply:
                    raise DaemonError(reply["error"])
                return reply.get("result")
        except TimeoutError:
            raise Unreachable(f"routerd at {self.path} did not answer within {self._sock.gettimeout():g} s; "
                              "it may be overloaded: see `journalctl -u routerd` or its log") from None
        except OSError as exc:
            raise Unreachable(f"the connection to routerd at {self.path} broke: {exc.strerror or exc}; "
                              "retry, and check that routerd is running") from None
        raise Unreachable(f"routerd at {self.path} closed the connection without answering")

    def _replies(self) -> Iterator[dict[str, Any]]:
        for line in self._file:
            if line.strip():
                try:
                    reply = json.loads(line)
                except ValueError:
                    reply = None
                if not isinstance(reply, dict):
                    raise Unreachable(f"{self.path} answered something that is not routerd's JSON-RPC "
                                      f"({line[:80]!r}); is --socket pointing at routerd?")
                yield reply


# -- commands -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routerctl", description="Manage a running routerd.")
    parser.add_argument("--socket", "-s", default=None,
                        help="control socket (default: $ROUTERD_SOCKET, $XDG_RUNTIME_DIR/routerd/control.sock, ...)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON result")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="daemon and per-model state")
    status.add_argument("model", nargs="?")
    sub.add_parser("models", help="every model routerd can serve")
    load = sub.add_parser("load", help="start a model now")
    load.add_argument("model")
    load.add_argument("--wait", action="store_true", help="block, showing progress, until ready or failed")
    unload = sub.add_parser("unload", help="stop a model after its in-flight requests")
    unload.add_argument("model")
    unload.add_argument("--force", action="store_true", help="cut in-flight requests")
    pull = sub.add_parser("pull", help="download org/repo[:QUANT] from Hugging Face into the cache routerd serves")
    pull.add_argument("model", metavar="org/repo[:QUANT]")
    pull.add_argument("--file", help="a file of the repo instead of a quant tag")
    imp = sub.add_parser("import", help="add the GGUF models under a path to the catalog (kept across restarts)")
    imp.add_argument("path")
    reset = sub.add_parser("reset", help="clear a failed model's crash-loop state so it may start again")
    reset.add_argument("model")
    sub.add_parser("reload", help="re-read the config and apply what changed")
    sub.add_parser("rescan", help="re-discover models")
    logs = sub.add_parser("logs", help="a backend's recent output")
    logs.add_argument("model")
    logs.add_argument("-n", "--lines", type=int, default=100)
    logs.add_argument("-f", "--follow", action="store_true")
    events = sub.add_parser("events", help="follow what routerd does: loads, evictions, failures, reloads")
    events.add_argument("--requests", action="store_true", help="also one line per finished request")
    sub.add_parser("memory", help="memory budget, estimates and measured use")
    sub.add_parser("version", help="daemon version")
    sub.add_parser("ping", help="check the daemon answers")
    keys = sub.add_parser("keys", help="API keys for the HTTP front: add, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = keys_sub.add_parser("add", help="make a key (printed once) and require keys from now on")
    add.add_argument("name")
    add.add_argument("--models", nargs="+", metavar="GLOB", default=["*"],
                     help="models it may use: names, aliases or globs like 'qwen*' (default: all)")
    add.add_argument("--priority-max", choices=["high", "normal", "low"], default="high",
                     help="the best X-Request-Priority its requests get (default: high, no cap)")
    add.add_argument("--rpm", type=_natural, default=0, help="requests per minute (default: no limit)")
    add.add_argument("--concurrent", type=_natural, default=0, help="requests at once (default: no limit)")
    add.add_argument("--expires", default="", metavar="DATE", help="last day it works (2026-12-31) or a time")
    add.add_argument("--admin", action="store_true", help="may also do admin actions over HTTP")
    keys_sub.add_parser("list", help="names, prefixes, scope and last use (never the keys)")
    revoke = keys_sub.add_parser("revoke", help="stop a key working, at once")
    revoke.add_argument("name")
    for command in [*sub.choices.values(), *keys_sub.choices.values()]:  # --json after the command too
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> Any:
    paths = [args.socket] if args.socket else client_socket_candidates()
    long_running = args.command in ("pull", "events") or (
        args.command in ("logs", "load") and (getattr(args, "follow", False) or getattr(args, "wait", False)))
    client = Client(paths, timeout=None if long_running or args.command == "unload" else 30.0)
    try:
        c = args.command
        if c == "status":
            result = client.call("status", {"model": args.model} if args.model else {})
            return result, (lambda r: print_details(r["model"])) if args.model else print_status
        if c == "models":
            return client.call("models"), print_models
        if c == "load":
            def progress(note: dict[str, Any]) -> None:
                if not args.json and note["params"].get("line"):
                    print(f"  {note['params']['line']}", file=sys.stderr)
            result = client.call("load", {"model": args.model, "wait": args.wait}, progress)
            shown = (lambda r: print(f"{r['model']}: ready (pid {r['pid']}, port {r['port']}, "
                                     f"{r['load_seconds']:.2f} s)")) if args.wait else \
                    (lambda r: print(f"{r['model']}: loading (see `routerctl status {r['model']}`)"))
            return result, shown
        if c == "unload":
            result = client.call("unload", {"model": args.model, "force": args.force})
            return result, lambda r: print(
                f"{r['model']}: unloaded" + ("" if r["was_running"] else " (was not running)"))
        if c == "pull":
            bar = ProgressLine(sys.stderr) if not args.json else None
            result = client.call("pull", {"model": args.model, "file": args.file},
                                 (lambda note: bar.show(note["params"])) if bar else None)
            if bar:
                bar.done()
            return result, lambda r: print(f"{r['model']}: pulled {len(r['files'])} file(s) into {r['cache']}; "
                                           f"serve it as {r['model']!r}")
        if c == "import":
            result = client.call("import", {"path": os.path.abspath(args.path)})
            return result, lambda r: print(f"imported from {r['path']}: {', '.join(r['added']) or 'nothing new'}")
        if c == "reset":
            result = client.call("reset", {"model": args.model})
            return result, lambda r: print(f"{r['model']}: " + ("failures cleared" if r["had_failures"]
                                                                 else "had no failures") + f", now {r['state']}")
        if c in ("reload", "rescan"):
            return client.call(c), print_reload
        if c == "logs":
            def line(note: dict[str, Any]) -> None:
                print(note["params"]["line"], flush=True)
            result = client.call("logs", {"model": args.model, "lines": args.lines, "follow": args.follow},
                                 None if args.json else line)
            return result, lambda r: print("\n".join(r["lines"])) if r["lines"] else None
        if c == "events":
            def event(note: dict[str, Any]) -> None:
                shown = note["params"]
                print(json.dumps(shown) if args.json else format_event(shown), flush=True)
            # Each event is printed as it comes; the call ends only if routerd drops a slow reader.
            return client.call("events", {"requests": args.requests}, event), lambda r: None
        if c == "memory":
            return client.call("memory"), print_memory
        if c == "version":
            return client.call("version"), lambda r: print(
                f"routerd {r['version']} (llama-server: {r['llama_server']})")
        if c == "ping":
            return client.call("ping"), print
        if c == "keys":
            if args.keys_command == "add":
                return client.call("keys.add", {
                    "name": args.name, "models": args.models, "priority_max": args.priority_max, "rpm": args.rpm,
                    "concurrent": args.concurrent, "expires": args.expires, "admin": args.admin}), print_new_key
            if args.keys_command == "list":
                return client.call("keys.list"), print_keys
            return client.call("keys.revoke", {"name": args.name}), \
                lambda r: print(f"key {r['name']!r} ({r['prefix']}...) revoked; it no longer works")
        raise AssertionError(c)
    finally:
        client.close()


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; 0 means no limit")
    return value


def _let_ctrl_c_stop_us() -> None:
    """Ctrl-C (SIGINT) ends a command, following ones included, with status 130.

    A shell without job control starts a background command (``routerctl logs -f &`` in a
    script, a CI job run with ``&``) with SIGINT ignored, and Python then leaves it ignored: a
    following ``logs -f`` or ``events`` could never be stopped by it. A handler someone else
    installed (routerctl's main() called inside another program) is left alone."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    _let_ctrl_c_stop_us()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    try:
        result, show = run(args)
    except Unreachable as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except DaemonError as exc:
        if args.json:
            print(json.dumps({"error": exc.error}, indent=2))
        else:
            details = exc.error.get("data", {}) or {}
            print(f"routerctl: {exc.error.get('message')}", file=sys.stderr)
            for error in details.get("errors", []) if isinstance(details, dict) else []:
                if error not in exc.error.get("message", ""):
                    print(f"  {error}", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    elif show is not None:
        show(result)
    return EXIT_OK
