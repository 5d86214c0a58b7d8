"""routerctl: manage a running routerd over its control socket.

Owns argument parsing, the JSON-RPC client (blocking, one connection per command), and human
output (tables, details) or ``--json``. Exit codes: 0 ok, 1 the daemon reported an error, 2 usage
error, 3 the daemon is not reachable. It imports nothing from the daemon but the socket default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from routerd.events import EventType
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


# -- output -------------------------------------------------------------------------------
def _ago(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _memory_cell(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "-"
    measured = memory.get("measured") or {}
    estimate = memory.get("estimate") or {}
    if measured:
        return "+".join(_size(v) for v in measured.values())
    return "~" + "+".join(_size(v) for v in estimate.values()) if estimate else "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def print_status(result: dict[str, Any]) -> None:
    print(f"routerd {result['version']}  pid {result['pid']}  up {result['uptime']:.0f}s  "
          f"listening {', '.join(result['listen'])}")
    print(f"config {result['config'] or '(defaults)'}  socket {result['socket']}  {result['summary']}\n")
    rows = []
    for m in result["models"]:
        ttl = m.get("idle_ttl_left")
        rows.append([m["name"], m["state"] + ("" if m["available"] else " (missing)"), str(m["pid"] or "-"),
                     str(m["port"] or "-"), m["group"] or "-", str(m["in_flight"]),
                     f"{m['queued']} ({m['oldest_wait']:.0f}s)" if m.get("queued") else "0",
                     _ago(m["last_used"]), f"{ttl:.0f}s" if ttl is not None else "-", _memory_cell(m.get("memory")),
                     (m.get("last_error") or "")[:60]])
    print(table(rows, ["MODEL", "STATE", "PID", "PORT", "GROUP", "INFLIGHT", "QUEUED", "LAST USED", "TTL LEFT",
                       "MEMORY", "LAST ERROR"]))
    pools = [(m["name"], m["endpoints"]) for m in result["models"]
             if len(m.get("endpoints") or []) > 1 or any(e["kind"] == "remote" for e in m.get("endpoints") or [])]
    if pools:
        rows = [[name, e["endpoint"], e["state"], f"{e['in_flight']}/{e['slots']}",
                 str(e.get("port") or e.get("url") or "-"),
                 str(e["queued_there"]) if e["kind"] == "remote" else "-", (e.get("error") or "")[:50]]
                for name, endpoints in pools for e in endpoints]
        print("\n" + table(rows, ["POOL", "ENDPOINT", "STATE", "LOAD", "PORT/URL", "QUEUED THERE", "ERROR"]))
    if result.get("remotes"):
        rows = [[r["name"], r["url"], r["state"], f"{r['in_flight']}/{r['max_concurrent']}",
                 ", ".join(r["models"]) or "-", (r.get("error") or "")[:50]] for r in result["remotes"]]
        print("\n" + table(rows, ["REMOTE", "URL", "STATE", "LOAD", "MODELS", "ERROR"]))
    if result.get("selectors"):
        rows = [[s["name"], s["strategy"] + (f" ({s['per_target']} each)" if s["strategy"] == "spillover" else ""),
                 ", ".join(f"{t['model']} ({t['state']})" for t in s["targets"])] for s in result["selectors"]]
        print("\n" + table(rows, ["SELECTOR", "STRATEGY", "TARGETS"]))


def print_details(model: dict[str, Any]) -> None:
    for key, value in model.items():
        if key == "last_used":
            value = _ago(value)
        elif key in ("idle_ttl", "idle_ttl_left") and isinstance(value, float):
            value = f"{value:.0f}s"
        elif key == "aliases":
            value = ", ".join(value)
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, subvalue in value.items():
                shown = {k: _size(v) for k, v in subvalue.items()} if isinstance(subvalue, dict) else subvalue
                print(f"  {sub}: {shown}")
        else:
            print(f"{key}: {value if value not in (None, '', []) else '-'}")


def print_models(result: dict[str, Any]) -> None:
    rows = []
    for m in result["models"]:
        meta = m.get("metadata") or {}
        rows.append([m["name"], ", ".join(m["aliases"]) or "-", f"{m['source']} ({m['catalog']})",
                     m["state"] + ("" if m["available"] else " (missing)"),
                     meta.get("architecture", "-"), meta.get("size_label") or "-", meta.get("quantization") or "-",
                     str(meta.get("context_length") or "-"), _size(meta.get("file_size"))])
    print(table(rows, ["MODEL", "ALIASES", "SOURCE", "STATE", "ARCH", "SIZE", "QUANT", "CONTEXT", "FILE"]))


def print_memory(result: dict[str, Any]) -> None:
    rows = [[d["device"], _size(d["total"]), _size(d["budget"]), _size(d["used"]), _size(d["free"]),
             _size(d["free_now"])] for d in result["devices"]]
    print(table(rows, ["DEVICE", "TOTAL", "BUDGET", "USED", "FREE", "FREE NOW (SYSTEM)"]))
    print()
    rows = []
    for m in result["models"]:
        estimate = m.get("estimate") or {}
        measured = m.get("measured") or {}
        rows.append([m["model"], m["state"], m["device"], "+".join(_size(v) for v in estimate.values()) or "-",
                     "+".join(_size(v) for v in measured.values()) or "-",
                     "yes" if m["fits_now"] else "no", "yes" if m["fits_after_eviction"] else "no"])
    print(table(rows, ["MODEL", "STATE", "DEVICE", "ESTIMATE", "MEASURED", "FITS NOW", "FITS AFTER EVICTION"]))


def print_reload(result: dict[str, Any]) -> None:
    for key in ("added", "removed", "changed", "restarted", "stopped", "kept"):
        if key in result:
            print(f"{key}: {', '.join(result[key]) or '-'}")
    for key, names in (result.get("remotes") or {}).items():
        if names:
            print(f"remotes {key}: {', '.join(names)}")
    for problem in result.get("problems", []):
        print(f"not served (corrupted cache entry): {problem}")


def print_new_key(result: dict[str, Any]) -> None:
    print(f"key {result['name']!r} made; it is shown this once, store it now:")
    print(f"  {result['key']}")
    print("clients send it as 'Authorization: Bearer KEY' (OpenAI SDKs: api_key=KEY) or 'x-api-key: KEY'")


def print_keys(result: dict[str, Any]) -> None:
    rows = []
    for k in result["keys"]:
        limits = [f"{k['rpm']}/min" if k["rpm"] else "", f"{k['concurrent']} at once" if k["concurrent"] else ""]
        rows.append([k["name"], k["prefix"] + "...", ", ".join(k["models"]), k["priority_max"],
                     ", ".join(x for x in limits if x) or "-", "yes" if k["admin"] else "no",
                     k["expires"] or "never", _ago_iso(k["last_used"]), k["source"]])
    print(table(rows, ["NAME", "KEY", "MODELS", "PRIORITY MAX", "LIMITS", "ADMIN", "EXPIRES", "LAST USED", "SOURCE"]))
    print("keys are required on every request" if result["required"]
          else "no key exists: requests need none (add one to require keys)")


def _ago_iso(stamp: str) -> str:
    if not stamp:
        return "never"
    try:
        moment = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    return _ago(moment.timestamp())


class _ProgressLine:
    """Download progress: a redrawn line on a terminal, a line per file otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.current = ""

    def show(self, note: dict[str, Any]) -> None:
        done, total = note.get("bytes", 0), note.get("total")
        if self.tty:
            percent = f"{100 * done / total:5.1f}%" if total else ""
            self.stream.write(f"\r{note['file']}: {_size(done)} of {_size(total)} {percent}\x1b[K")
            self.stream.flush()
        elif note["file"] != self.current:
            print(f"downloading {note['file']} ({_size(total)})", file=self.stream)
        self.current = note["file"]

    def done(self) -> None:
        if self.tty and self.current:
            self.stream.write("\n")


# -- commands -----------------------------------------------------------------------------
def _stop_detail(kind: str, event: dict[str, Any]) -> str:
    detail = f"{kind.split('.')[1]}: {event.get('reason')}"
    if event.get("exit_code") is not None:
        detail += f", exit status {event['exit_code']}"
    return detail


def _loading_detail(kind: str, event: dict[str, Any]) -> str:
    detail = "loading" + (" (restart after a failure)" if event.get("restart") else "")
    if event.get("replica") not in (None, event.get("model")):
        detail += f" replica {event['replica']}"
    return detail


def _request_detail(kind: str, event: dict[str, Any]) -> str:
    tokens = f" tokens {event['prompt_tokens']}/{event['completion_tokens']}" if event.get("prompt_tokens") else ""
    return (f"{event.get('method')} {event.get('route')} {event.get('status')} {event.get('duration', 0):.3f} s"
            f"{tokens}" + (" cancelled" if event.get("cancelled") else ""))


def _catalog_detail(kind: str, event: dict[str, Any]) -> str:
    if not event.get("ok", True):
        return f"{kind} FAILED: {event.get('error')}"
    changes = {k: event[k] for k in ("added", "removed", "changed", "restarted", "stopped") if event.get(k)}
    return f"{kind} ({event.get('trigger', 'reload')}): " + (
        "; ".join(f"{k} {', '.join(v)}" for k, v in changes.items()) or "no change")


def _remote_detail(kind: str, event: dict[str, Any]) -> str:
    return kind.split(".")[1] + (f": {event['error']}" if event.get("error") else "")


#: How ``routerctl events`` words each event type: every type has a line (tests hold this to
#: ``EventType``), so an event added to routerd is never printed as a bare name by accident.
EVENT_DETAILS: dict[EventType, Callable[[str, dict[str, Any]], str]] = {
    EventType.MODEL_LOADING: _loading_detail,
    EventType.MODEL_PROGRESS: lambda kind, event: f"  {event.get('line')}",
    EventType.MODEL_LOG: lambda kind, event: f"  {event.get('line')}",
    EventType.MODEL_READY: lambda kind, event: (
        f"ready in {event['load_seconds']:.2f} s (pid {event.get('pid')}, port {event.get('port')})"),
    EventType.MODEL_STOPPING: _stop_detail,
    EventType.MODEL_STOPPED: _stop_detail,
    EventType.MODEL_FAILED: lambda kind, event: f"FAILED: {event.get('error')}",
    EventType.MODEL_EVICTED: lambda kind, event: (
        f"evicted ({event.get('cause')}) to make room for {event.get('for')}"),
    EventType.MODEL_CRASH_LOOP: lambda kind, event: (
        f"CRASH LOOP: {event.get('failures')} failures within {event.get('window'):g} s; "
        f"`routerctl reset {event.get('model') or ''}` once fixed"),
    EventType.QUEUE_HIGH: lambda kind, event: (
        f"{kind}: {event.get('depth')} waiting (max_queue {event.get('max_queue')})"),
    EventType.QUEUE_NORMAL: lambda kind, event: (
        f"{kind}: {event.get('depth')} waiting (max_queue {event.get('max_queue')})"),
    EventType.REMOTE_REACHABLE: _remote_detail,
    EventType.REMOTE_UNREACHABLE: _remote_detail,
    EventType.CATALOG_RESCAN: _catalog_detail,
    EventType.CONFIG_RELOAD: _catalog_detail,
    EventType.REQUEST: _request_detail,
    EventType.DROPPED: lambda kind, event: f"dropped by routerd: {event.get('reason')}",
}


def format_event(event: dict[str, Any]) -> str:
    """One event as a line for people (pure); a type this routerctl does not know (a newer
    routerd's) prints as its name."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    kind, model = event.get("type", "?"), event.get("model") or ""
    if kind in (EventType.REMOTE_REACHABLE, EventType.REMOTE_UNREACHABLE):
        model = f"remote {event.get('remote')}"
    describe = EVENT_DETAILS.get(kind)  # a StrEnum member hashes and compares as its value
    detail = describe(kind, event) if describe is not None else kind
    return f"{stamp} {model:<20} {detail}" if model else f"{stamp} {'-':<20} {detail}"


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
            bar = _ProgressLine(sys.stderr) if not args.json else None
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
