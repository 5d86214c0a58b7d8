"""The memory budget: devices, footprint estimates, measured use.

Owns the device list (host RAM always; NVIDIA GPUs through NVML when a driver is there), each
device's budget (total minus reserve), the estimate of a model's footprint from its GGUF header
and args (pure: ``estimate``), the measured use of running backends (RSS, NVML per process, the
buffer sizes llama-server logs), and the memory of past measurements for the next load. The
admission *decision* is ``admission.plan_admission``; this module must not spawn or stop anything.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from routerd import llama_args
from routerd.config import MemoryConfig, parse_size
from routerd.models.gguf_meta import GGUFError, GGUFMeta, read_meta

if TYPE_CHECKING:
    from routerd.backends.admission import Newcomer, Resident
    from routerd.backends.backend import Backend, BackendSpec
    from routerd.models.catalog import ModelEntry

log = logging.getLogger("routerd.memory")
MiB = 1024 * 1024
RAM = "ram"
#: Process, runtime and thread stacks of an idle llama-server (measured: ~17 MiB on CPU).
PROCESS_OVERHEAD = 20 * MiB
#: Model args that choose devices themselves: routerd then leaves placement to llama-server.
PINNING_FLAGS = ("--main-gpu", "--tensor-split", "--device", "--split-mode")

#: CUDA context and cuBLAS workspace per GPU a backend touches.
GPU_CONTEXT_OVERHEAD = 300 * MiB
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
#: Architectures whose sliding-window layers follow a fixed pattern (every Nth layer is global).
SWA_PATTERN = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}
_BUFFER_LINE = re.compile(r"\b([A-Za-z]+\d*)(?:_\w+)?\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")
#: Seconds a start waits, after evictions, for NVML to show the memory they freed.
RELEASE_WAIT = 10.0


# -- devices -------------------------------------------------------------------------------
@attrs.frozen
class Device:
    name: str  # "ram", "gpu0", ...
    total: int
    budget: int
    #: Free right now as the system sees it (MemAvailable, NVML free).
    free_now: int
    description: str = ""


class GpuProvider(Protocol):
    """Where GPU facts come from: NVML for real, a fake in tests."""

    def devices(self) -> list[tuple[int, str, int, int]]:
        """(index, name, total bytes, free bytes) per GPU."""

    def process_usage(self, pid: int) -> dict[int, int]:
        """GPU index -> bytes used by ``pid``."""


class NvmlProvider:
    """NVIDIA GPUs through nvidia-ml-py. ``open()`` returns None when there is no driver."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    @classmethod
    def open(cls) -> NvmlProvider | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no device: RAM only
            log.info("no NVIDIA GPU in use (%s); planning with host RAM only", type(exc).__name__)
            return None
        return cls(pynvml)

    def devices(self) -> list[tuple[int, str, int, int]]:
        found = []
        for index in range(self._nvml.nvmlDeviceGetCount()):
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            name = self._nvml.nvmlDeviceGetName(handle)
            label = name.decode() if isinstance(name, bytes) else str(name)
            found.append((index, label, int(info.total), int(info.free)))
        return found

    def process_usage(self, pid: int) -> dict[int, int]:
        usage: dict[int, int] = {}
        for index in range(self._nvml.nvmlDeviceGetCount()):
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    usage[index] = usage.get(index, 0) + int(proc.usedGpuMemory)
        return usage


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    values = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values


def process_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- estimates (pure) -----------------------------------------------------------------------
@attrs.frozen
class Footprint:
    """Bytes per device, with the parts that make them up (for humans)."""

    per_device: Mapping[str, int]
    parts: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_device.values())


def _int_flag(flags: Sequence[llama_args.Flag], name: str, default: int) -> int:
    value = llama_args.flag_value(flags, name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def offloaded_layers(flags: Sequence[llama_args.Flag], block_count: int, gpus: int) -> int:
    """Layers llama-server will put on GPUs: ``-ngl`` (auto/all = every layer), none without a GPU."""
    if gpus == 0:
        return 0
    value = llama_args.flag_value(flags, "--n-gpu-layers")
    if value is None or value in ("auto", "all"):
        return block_count + 1
    try:
        return max(0, min(int(value), block_count + 1))
    except ValueError:
        return block_count + 1


def kv_cache_bytes(meta: GGUFMeta, flags: Sequence[llama_args.Flag], layers: Sequence[int]) -> int:
    """KV cache of ``layers``: cells x KV heads x (key + value dims) x cache-type bytes.

    Sliding-window layers hold ``window x slots + ubatch`` cells at most (llama.cpp's iSWA cache).
    """
    ctx = _int_flag(flags, "--ctx-size", 0) or meta.context_length
    slots = _int_flag(flags, "--parallel", 4)
    if slots <= 0:
        slots = 4
    ubatch = _int_flag(flags, "--ubatch-size", 512)
    k_bytes = CACHE_TYPE_BYTES.get(llama_args.flag_value(flags, "--cache-type-k") or "f16", 2.0)
    v_bytes = CACHE_TYPE_BYTES.get(llama_args.flag_value(flags, "--cache-type-v") or "f16", 2.0)
    pattern = SWA_PATTERN.get(meta.architecture, 0)
    swa_cells = min(ctx, -(-(meta.sliding_window * slots + ubatch) // 256) * 256) if meta.sliding_window else ctx
    total = 0.0
    for layer in layers:
        heads = meta.head_count_kv[layer] if layer < len(meta.head_count_kv) else 0
        sliding = bool(meta.sliding_window and pattern and (layer + 1) % pattern != 0)
        cells = swa_cells if sliding else ctx
        total += cells * heads * (meta.key_length * k_bytes + meta.value_length * v_bytes)
    return int(total)


def compute_bytes(meta: GGUFMeta, flags: Sequence[llama_args.Flag]) -> int:
    """Compute and output buffers. Fitted to llama-server's logged sizes for the demo models:
    8 MiB + ubatch x embd x 16 + vocab x 128, plus logits of vocab x 4 x slots."""
    ubatch = _int_flag(flags, "--ubatch-size", 512)
    slots = max(1, _int_flag(flags, "--parallel", 4))
    return 8 * MiB + ubatch * meta.embedding_length * 16 + meta.vocab_size * 128 + meta.vocab_size * 4 * slots


def estimate(meta: GGUFMeta, flags: Sequence[llama_args.Flag], gpus: Sequence[str] = (),
             projector_bytes: int = 0) -> Footprint:
    """A model's footprint per device before it loads (pure).

    With GPUs, offloaded layers (the last ``-ngl`` ones, plus the output layer when all are
    offloaded) put their weights and KV cache on the first GPU named; the rest stays in RAM.
    """
    blocks = meta.block_count or len(meta.layer_bytes)
    on_gpu = offloaded_layers(flags, blocks, len(gpus))
    gpu_layers = list(range(max(0, blocks - on_gpu), blocks)) if on_gpu else []
    cpu_layers = [layer for layer in range(blocks) if layer not in set(gpu_layers)]
    layer_weights = {i: meta.layer_bytes[i] if i < len(meta.layer_bytes) else 0 for i in range(blocks)}
    kv_gpu = kv_cache_bytes(meta, flags, gpu_layers)
    kv_cpu = kv_cache_bytes(meta, flags, cpu_layers)
    compute = compute_bytes(meta, flags)
    parts = {"weights": meta.weights_bytes, "kv_cache": kv_gpu + kv_cpu, "compute": compute,
             "overhead": PROCESS_OVERHEAD, "projector": projector_bytes}
    if not gpu_layers:
        ram = meta.weights_bytes + kv_cpu + compute + PROCESS_OVERHEAD + projector_bytes
        return Footprint({RAM: ram}, parts)
    output_on_gpu = on_gpu > blocks
    gpu_weights = sum(layer_weights[i] for i in gpu_layers) + (meta.other_bytes if output_on_gpu else 0)
    gpu = gpu_weights + kv_gpu + compute + projector_bytes + GPU_CONTEXT_OVERHEAD
    ram = (meta.weights_bytes - gpu_weights) + kv_cpu + PROCESS_OVERHEAD + (0 if output_on_gpu else compute)
    return Footprint({gpus[0]: gpu, RAM: ram}, parts)


def parse_logged_buffers(lines: Sequence[str]) -> dict[str, int]:
    """Sum the buffer sizes llama-server logs at load (``-lv 4``), per device (ram, gpu0, ...)."""
    per_device: dict[str, int] = {}
    for line in lines:
        match = _BUFFER_LINE.search(line)
        if not match:
            continue
        backend = match.group(1)
        cuda = re.match(r"CUDA(\d+)", backend)
        device = f"gpu{cuda.group(1)}" if cuda else RAM
        per_device[device] = per_device.get(device, 0) + int(float(match.group(3)) * MiB)
    return per_device


# -- the manager ----------------------------------------------------------------------------
@attrs.define
class Measured:
    #: The peak per device, over every run of the same spec.
    per_device: dict[str, int]
    logged: dict[str, int]
    #: What the running process uses now (the last measurement).
    current: dict[str, int] = attrs.field(factory=dict)


class MemoryManager:
    """Budgets, estimates and measurements for the supervisor's admission decisions."""

    def __init__(self, config: MemoryConfig, gpus: GpuProvider | None,
                 meminfo: Mapping[str, int] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.gpus = gpus
        self._meminfo = meminfo
        self._env = dict(os.environ if env is None else env)
        #: Measured footprint by (model, spec): used for the next load of the same thing.
        self._measured: dict[tuple[str, Any], Measured] = {}
        #: What each running model was admitted with: its floor until measured higher.
        self._reserved: dict[str, dict[str, int]] = {}
        self._estimates: dict[tuple[BackendSpec, str | None], Footprint | None] = {}
        self._unreadable: set[str] = set()

    # devices and budgets
    def devices(self) -> list[Device]:
        info = dict(self._meminfo) if self._meminfo is not None else read_meminfo()
        detected = info.get("MemTotal", 0)
        total = parse_size(self.config.ram_total) if self.config.ram_total else detected
        found = [Device(RAM, total, max(0, total - parse_size(self.config.ram_reserve, total=total)),
                        info.get("MemAvailable", 0), "host RAM")]
        for index, name, gpu_total, gpu_free in (self.gpus.devices() if self.gpus else []):
            reserve = parse_size(self.config.gpu_reserve, total=gpu_total)
            found.append(Device(f"gpu{index}", gpu_total, max(0, gpu_total - reserve), gpu_free, name))
        return found

    def budgets(self) -> dict[str, int]:
        return {device.name: device.budget for device in self.devices()}

    def gpu_names(self) -> list[str]:
        return [f"gpu{index}" for index, *_ in (self.gpus.devices() if self.gpus else [])]

    # placement, estimates and measurements
    def placements(self, spec: BackendSpec) -> list[str | None]:
        """The GPUs routerd may place ``spec`` on, roomiest budget first.

        ``[None]`` means routerd does not choose: no GPU, no layers offloaded, or the model's
        args or environment already pin its devices (then its first GPU is assumed for estimates).
        """
        gpus = self.gpu_names()
        flags = list(spec.flags)
        if not gpus or offloaded_layers(flags, 1, len(gpus)) == 0 or "CUDA_VISIBLE_DEVICES" in self._env:
            return [None]
        if any(llama_args.has_flag(flags, name) for name in PINNING_FLAGS):
            return [None]
        budgets = self.budgets()
        return sorted(gpus, key=lambda gpu: -budgets.get(gpu or "", 0))

    def _gpus_for(self, spec: BackendSpec, gpu: str | None) -> list[str]:
        if gpu is not None:
            return [gpu]
        gpus = self.gpu_names()
        main = llama_args.flag_value(spec.flags, "--main-gpu")
        if main is not None and f"gpu{main}" in gpus:
            return [f"gpu{main}"]
        return gpus

    def estimate(self, spec: BackendSpec, gpu: str | None = None) -> Footprint | None:
        """The footprint of ``spec`` (on ``gpu``), computed once per spec; ``forget_estimates()``
        after a rescan, when files may have changed."""
        key = (spec, gpu)
        if key not in self._estimates:
            self._estimates[key] = self._estimate(spec, gpu)
        return self._estimates[key]

    def forget_estimates(self) -> None:
        self._estimates.clear()

    def _estimate(self, spec: BackendSpec, gpu: str | None) -> Footprint | None:
        try:
            meta = read_meta(spec.model_path)
        except (OSError, GGUFError) as exc:
            if spec.model_path not in self._unreadable:
                self._unreadable.add(spec.model_path)
                log.warning("cannot read %s for a memory estimate: %s", spec.model_path, exc)
            return None
        projector = sum(_file_size(flag.value) for flag in spec.extra if flag.name == "--mmproj")
        flags = list(spec.flags) + [f for f in spec.extra if not llama_args.has_flag(spec.flags, f.name)]
        return estimate(meta, flags, self._gpus_for(spec, gpu), projector)

    def need(self, spec: BackendSpec, gpu: str | None = None) -> dict[str, int]:
        """Bytes per device to start ``spec`` (on ``gpu``): the last measured peak, else the estimate."""
        measured = self._measured.get((spec.name, spec))
        if measured is not None:
            if gpu is None:
                return dict(measured.per_device)
            # the same footprint, moved to the GPU it would run on this time
            on_gpu = sum(b for d, b in measured.per_device.items() if d != RAM)
            return {RAM: measured.per_device.get(RAM, 0), **({gpu: on_gpu} if on_gpu else {})}
        footprint = self.estimate(spec, gpu)
        return dict(footprint.per_device) if footprint else {}

    def reserve(self, backend: Backend, need: Mapping[str, int]) -> None:
        """Record what ``backend`` was admitted with (its estimate or last measured peak)."""
        self._reserved[backend.key] = dict(need)

    def usage(self, backend: Backend) -> dict[str, int]:
        """What a resident backend holds or may soon hold, per device.

        Resident memory right after load is an undercount (weights are mapped lazily, the KV
        cache is touched as it fills), so a backend counts as the larger of what it was
        admitted with and the peak measured so far.
        """
        reserved = self._reserved.get(backend.key) or self.need(backend.spec)
        measured = self.measure(backend)
        peak = measured.per_device if measured else {}
        return {d: max(reserved.get(d, 0), peak.get(d, 0)) for d in reserved.keys() | peak.keys()}

    def measure(self, backend: Backend) -> Measured | None:
        if backend.pid is None or backend.ready_at is None:
            return None
        per_device: dict[str, int] = {}
        rss = process_rss(backend.pid)
        if rss is not None:
            per_device[RAM] = rss
        if self.gpus is not None:
            for index, used in self.gpus.process_usage(backend.pid).items():
                per_device[f"gpu{index}"] = used
        current = dict(per_device)
        key = (backend.name, backend.spec)
        previous = self._measured.get(key)
        if previous is not None:  # keep the peak: the next load of this spec needs that much
            for device, nbytes in previous.per_device.items():
                per_device[device] = max(per_device.get(device, 0), nbytes)
            logged = previous.logged  # printed once at load, the same for the same spec
        else:  # parsed once: this runs on every admission plan, and the load lines scroll away
            logged = parse_logged_buffers([line.text for line in backend.log.tail(400)])
        measured = Measured(per_device, logged, current)
        if per_device:
            self._measured[key] = measured
        return measured

    def measured(self, spec: BackendSpec) -> Measured | None:
        """The last measurement of ``spec``'s runs (its peak survives the process)."""
        return self._measured.get((spec.name, spec))

    async def wait_released(self, need: Mapping[str, int]) -> None:
        """After evictions, wait until GPUs really show the room (NVML frees lazily).

        Host RAM is back once the process is reaped, which the supervisor has awaited. NVML has
        no change notification, so this polls, for at most ``RELEASE_WAIT`` s: then the start
        goes ahead (the estimate may be pessimistic; the driver has the last word).
        """
        if self.gpus is None:
            return
        need = {d: b for d, b in need.items() if d != RAM}
        with trio.move_on_after(RELEASE_WAIT):
            while True:
                free = {d.name: d.free_now for d in self.devices()}
                if all(free.get(d, 0) >= b for d, b in need.items()):
                    return
                await trio.sleep(0.1)

    # reports
    def explain(self, newcomer: Newcomer, residents: Sequence[Resident]) -> dict[str, object]:
        budgets = self.budgets()
        used = {d: sum(r.usage.get(d, 0) for r in residents) for d in budgets}
        return {"needed": dict(newcomer.need), "budget": budgets,
                "free": {d: budgets[d] - used[d] for d in budgets},
                "busy": [r.name for r in residents if r.busy]}

    def model_report(self, entry: ModelEntry, spec: BackendSpec, backend: Backend | None) -> dict[str, object]:
        footprint = self.estimate(spec)
        measured = self.measure(backend) if backend is not None else self._measured.get((spec.name, spec))
        return {
            "estimate": dict(footprint.per_device) if footprint else None,
            "estimate_parts": dict(footprint.parts) if footprint else None,
            "measured": dict(measured.per_device) if measured else None,
            "logged_buffers": dict(measured.logged) if measured and measured.logged else None,
        }

    def report(self, residents: Sequence[Resident]) -> list[dict[str, object]]:
        used: dict[str, int] = {}
        for resident in residents:
            for device, nbytes in resident.usage.items():
                used[device] = used.get(device, 0) + nbytes
        return [{"device": d.name, "description": d.description, "total": d.total, "budget": d.budget,
                 "used": used.get(d.name, 0), "free": d.budget - used.get(d.name, 0),
                 "free_now": d.free_now} for d in self.devices()]


def _file_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0
