"""Cheap load generators and page-cache tools for `make bench`.

The figures here are routerd's own cost, so the load must cost less than what it measures:
short requests come from Debian's ``wrk`` (C, one thread, a Lua script for POST bodies) and
paced streams from one epoll loop over raw sockets in a thread. Each reports its own CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import selectors
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import httpx
import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(url: str, path: str = "/health", timeout: float = 60) -> None:
    """Until ``url + path`` answers 200 (RuntimeError after ``timeout`` s)."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        deadline = trio.current_time() + timeout
        while trio.current_time() < deadline:
            try:
                if (await client.get(url + path)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.02)
    raise RuntimeError(f"{url}{path} never answered")


def router_mode(binary: str, work: Path, files: Mapping[str, Path], port: int,
                args: Sequence[str]) -> subprocess.Popen[bytes]:
    """llama.cpp's router mode over ``files`` (model name -> GGUF, symlinked into a folder under
    ``work``), one model at a time, on ``port``: the peer the benches compare with."""
    models_dir = work / "models"
    models_dir.mkdir()
    for name, path in files.items():
        (models_dir / f"{name}.gguf").symlink_to(path)
    return subprocess.Popen([binary, "--models-dir", str(models_dir), "--models-max", "1", "--port", str(port),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write_tiny_ggufs(folder: Path, stems: Sequence[str]) -> list[Path]:
    """Minimal GGUF files (a header and one 4x4 tensor): enough for routerd's catalog and
    estimates, for a stand-in backend or a discovery benchmark."""
    import gguf
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem in stems:
        path = folder / f"{stem}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(1)
        writer.add_context_length(2048)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(path)
    return paths


@attrs.frozen
class WrkRun:
    requests: int
    seconds: float
    errors: int  # non-2xx answers and socket errors
    cpu: float  # the generator's own CPU seconds
    timeouts: int = 0  # answers wrk gave up waiting for (also counted in errors)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_LUA = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%s
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "%s", nil, bodies[i])
end
"""


def wrk(url: str, path: str, bodies: Sequence[bytes], *, connections: int, seconds: float,
        headers: dict[str, str] | None = None, timeout: float = 30.0) -> WrkRun:
    """POST ``bodies`` (in turn) to ``url + path`` from ``connections`` keep-alive connections.

    ``timeout``: seconds wrk waits for one answer before it counts it as a timeout (it keeps the
    connection and the request; its own default is 2 s, which counts slow answers as errors)."""
    quoted = ", ".join("[==[" + body.decode() + "]==]" for body in bodies)
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % (quoted, extra, path))
    try:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", f"{timeout:g}s",
                "-s", script.name, url]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.stdout.read().decode() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.unlink(script.name)
    found = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    requests, elapsed = int(found[1]), float(found[2]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[found[3]]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx[1]) if non_2xx else 0
    timeouts = re.search(r"timeout (\d+)", out)
    return WrkRun(requests, elapsed, errors, usage.ru_utime + usage.ru_stime, int(timeouts[1]) if timeouts else 0)


@attrs.frozen
class StreamRun:
    streams: int
    events: int  # SSE "data:" events received, [DONE] excluded
    seconds: float  # from the first request sent to the last stream's end
    cpu: float  # the generator's own CPU seconds
    failed: int  # streams that ended without [DONE]


def paced_streams(host: str, port: int, bodies: Sequence[bytes], *, path: str = "/v1/chat/completions",
                  timeout: float = 120.0, headers: dict[str, str] | None = None) -> StreamRun:
    """Open one streaming POST per body at once and read them all to ``[DONE]`` (blocking: run
    it in a thread). Events are counted by their ``data:`` prefix, however they are framed."""
    cpu0, start = time.thread_time(), time.perf_counter()
    selector = selectors.DefaultSelector()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    counts: dict[socket.socket, list] = {}
    for body in bodies:
        sock = socket.create_connection((host, port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        counts[sock] = [0, b""]  # events, the last bytes (a marker may straddle two reads)
    events, failed, deadline = 0, 0, start + timeout
    while counts and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1.0):
            sock = key.fileobj
            state = counts[sock]  # type: ignore[index]
            data = sock.recv(262144)  # type: ignore[union-attr]
            joined = state[1] + data
            state[0] += joined.count(b"data: ") - state[1].count(b"data: ")
            state[1] = joined[-16:]
            if b"data: [DONE]" in joined or not data:
                finished = b"data: [DONE]" in joined
                events += state[0] - (1 if finished else 0)
                failed += 0 if finished else 1
                selector.unregister(sock)
                sock.close()  # type: ignore[union-attr]
                del counts[sock]  # type: ignore[arg-type]
    for sock in counts:
        failed += 1
        sock.close()
    selector.close()
    return StreamRun(len(bodies), events, time.perf_counter() - start, time.thread_time() - cpu0, failed)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` alone, not its children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evict_from_page_cache(path: str | Path) -> None:
    """Drop a file's clean pages from the page cache (no root needed; pages some process has
    mapped stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: str | Path) -> float:
    """Which share of a file's pages are in the page cache now (mincore)."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(byte & 1 for byte in vector) / pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
