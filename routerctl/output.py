"""routerctl's output for people: tables, a model's details, progress lines, one line per event.

Owns the words and layout of what routerctl prints (``--json`` prints the daemon's answer as it
is); pure functions of the daemon's answers, except the printers that write them to stdout.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from routerd.event_types import EventType


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
        elif key == "saved_slots" and isinstance(value, dict):
            value = (f"{value['slots']} conversation(s), {value['tokens']} tokens, {_size(value['bytes'])}, "
                     f"saved {_ago(value['saved_at'])}")
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, subvalue in value.items():
                if isinstance(subvalue, dict):
                    shown: Any = {k: _size(v) for k, v in subvalue.items()}
                elif isinstance(subvalue, list):
                    shown = ", ".join(str(item) for item in subvalue) or "-"
                else:
                    shown = subvalue
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


class ProgressLine:
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


# -- events -------------------------------------------------------------------------------
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
    EventType.SLOTS_SAVED: lambda kind, event: (
        f"saved {event.get('slots')} conversation(s): {event.get('tokens')} tokens, "
        f"{event.get('bytes', 0) / 1e6:.1f} MB in {event.get('seconds', 0):.2f} s"),
    EventType.SLOTS_RESTORED: lambda kind, event: (
        f"restored {event.get('slots')} conversation(s): {event.get('tokens')} tokens "
        f"in {event.get('seconds', 0):.2f} s"),
    EventType.SLOTS_REMOVED: lambda kind, event: (
        f"removed {len(event.get('files') or [])} saved slot file(s) ({event.get('reason')})"),
    EventType.MODEL_LOAD_REFUSED: lambda kind, event: f"load refused: {event.get('error')}",
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
    EventType.PULL_PROGRESS: lambda kind, event: (
        f"pulling {event.get('file')}: {event.get('bytes', 0) / 1e6:.1f}"
        + (f" of {event['total'] / 1e6:.1f} MB" if event.get("total") else " MB")),
    EventType.PULL_DONE: lambda kind, event: f"pulled: {', '.join(event.get('files') or [])}",
    EventType.PULL_FAILED: lambda kind, event: f"pull FAILED: {event.get('error')}",
    EventType.MODEL_REMOVED: lambda kind, event: f"removed from the cache: {', '.join(event.get('files') or [])}",
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
