"""Request rewriting per model (routerd/rewriting.py): defaults, override and strip, applied on
the way to llama-server, visible in /v1/models and the request log; a body that needs no change
goes through byte for byte."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routerd.config import from_mapping
from routerd.errors import ConfigError
from routerd.rewriting import Rewrite, rewrite, rewritten
from tests.conftest import make_config

RULE = Rewrite.of({"temperature": 0.6, "top_k": 20}, {"chat_template_kwargs": {"enable_thinking": False}},
                  ["top_p"])
fields = st.dictionaries(st.sampled_from(["temperature", "top_k", "top_p", "chat_template_kwargs", "seed"]),
                         st.one_of(st.integers(), st.floats(allow_nan=False), st.none()))


@given(fields)
def test_defaults_fill_in_override_wins_strip_removes_and_nothing_else_moves(payload):
    assert RULE is not None
    before = dict(payload)
    changed = rewrite(payload, RULE)
    assert "top_p" not in payload
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}
    assert payload["temperature"] == (before["temperature"] if "temperature" in before else 0.6)
    assert payload["top_k"] == (before["top_k"] if "top_k" in before else 20)
    assert payload.get("seed") == before.get("seed")
    moved = {k for k in set(before) | set(payload) if before.get(k, KeyError) != payload.get(k, KeyError)}
    assert set(changed) == moved


def test_a_body_that_needs_no_change_is_the_same_bytes():
    assert RULE is not None
    body = b'{"model":"m",  "temperature": 0.1, "top_k": 5, "chat_template_kwargs": {"enable_thinking": false}}'
    assert rewritten(body, RULE) == (body, [])  # spacing and order kept: not re-encoded
    changed, fields_changed = rewritten(b'{"model": "m", "top_p": 0.9}', RULE)
    assert json.loads(changed) == {"model": "m", "temperature": 0.6, "top_k": 20,
                                   "chat_template_kwargs": {"enable_thinking": False}}
    assert fields_changed == ["top_p", "temperature", "top_k", "chat_template_kwargs"]
    assert Rewrite.of({}, {}, []) is None


def test_the_model_field_is_not_rewritable():
    data = make_config(Path("/tmp"), {"m": {"path": "/x.gguf", "override": {"model": "y"}}})
    with pytest.raises(ConfigError, match="models.m.override: 'model' names the model"):
        from_mapping(data)


async def test_rewriting_on_the_way_to_llama_server_shown_in_models_and_the_request_log(
        start_routerd, tmp_path, model_file, caplog):
    caplog.set_level(logging.INFO, "routerd.requests")
    r = await start_routerd(make_config(tmp_path, {
        "m": {"path": model_file("m"), "defaults": {"temperature": 0.6}, "override": {"stream": False},
              "strip": ["top_p"]},
        "plain": {"path": model_file("plain")}}))

    async def last_body(model: str) -> str:
        return (await r.http.get(f"/{model}/props")).json()["fake_last_body"]

    answer = await r.http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.9, "stream": True})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")  # not a stream
    sent = json.loads(await last_body("m"))
    assert sent["temperature"] == 0.6 and "top_p" not in sent and sent["stream"] is False
    untouched = b'{"model": "m",   "messages": [{"role": "user", "content": "hi"}], "temperature": 0.1, ' \
        b'"stream": false}'
    assert (await r.http.post("/v1/chat/completions", content=untouched)).status_code == 200
    assert await last_body("m") == untouched.decode()  # byte for byte
    plain = b'{"model":"plain","prompt":"x","top_p":0.5}'
    assert (await r.http.post("/v1/completions", content=plain)).status_code == 200
    assert await last_body("plain") == plain.decode()
    models = {m["id"]: m for m in (await r.http.get("/v1/models")).json()["data"]}
    assert models["m"]["rewrite"] == {"defaults": {"temperature": 0.6}, "override": {"stream": False},
                                      "strip": ["top_p"]}
    assert models["plain"]["rewrite"] is None
    logged = [record.getMessage() for record in caplog.records if record.name == "routerd.requests"]
    assert any("rewritten=top_p,temperature,stream" in line for line in logged), logged
    assert sum("rewritten=" in line for line in logged) == 1  # the untouched body was not rewritten
