"""Serving requests through routerd with the fake llama-server: spawning, proxying, lifetimes,
faults and the HTTP error shape."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from tests.conftest import DEMO_MODELS, FakeGpus, make_config, needs_demo_models, pids_alive, record_spawns

CHAT = "/v1/chat/completions"


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_concurrent_cold_requests_spawn_one_backend(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-load-seconds", "0.5"]}}))
    spawned = record_spawns(r.supervisor)
    results: list[int] = []

    async def one() -> None:
        results.append((await r.http.post(CHAT, json=chat("a"))).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(one)
    assert results == [200] * 12
    assert spawned == ["a"]


async def test_alias_resolves_and_answers(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "aliases": ["alpha"]}}))
    response = await r.http.post(CHAT, json=chat("alpha"))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"].startswith("tok0")


async def test_stream_is_relayed_chunk_by_chunk(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.2"]}}))
    await r.http.post(CHAT, json=chat("a", max_tokens=1))  # warm
    arrivals = []
    async with r.http.stream("POST", CHAT, json=chat("a", stream=True, max_tokens=5)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        async for line in response.aiter_lines():
            if line.startswith("data: ") and "timings" not in line:  # tokens, then [DONE]
                arrivals.append((trio.current_time(), line))
    assert arrivals[-1][1] == "data: [DONE]"
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:-1], strict=False)]
    assert len(gaps) == 4 and min(gaps) > 0.1  # not buffered: chunks arrive as tokens are made


@pytest.fixture
def fast_forward_clock() -> trio.testing.MockClock:
    """trio's clock for the whole test (pytest-trio uses a Clock fixture as the run's clock):
    real time at first; a test may set ``rate`` to make trio's time (every timeout routerd,
    hypercorn and the HTTP client keep) pass faster than the backend's real one."""
    return trio.testing.MockClock(rate=1.0)


async def test_stream_longer_than_60_seconds_is_relayed_whole(start_routerd, tmp_path, model_file, fast_forward_clock):
    """No timeout on routerd's side cuts a long stream (quart-trio's RESPONSE_TIMEOUT was 60 s;
    the write, body and header timeouts default to 60 s or less). Every one of them runs on
    trio's clock, so the stream lasts over 60 s of it, while the fake backend, another process
    on real time, makes its 100 tokens in about 3 s (it took 62 s of real time before)."""
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.03"]}},
        scheduler={"health_interval": 3600.0}))  # no checks during the fast-forward
    assert (await r.http.post(CHAT, json=chat("a", max_tokens=1))).status_code == 200  # loaded at real speed
    tokens = 0
    fast_forward_clock.rate = 30.0
    began = trio.current_time()
    async with r.http.stream("POST", CHAT, json=chat("a", stream=True, max_tokens=100)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and "timings" not in line:
                tokens += 1
    lasted = trio.current_time() - began
    fast_forward_clock.rate = 1.0
    assert tokens == 100 and lasted > 60, (tokens, lasted)


async def test_client_disconnect_cancels_upstream_and_frees_the_slot(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.1"]}}))
    async with r.http.stream("POST", CHAT, json=chat("a", stream=True, max_tokens=1000)) as response:
        async for _ in response.aiter_lines():
            break
    backend = r.supervisor.running("a")
    with trio.fail_after(5):
        while backend.in_flight:
            await r.supervisor.wait_changed()
        while not any("client disconnected" in line.text for line in backend.log.tail(50)):
            await trio.sleep(0.05)


async def test_client_leaving_a_non_streamed_completion_frees_the_slot_and_stops_generation(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.1"]}}))
    assert (await r.http.post(CHAT, json=chat("a", max_tokens=1))).status_code == 200  # loaded
    backend = r.supervisor.running("a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: r.http.post(CHAT, json=chat("a", max_tokens=1000)))  # 100 s if left alone
        with trio.fail_after(5):
            while not backend.in_flight:
                await r.supervisor.wait_changed()
        nursery.cancel_scope.cancel()  # the client hangs up
    with trio.fail_after(5):
        while backend.in_flight:
            await r.supervisor.wait_changed()
        while not any("client disconnected" in line.text for line in backend.log.tail(50)):
            await trio.sleep(0.05)


async def test_clients_giving_up_on_embeddings_never_send_the_backend_more_than_its_slots(
        start_routerd, tmp_path, model_file):
    """llama-server computes an embedding whole even when its client has gone. A client that
    gives up must not free the slot before the backend is done: the next request would be sent
    into a busy backend, and under load work piled up there until nothing finished in time."""
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "args": [
        "--parallel", "1", "--fake-batch-seconds", "0.6"]}}))
    embed = {"model": "a", "input": "hello"}
    assert (await r.http.post("/v1/embeddings", json=embed)).status_code == 200  # loaded
    backend = r.supervisor.running("a")
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # each gives up after 0.2 s, long before its answer
            async def give_up() -> None:
                with trio.move_on_after(0.2):
                    await r.http.post("/v1/embeddings", json=embed)
            nursery.start_soon(give_up)
        with trio.fail_after(10):
            while not backend.in_flight:  # the first of them holds the slot
                await r.supervisor.wait_changed()
            patient = await r.http.post("/v1/embeddings", json=embed)
    assert patient.status_code == 200
    props = (await r.http.get("/a/props")).json()
    assert props["fake_peak_in_flight"] == 1, "a request was sent while the backend was still busy"
    assert backend.in_flight == 0


async def test_backend_failing_to_start_gives_503_with_exit_code_and_log(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"bad": {"path": model_file("bad"), "args": ["--fake-exit-during-load", "3"]}}))
    response = await r.http.post(CHAT, json=chat("bad"))
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "unavailable_error" and error["code"] == "backend_start_failed"
    assert error["exit_code"] == 3
    assert "failing on purpose" in error["log_tail"]
    status = {m.name: m for m in r.supervisor.status()}["bad"]
    assert status.state == "failed" and status.exit_code == 3


async def test_stall_timeout_kills_a_silent_load_but_progress_keeps_a_slow_one(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path,
        {"stuck": {"path": model_file("s"), "args": ["--fake-load-seconds", "30", "--fake-silent-load"]},
         "slow": {"path": model_file("l"), "args": ["--fake-load-seconds", "2.5"]}},
        backend={"ready_timeout": 1.0}))
    stuck = await r.http.post(CHAT, json=chat("stuck"))
    assert stuck.status_code == 503 and "no progress" in stuck.json()["error"]["message"]
    slow = await r.http.post(CHAT, json=chat("slow"))  # prints progress every 0.2 s: not stalled
    assert slow.status_code == 200


async def test_crash_mid_stream_tells_the_client_and_next_request_gets_a_fresh_backend(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-crash-after", "3"]}}))
    body = ""
    await r.http.post(CHAT, json=chat("a", max_tokens=1))
    first_pid = r.supervisor.running("a").pid
    async with r.http.stream("POST", CHAT, json=chat("a", stream=True, max_tokens=10)) as response:
        async for chunk in response.aiter_text():
            body += chunk
    assert "tok2" in body and "backend_failed" in body
    with trio.fail_after(5):
        while r.supervisor.running("a") is not None:
            await r.supervisor.wait_changed()
    response = await r.http.post(CHAT, json=chat("a", max_tokens=2))
    assert response.status_code == 200
    assert r.supervisor.running("a").pid != first_pid


async def test_backend_ignoring_sigterm_is_killed_after_the_grace(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-ignore-sigterm"]}},
                                        backend={"stop_grace": 0.5}))
    await r.http.post(CHAT, json=chat("a"))
    backend = r.supervisor.running("a")
    r.supervisor.unload("a")
    with trio.fail_after(5):
        await backend.wait_gone()
    assert backend.exit_code == -9
    assert pids_alive([backend.pid]) == []


async def test_idle_ttl_stops_an_idle_model_but_not_a_busy_one(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "idle_ttl": 0.5,
                                                         "args": ["--fake-token-delay", "0.1"]}}))
    async with r.http.stream("POST", CHAT, json=chat("a", stream=True, max_tokens=12)) as response:
        async for _ in response.aiter_lines():
            pass  # 1.2 s of streaming: longer than the TTL, but busy
    backend = r.supervisor.running("a")
    assert backend is not None and backend.stop_reason is None
    with trio.fail_after(3):
        await backend.wait_gone()
    assert backend.stop_reason == "idle"


async def test_group_swap_stops_the_other_group(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {
        "a": {"path": model_file("a"), "group": "g1"}, "b": {"path": model_file("b"), "group": "g1"},
        "c": {"path": model_file("c"), "group": "g2"}, "free": {"path": model_file("f")}}))
    for name in ("a", "b", "free"):
        assert (await r.http.post(CHAT, json=chat(name))).status_code == 200
    assert {m.name for m in r.supervisor.status() if m.state == "ready"} == {"a", "b", "free"}
    assert (await r.http.post(CHAT, json=chat("c"))).status_code == 200
    assert {m.name for m in r.supervisor.status() if m.state == "ready"} == {"c", "free"}


async def test_max_loaded_models_stops_the_least_recently_used(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {n: {"path": model_file(n)} for n in "abc"},
                                        backend={"max_loaded_models": 2}))
    for name in ("a", "b", "a", "c"):
        assert (await r.http.post(CHAT, json=chat(name))).status_code == 200
    assert {m.name for m in r.supervisor.status() if m.state == "ready"} == {"a", "c"}


async def test_upstream_passthrough_routes(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"org/repo:Q4_K_M": {"path": model_file("x")}}))
    props = await r.http.get("/upstream/org/repo:Q4_K_M/props")
    assert props.status_code == 200 and props.json()["fake"] is True
    health = await r.http.get("/org/repo:Q4_K_M/health")
    assert health.json() == {"status": "ok"}
    slots = await r.http.get("/org/repo:Q4_K_M/slots")
    assert len(slots.json()) == 4


async def test_a_passthrough_path_reaches_the_backend_escaped_as_the_client_sent_it(start_routerd, tmp_path,
                                                                                   model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    answer = await r.http.get("/upstream/a/no%20such/caf%C3%A9?q=%C3%A9&x=a%2Fb")
    assert answer.status_code == 404 and answer.json()["fake_target"] == "/no%20such/caf%C3%A9?q=%C3%A9&x=a%2Fb"


async def test_proxied_endpoints(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    tokens = await r.http.post("/tokenize", json={"model": "a", "content": "hi"})
    assert tokens.json() == {"tokens": [104, 105]}
    embedding = await r.http.post("/v1/embeddings", json={"model": "a", "input": "hi"})
    assert embedding.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    completion = await r.http.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
    assert completion.json()["choices"][0]["text"] == "tok0 tok1"


@pytest.mark.parametrize(("request_kwargs", "status", "code"), [
    ({"content": b"{not json"}, 400, "invalid_json"),
    ({"json": {"messages": []}}, 400, "missing_model"),
    ({"json": ["a list"]}, 400, "invalid_json"),
    ({"json": chat("nope")}, 404, "model_not_found"),
])
async def test_bad_requests_get_openai_errors(start_routerd, tmp_path, model_file, request_kwargs, status, code):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    response = await r.http.post(CHAT, **request_kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


async def test_unknown_model_lists_closest_names(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"smollm2-135m": {"path": model_file("a")}}))
    error = (await r.http.post(CHAT, json=chat("smolm2-135"))).json()["error"]
    assert error["closest"] == ["smollm2-135m"] and "did you mean" in error["message"]


async def test_body_over_the_limit_is_413(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, server={"max_body_bytes": 1000}))
    response = await r.http.post(CHAT, json=chat("a", padding="x" * 2000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    # the unread body leaves the connection unusable: the client is told not to send another on it
    assert response.headers["connection"] == "close"
    for _ in range(5):  # the same client goes on working (the CI fuzz run once hit a closing socket)
        big = await r.http.post(CHAT, json=chat("a", padding="x" * 200_000))
        assert big.status_code == 413 and (await r.http.get("/health")).status_code == 200


async def test_unknown_route_and_method_are_openai_errors(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    missing = await r.http.get("/v2/whatever")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = await r.http.get(CHAT)
    assert wrong.status_code == 405 and "error" in wrong.json()
    typo = await r.http.post("/v1/chat/completion", json={"model": "a"})  # no route takes any method here
    assert typo.status_code == 404 and typo.json()["error"]["code"] == "route_not_found"
    assert (await r.http.post("/v1/models")).status_code == 405


async def test_missing_model_file_is_503_not_a_spawn(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"gone": {"path": str(tmp_path / "absent.gguf")}}))
    response = await r.http.post(CHAT, json=chat("gone"))
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"


async def test_models_list_has_every_name_and_alias_with_state(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "aliases": ["alpha"], "group": "g"}}))
    await r.http.post(CHAT, json=chat("a"))
    data = (await r.http.get("/v1/models")).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"a", "alpha"}
    assert by_id["a"]["state"] == "ready" and by_id["a"]["group"] == "g" and by_id["alpha"]["alias_of"] == "a"
    assert (await r.http.get("/health")).json()["status"] == "ok"


async def test_shutdown_drains_in_flight_then_stops_every_backend(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-token-delay", "0.1"]}}))
    await r.http.post(CHAT, json=chat("a", max_tokens=1))
    pid = r.supervisor.running("a").pid
    tokens = 0
    async with r.http.stream("POST", CHAT, json=chat("a", stream=True, max_tokens=15)) as response:
        r.daemon.request_shutdown()
        async for line in response.aiter_lines():
            tokens += line.startswith("data: {") and "timings" not in line
    assert tokens == 15  # the in-flight stream finished during the drain
    with trio.fail_after(5):
        while pids_alive([pid]):
            await trio.sleep(0.05)
    with trio.fail_after(5):  # then the listener closes
        while True:
            try:
                await r.http.get("/health")
            except httpx.TransportError:
                break
            await trio.sleep(0.05)


def _cuda_visible_devices(pid: int) -> str | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    value = env.get(b"CUDA_VISIBLE_DEVICES")
    return value.decode() if value is not None else None


@needs_demo_models
async def test_each_model_goes_to_a_gpu_with_room_before_anything_is_evicted(start_routerd, tmp_path):
    # the fake server never reads the file; routerd reads its GGUF header to estimate (~0.5 GiB on a GPU)
    smollm2 = str(DEMO_MODELS["smollm2-135m"])
    models = {name: {"path": smollm2} for name in ("a", "b", "c")}
    gpus = FakeGpus((0, "fake A", 768 << 20, 768 << 20), (1, "fake B", 768 << 20, 768 << 20))
    r = await start_routerd(make_config(tmp_path, models, memory={"gpu_reserve": "0"}), gpus=gpus)
    for name in ("a", "b"):
        assert (await r.http.post(CHAT, json=chat(name))).status_code == 200
    a, b = r.supervisor.running("a"), r.supervisor.running("b")
    a_gpu = _cuda_visible_devices(a.pid)
    assert {a_gpu, _cuda_visible_devices(b.pid)} == {"0", "1"}
    view = {m["model"]: m for m in (await r.http.get("/memory")).json()["models"]}
    assert view["c"]["fits_now"] is False and view["c"]["evicts"] == ["a"]  # least recently used
    assert (await r.http.post(CHAT, json=chat("c"))).status_code == 200
    assert a.gone and not b.gone
    assert _cuda_visible_devices(r.supervisor.running("c").pid) == a_gpu


async def test_models_list_shows_a_change_at_once_despite_its_cache(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))

    async def state() -> str:
        return next(m for m in (await r.http.get("/v1/models")).json()["data"] if m["id"] == "a")["state"]
    assert await state() == "unloaded"
    assert (await r.http.post(CHAT, json=chat("a"))).status_code == 200
    assert await state() == "ready"  # well within the cache's one second
    r.supervisor.unload("a")
    with trio.fail_after(5):
        await r.supervisor.running("a").wait_gone() if r.supervisor.running("a") else None
    assert await state() == "unloaded"
