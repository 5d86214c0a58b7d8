"""Pinned models and eviction priority, end to end with the fake llama-server: a keep_loaded
model is never stopped for idleness or room, and lower-priority idle models go first."""

from __future__ import annotations

import trio

from tests.conftest import make_config


async def post(r, model: str):
    return await r.http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})


async def test_a_pinned_model_outlives_its_idle_ttl_and_is_never_evicted_for_another(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"pinned": {"path": model_file("pinned"), "keep_loaded": True, "idle_ttl": 0.3},
                   "other": {"path": model_file("other"), "idle_ttl": 0.3}},
        backend={"max_loaded_models": 1}))
    assert (await post(r, "pinned")).status_code == 200
    pid = r.supervisor.running("pinned").pid
    refused = await post(r, "other")  # no room beside the pinned one: refused at once, naming it
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory" and "pinned" in error["message"] and "keep_loaded" in error["message"]
    await trio.sleep(1.0)  # well past its idle_ttl
    assert r.supervisor.running("pinned").pid == pid
    assert (await r.http.post("/models/unload", json={"model": "pinned"})).status_code == 200  # an operator may
    assert (await post(r, "other")).status_code == 200


async def test_lower_priority_idle_models_are_evicted_first(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"important": {"path": model_file("important"), "priority": 10},
                   "casual": {"path": model_file("casual"), "priority": 0},
                   "new": {"path": model_file("new")}},
        backend={"max_loaded_models": 2}))
    assert (await post(r, "casual")).status_code == 200
    assert (await post(r, "important")).status_code == 200  # the most recently used...
    assert (await post(r, "casual")).status_code == 200  # ...is now casual, yet casual goes: lower priority
    assert (await post(r, "new")).status_code == 200
    assert r.supervisor.running("casual") is None and r.supervisor.running("important") is not None
