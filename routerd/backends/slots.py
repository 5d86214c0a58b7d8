"""Conversations that survive a swap: llama-server's KV slots, saved before routerd stops a model
on purpose and restored when it starts again.

Prefilling a long conversation again costs seconds on a GPU and minutes on a CPU; writing its KV
cache to disk costs milliseconds. llama-server does both (``--slot-save-path``, ``POST
/slots/{id}?action=save|restore``). Owns:

- ``cache_key`` (pure): what makes a saved cache valid for a process: the model file (path, size,
  modification time), the build, and the arguments that shape the KV cache (context, cache types,
  slots, projector...). Files of another key are never restored: they are removed.
- ``SlotStore``: the directory of saved slots (one folder per model, files named by key and
  slot, an index per key with the sessions that used each slot), its disk budget (least recently
  used files go first: ``over_budget``, pure) and what each model has saved.
- ``SlotKeeper``: one backend's saving (bounded by ``slots.save_timeout``: a model another waits
  for is never held longer) and restoring (before it takes requests), and which slot each
  sticky session's conversation is in.

A failed save or restore never fails a request: it is logged, and the next turn prefills. It must
not decide when a backend stops or starts: the backend calls it when it does.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from routerd import events, llama_args
from routerd.backends.upstream import ConnectionPool, UpstreamError
from routerd.statefile import write_json

log = logging.getLogger("routerd.slots")
#: Why a backend stops, when its slots are worth saving: on purpose, and answering.
SAVE_CAUSES = frozenset({"idle", "memory", "group", "turn", "reload", "operator", "shutdown"})
#: The llama-server flags that shape its KV cache: a saved slot is valid only under the same.
KV_FLAGS = ("--ctx-size", "--parallel", "--cache-type-k", "--cache-type-v", "--swa-full", "--kv-unified",
            "--no-kv-unified", "--flash-attn", "--rope-scaling", "--rope-scale", "--rope-freq-base",
            "--rope-freq-scale", "--yarn-orig-ctx", "--mmproj", "--lora", "--control-vector", "--override-kv")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SLOT_FILE = re.compile(r"^(?P<key>[0-9a-f]{16})-(?P<slot>\d+)\.bin$")


def cache_key(model_path: str, size: int, mtime_ns: int, build_version: str,
              flags: Sequence[llama_args.Flag]) -> str:
    """The key a saved cache is valid under (pure): 16 hex digits."""
    shaping = sorted((flag.name, flag.value or "") for flag in flags if flag.name in KV_FLAGS)
    identity = json.dumps([model_path, size, mtime_ns, build_version, shaping])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def model_folder(model: str) -> str:
    """A model's folder name (pure): its name made safe for a path, and a short hash (names
    like ``org/repo:Q4`` differ in characters a path cannot hold)."""
    return f"{_SAFE.sub('_', model)[:60]}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


@attrs.frozen
class SavedFile:
    path: str
    size: int
    #: When it was last written or restored (the budget removes the oldest first).
    used: float


def over_budget(files: Sequence[SavedFile], budget: int) -> list[str]:
    """The files to remove so that the rest fit in ``budget`` bytes, least recently used first
    (pure)."""
    total = sum(f.size for f in files)
    removed = []
    for saved in sorted(files, key=lambda f: (f.used, f.path)):
        if total <= budget:
            break
        removed.append(saved.path)
        total -= saved.size
    return removed


@attrs.frozen
class Saved:
    """What a model has saved: slots, tokens and bytes, and when."""

    slots: int
    tokens: int
    bytes: int
    saved_at: float


class SlotStore:
    """The saved slots of every model under one directory, within a disk budget."""

    def __init__(self, root: str, budget: int, bus: events.Bus) -> None:
        self.root = root
        self.budget = budget
        self.bus = bus
        #: What each model has saved, from its index (read lazily, kept current by the keepers).
        self._saved: dict[str, Saved | None] = {}

    def folder(self, model: str) -> str:
        """The model's folder (made, private to routerd's user); llama-server saves there."""
        path = os.path.join(self.root, model_folder(model))
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def saved(self, model: str) -> Saved | None:
        """What ``model`` has saved (None: nothing): read from its index the first time asked
        (saved by an earlier run), kept current by its keepers from then on."""
        if model not in self._saved:
            self._saved[model] = _summary(os.path.join(self.root, model_folder(model)))
        return self._saved[model]

    def note(self, model: str, saved: Saved | None) -> None:
        self._saved[model] = saved

    def enforce_budget(self) -> list[str]:
        """Remove the least recently used files beyond the budget (blocking); the paths removed."""
        files = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                if name.endswith(".bin"):
                    path = os.path.join(folder, name)
                    try:
                        info = os.stat(path)
                    except OSError:
                        continue
                    files.append(SavedFile(path, info.st_size, info.st_mtime))
        removed = over_budget(files, self.budget)
        for path in removed:
            _remove(path, "over slots.disk_budget")
        return removed


def holds_prompt(slot: dict[str, Any]) -> bool:
    """Whether a slot of llama-server's ``/slots`` holds a conversation worth saving (pure)."""
    tokens = slot.get("n_prompt_tokens")
    task = slot.get("id_task")
    return (isinstance(tokens, int) and tokens > 0) or (isinstance(task, int) and task >= 0 and tokens is None)


def keeper_for(store: SlotStore, spec_name: str, model_path: str, flags: Sequence[llama_args.Flag], slots: int,
               build_version: str | None, timeout: float) -> SlotKeeper | None:
    """A backend's keeper when it saves its slots (its flags name the model's folder as
    ``--slot-save-path`` and its build knows the flag: ``build_version`` not None), else None."""
    if build_version is None or llama_args.flag_value(flags, "--slot-save-path") is None:
        return None
    try:
        info = os.stat(model_path)
    except OSError:
        return None  # it will not start anyway
    key = cache_key(model_path, info.st_size, info.st_mtime_ns, build_version, flags)
    return SlotKeeper(store, spec_name, key, slots, timeout)


class SlotKeeper:
    """One backend's saved slots: saved when it stops on purpose, restored when it starts, and
    the slot each sticky session's conversation is in."""

    def __init__(self, store: SlotStore, model: str, key: str, slots: int, timeout: float) -> None:
        self.store = store
        self.model = model
        self.key = key
        self.slots = slots
        self.timeout = timeout
        self.folder = store.folder(model)
        #: Sessions by the slot they used last, least recently used first.
        self._sessions: collections.OrderedDict[str, int] = collections.OrderedDict()

    # -- sessions -----------------------------------------------------------------------------
    def slot_for(self, session: str) -> int:
        """The slot ``session``'s conversation is in, or the one used least recently (then it is
        this session's from now on)."""
        slot = self._sessions.get(session)
        if slot is None:
            taken = list(self._sessions.values())
            free = [s for s in range(self.slots) if s not in taken]
            slot = free[0] if free else taken[0]
            for other in [name for name, s in self._sessions.items() if s == slot]:
                del self._sessions[other]
            if len(self._sessions) >= 4 * self.slots + 64:  # forget the oldest; never grows unbounded
                self._sessions.popitem(last=False)
        self._sessions[session] = slot
        self._sessions.move_to_end(session)
        return slot

    # -- saving and restoring -------------------------------------------------------------------
    def _file(self, slot: int) -> str:
        return f"{self.key}-{slot}.bin"

    def _index(self) -> str:
        return os.path.join(self.folder, f"{self.key}.json")

    async def save(self, pool: ConnectionPool) -> None:
        """Save every slot that holds a prompt, within ``timeout``; a failure (llama-server's, the
        disk's) is logged and never stops the stop."""
        try:
            await self._save(pool)
        except Exception as exc:  # noqa: BLE001 - saving is a bonus: nothing may fail because of it
            log.warning("%s: saving its slots failed (%s: %s); the next turn prefills", self.model,
                        type(exc).__name__, exc)

    async def _save(self, pool: ConnectionPool) -> None:
        began = trio.current_time()
        saved: dict[str, dict[str, float]] = {}
        with trio.move_on_after(self.timeout) as scope:
            try:
                status, body = await pool.get("/slots")
                held = [s for s in json.loads(body) if holds_prompt(s)] if status == 200 else []
                for slot in held:
                    number = int(slot["id"])
                    answer = await pool.request("POST", f"/slots/{number}?action=save",
                                                headers=[(b"content-type", b"application/json")],
                                                body=json.dumps({"filename": self._file(number)}).encode(),
                                                limited=False)
                    result = json.loads(await answer.read() or b"{}")
                    if answer.status != 200 or not result.get("n_saved"):
                        log.info("%s: slot %d was not saved: %s", self.model, number, result.get("error", result))
                        continue
                    path = os.path.join(self.folder, self._file(number))
                    _private(path)
                    saved[str(number)] = {"tokens": result["n_saved"], "bytes": result.get("n_written", 0)}
            except (UpstreamError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s: saving its slots failed (the next turn prefills): %s", self.model, exc)
        if scope.cancelled_caught:
            log.warning("%s: saving its slots took over slots.save_timeout (%g s); kept what was saved",
                        self.model, self.timeout)
        if not saved:
            return
        seconds = trio.current_time() - began
        sessions = {name: slot for name, slot in self._sessions.items() if str(slot) in saved}
        saved_at = time.time()
        record = {"key": self.key, "model": self.model, "saved_at": saved_at, "slots": saved, "sessions": sessions}
        await trio.to_thread.run_sync(write_json, self._index(), record)
        summary = Saved(len(saved), int(sum(s["tokens"] for s in saved.values())),
                        int(sum(s["bytes"] for s in saved.values())), saved_at)
        self.store.note(self.model, summary)
        log.info("%s: saved %d conversation(s), %d tokens, %d bytes in %.2f s", self.model, summary.slots,
                 summary.tokens, summary.bytes, seconds)
        self.store.bus.publish(events.EventType.SLOTS_SAVED, self.model, slots=summary.slots, tokens=summary.tokens,
                               bytes=summary.bytes, seconds=seconds)
        removed = await trio.to_thread.run_sync(self.store.enforce_budget)
        if removed:
            self.store.bus.publish(events.EventType.SLOTS_REMOVED, self.model, files=removed, reason="disk_budget")

    async def restore(self, pool: ConnectionPool) -> None:
        """Put back what was saved under this key, within ``timeout``, before requests come; a
        file that does not match or does not load is removed (the next turn prefills), and no
        failure here keeps the model from starting."""
        try:
            await self._restore(pool)
        except Exception as exc:  # noqa: BLE001 - a restore is a bonus: the model starts regardless
            log.warning("%s: restoring its slots failed (%s: %s); conversations prefill", self.model,
                        type(exc).__name__, exc)

    async def _restore(self, pool: ConnectionPool) -> None:
        record = await trio.to_thread.run_sync(self._read_index)
        if not record:
            self.store.note(self.model, None)
            return
        restorable = await trio.to_thread.run_sync(self._restorable, record)
        began = trio.current_time()
        restored = tokens = size = 0
        with trio.move_on_after(self.timeout) as scope:
            for number, facts in restorable:
                path = os.path.join(self.folder, self._file(number))
                try:
                    answer = await pool.request("POST", f"/slots/{number}?action=restore",
                                                headers=[(b"content-type", b"application/json")],
                                                body=json.dumps({"filename": self._file(number)}).encode(),
                                                limited=False)
                    result = json.loads(await answer.read() or b"{}")
                except (UpstreamError, ValueError) as exc:
                    log.warning("%s: restoring slot %d failed (the next turn prefills): %s", self.model, number, exc)
                    continue
                if answer.status != 200 or not result.get("n_restored"):
                    error = result.get("error")
                    message = error.get("message", answer.status) if isinstance(error, dict) else error or answer.status
                    _remove(path, f"llama-server could not restore it ({message})")
                    self.store.bus.publish(events.EventType.SLOTS_REMOVED, self.model, files=[path],
                                           reason="unreadable")
                    continue
                os.utime(path)  # recently used: the budget keeps it longest
                restored += 1
                tokens += int(result["n_restored"])
                size += int(facts.get("bytes", 0))
        if scope.cancelled_caught:
            log.warning("%s: restoring its slots took over slots.save_timeout (%g s)", self.model, self.timeout)
        for name, slot in record.get("sessions", {}).items():
            self._sessions[name] = int(slot)
        if restored:
            log.info("%s: restored %d conversation(s), %d tokens", self.model, restored, tokens)
            self.store.bus.publish(events.EventType.SLOTS_RESTORED, self.model, slots=restored, tokens=tokens,
                                   bytes=size, seconds=trio.current_time() - began)

    def _restorable(self, record: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """The saved slots of ``record`` whose files are there, for a process with as many slots
        (blocking)."""
        found = []
        for slot_text, facts in record.get("slots", {}).items():
            number = int(slot_text)
            if number < self.slots and os.path.exists(os.path.join(self.folder, self._file(number))):
                found.append((number, facts))
        return found

    def _read_index(self) -> dict[str, Any] | None:
        """This key's index, once files of other keys (another model file, build or KV
        arguments) are removed; None when there is nothing to restore (blocking)."""
        for name in os.listdir(self.folder):
            match = _SLOT_FILE.match(name)
            stale = (match is not None and match["key"] != self.key) or \
                (name.endswith(".json") and name != f"{self.key}.json")
            if stale:
                _remove(os.path.join(self.folder, name), "saved under another model file, build or KV arguments")
        try:
            with open(self._index(), encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _remove(self._index(), f"unreadable index ({exc})")
            return None
        return record if isinstance(record, dict) and record.get("key") == self.key else None


def _summary(folder: str) -> Saved | None:
    """What the newest index in ``folder`` says was saved (blocking, small)."""
    try:
        indexes = sorted((entry for entry in os.scandir(folder) if entry.name.endswith(".json")),
                         key=lambda entry: entry.stat().st_mtime)
    except OSError:
        return None
    for entry in reversed(indexes):
        try:
            with open(entry.path, encoding="utf-8") as f:
                record = json.load(f)
            saved = record["slots"]
            return Saved(len(saved), sum(int(s["tokens"]) for s in saved.values()),
                         sum(int(s["bytes"]) for s in saved.values()), float(record["saved_at"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def _private(path: str) -> None:
    try:
        os.chmod(path, 0o600)  # conversations: routerd's user's only, as its other state
    except OSError:
        pass


def _remove(path: str, why: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove saved slot %s (%s): %s", path, why, exc)
        return
    log.info("removed saved slot %s: %s", path, why)
