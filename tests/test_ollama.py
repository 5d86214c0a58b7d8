"""Ollama's API on routerd's port (routerd/front/ollama.py, ollama_shapes.py): the official
``ollama`` client against the real llama-server, and the translations on their own."""

from __future__ import annotations

import json
import os
import time

import ollama
import pytest
import trio

from routerd.front import ollama_shapes as shapes
from routerd.front import routes
from routerd.front.keys import KeySettings
from tests.conftest import needs_real_llama
from tests.fake_hub import FakeHub
from tests.test_real_llama import MODELS, real_config

HELLO = [{"role": "user", "content": "Say hello."}]


def client(r, key: str | None = None) -> ollama.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return ollama.AsyncClient(host=r.url, timeout=120, headers=headers)


# -- against the real llama-server -----------------------------------------------------------
@pytest.mark.real
@needs_real_llama
async def test_list_show_chat_generate_and_ps_with_the_ollama_client(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    c = client(r)

    assert (await c._request_raw("GET", "/api/version")).json()["version"] == shapes.OLLAMA_VERSION
    listed = {m.model: m for m in (await c.list()).models}
    assert set(listed) == {"smollm2-135m:latest", "gemma3-270m:latest"}
    smol = listed["smollm2-135m:latest"]
    assert smol.size == os.path.getsize(MODELS["smollm2-135m"])
    assert smol.details.format == "gguf" and smol.details.family == "llama"
    assert smol.details.quantization_level == "Q4_1" and smol.details.parameter_size
    assert smol.digest == shapes.digest(str(MODELS["smollm2-135m"]))
    assert listed["gemma3-270m:latest"].details.family == "gemma3"

    shown = await c.show("smollm2-135m:latest")
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] > 0
    assert "completion" in shown.capabilities and "embedding" not in shown.capabilities
    assert (await c.ps()).models == []  # nothing loaded yet

    # one answer, not streamed, under both of the names Ollama clients use
    answer = await c.chat(model="smollm2-135m", messages=HELLO, options={"num_predict": 8, "temperature": 0})
    assert answer.done and answer.message.role == "assistant" and answer.message.content
    assert answer.eval_count == 8 and answer.done_reason == "length" and answer.prompt_eval_count > 0
    assert answer.total_duration >= answer.load_duration > 0 and answer.eval_duration > 0
    again = await c.chat(model="smollm2-135m:latest", messages=HELLO, options={"num_predict": 8, "temperature": 0})
    assert again.message.content == answer.message.content and again.load_duration == 0  # loaded already

    # streamed: the first line comes while llama-server still generates the rest
    count = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
    stream = await c.chat(model="smollm2-135m", messages=count, stream=True,
                          options={"num_predict": 32, "temperature": 0})
    chunks, busy_at_first = [], None
    async for chunk in stream:
        if busy_at_first is None:
            busy_at_first = r.supervisor.running("smollm2-135m").in_flight
        chunks.append(chunk)
    assert len(chunks) > 2 and busy_at_first == 1
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done and chunks[-1].done_reason == "length"
    assert chunks[-1].eval_count == 32 and "".join(c.message.content for c in chunks)

    generated = await c.generate(model="gemma3-270m", prompt="The capital of France is",
                                 system="Answer in one word.", options={"num_predict": 6}, keep_alive="10m")
    assert generated.done and generated.response and generated.eval_count > 0
    assert r.supervisor.running("gemma3-270m").idle_ttl == 600.0  # keep_alive: this load's TTL
    raw = await c.generate(model="gemma3-270m", prompt="1, 2, 3, 4,", raw=True,
                           options={"num_predict": 4, "temperature": 0})
    assert raw.response and raw.eval_count == 4

    running = {m.model: m for m in (await c.ps()).models}
    assert set(running) == {"smollm2-135m:latest", "gemma3-270m:latest"}
    assert running["gemma3-270m:latest"].size_vram == 0 and running["gemma3-270m:latest"].size > 0
    left = running["gemma3-270m:latest"].expires_at.timestamp() - time.time()
    assert 500 < left <= 600
    assert running["smollm2-135m:latest"].expires_at.year > 2300  # idle_ttl 0: never


@pytest.mark.real
@needs_real_llama
async def test_keep_alive_zero_unloads_right_after_the_answer(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    c = client(r)
    answer = await c.generate(model="smollm2-135m", prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    assert answer.done and answer.response
    backend = r.supervisor.running("smollm2-135m")
    assert backend is None or backend.stop_requested  # asked to stop before the answer came back
    with trio.fail_after(20):
        while r.supervisor.running("smollm2-135m") is not None:
            await r.supervisor.wait_changed()
    assert (await c.ps()).models == []
    # no prompt: Ollama's way to load a model, and (keep_alive 0) to unload it
    loaded = await c.generate(model="smollm2-135m", keep_alive=-1)
    assert loaded.done_reason == "load" and r.supervisor.running("smollm2-135m").idle_ttl == 0
    assert [m.model for m in (await c.ps()).models] == ["smollm2-135m:latest"]
    # keep_alive 0 decides for every client of the model: never from another site's page, and
    # with keys only with an admin key (as router mode's unload).
    forged = await r.http.post("/api/generate", content=b'{"model": "smollm2-135m", "keep_alive": 0}',
                               headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert forged.status_code == 403 and forged.json() == {"error": forged.json()["error"]}
    assert not r.supervisor.running("smollm2-135m").stop_requested
    user, _ = r.daemon.gate.add("app", KeySettings())
    keyed = await r.http.post("/api/generate", json={"model": "smollm2-135m", "keep_alive": 0},
                              headers={"Authorization": f"Bearer {user}"})
    assert keyed.status_code == 403 and "admin key" in keyed.json()["error"]
    assert not r.supervisor.running("smollm2-135m").stop_requested
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    unloaded = await r.http.post("/api/generate", json={"model": "smollm2-135m", "keep_alive": 0},
                                 headers={"Authorization": f"Bearer {admin}"})
    assert unloaded.status_code == 200 and r.supervisor.running("smollm2-135m").stop_requested


@pytest.mark.real
@needs_real_llama
async def test_embeddings_old_and_new(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{
        "embedder": {"file": "smollm2-135m", "args": ["--embeddings", "--pooling", "mean"]}}))
    c = client(r)
    assert "embedding" in (await c.show("embedder")).capabilities
    embedded = await c.embed(model="embedder", input=["hello", "goodbye"])
    assert len(embedded.embeddings) == 2 and all(len(e) == 576 for e in embedded.embeddings)
    assert embedded.embeddings[0] != embedded.embeddings[1] and embedded.prompt_eval_count > 0
    single = await c.embed(model="embedder:latest", input="hello")
    assert single.embeddings == embedded.embeddings[:1]
    old = await c.embeddings(model="embedder", prompt="hello")
    assert len(old.embedding) == 576


@pytest.mark.real
@needs_real_llama
async def test_errors_are_ollamas_shape_with_keys_applying(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    with pytest.raises(ollama.ResponseError) as missing:
        await client(r).chat(model="nope", messages=HELLO)
    assert missing.value.status_code == 404 and missing.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as missing_stream:
        async for _ in await client(r).chat(model="nope:latest", messages=HELLO, stream=True):
            pass
    assert missing_stream.value.status_code == 404

    unknown = await r.http.post("/api/nothing", json={})
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}

    full, _ = r.daemon.gate.add("everything")
    scoped, _ = r.daemon.gate.add("small-only", KeySettings(models=("smollm2-*",)))
    refused = await r.http.post("/api/chat", json={"model": "smollm2-135m", "messages": HELLO})
    assert refused.status_code == 401 and set(refused.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as wrong:
        await client(r, "rk-not-a-key").list()
    assert wrong.value.status_code == 401
    assert [m.model for m in (await client(r, scoped).list()).models] == ["smollm2-135m:latest"]
    with pytest.raises(ollama.ResponseError) as outside:
        await client(r, scoped).chat(model="gemma3-270m", messages=HELLO)
    assert outside.value.status_code == 404 and r.supervisor.running("gemma3-270m") is None
    answer = await client(r, full).chat(model="gemma3-270m", messages=HELLO, options={"num_predict": 2})
    assert answer.message.content
    pull = await r.http.post("/api/pull", json={"model": "org/repo:Q4_K_M"},
                             headers={"Authorization": f"Bearer {scoped}"})
    assert pull.status_code in (401, 403) and set(pull.json()) == {"error"}  # pulls need an admin key


SMOL_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture
def smol_hub():
    """The stand-in hub serving the demo SmolLM2's real bytes, so that a pulled model answers."""
    hub = FakeHub()
    hub.repos["org/smol-GGUF"] = {SMOL_FILE: MODELS["smollm2-135m"].read_bytes(), "README.md": b"# smol"}
    yield hub
    hub.close()


@pytest.mark.real
@needs_real_llama
async def test_pull_with_the_ollama_client_then_the_model_answers(start_routerd, tmp_path, smol_hub):
    r = await start_routerd(real_config(tmp_path), env={**os.environ, "HF_ENDPOINT": smol_hub.url})
    c = client(r)
    size = os.path.getsize(MODELS["smollm2-135m"])
    assert (await c.list()).models == []

    # streamed: Ollama's progress lines, the file's bytes as "downloading" lines
    lines = [line async for line in await c.pull("hf.co/org/smol-GGUF:Q4_1", stream=True)]
    statuses = [line.status for line in lines]
    assert [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]] == [
        "pulling manifest", "downloading", "verifying sha256 digest", "writing manifest", "success"]
    downloading = [line for line in lines if line.status == "downloading"]
    assert {line.digest for line in downloading} == {"sha256:" + shapes.digest(SMOL_FILE)}
    assert {line.total for line in downloading} == {size}
    done = [line.completed for line in downloading]
    assert done == sorted(done) and done[-1] == size
    assert smol_hub.downloads == [(f"org/smol-GGUF/{SMOL_FILE}", 0)]
    raw = await r.http.post("/api/pull", json={"model": "org/smol-GGUF:Q4_1", "stream": True})
    assert raw.headers["content-type"] == "application/x-ndjson"
    assert json.loads(raw.text.splitlines()[-1]) == {"status": "success", "model": "org/smol-GGUF:Q4_1"}

    # the pulled model is listed and answers, under Ollama's name for it
    listed = {m.model: m for m in (await c.list()).models}
    assert set(listed) == {"org/smol-GGUF:Q4_1"} and listed["org/smol-GGUF:Q4_1"].size == size
    assert listed["org/smol-GGUF:Q4_1"].details.family == "llama"
    answer = await c.chat(model="hf.co/org/smol-GGUF:Q4_1", messages=HELLO, options={"num_predict": 4})
    assert answer.done and answer.message.content and answer.eval_count == 4

    # not streamed: one line; the file is in the hub cache already, so nothing is downloaded again
    whole = await c.pull("org/smol-GGUF:Q4_1", stream=False)
    assert whole.status == "success" and len(smol_hub.downloads) == 1

    # a repo the hub does not have: Ollama's error, in both modes, and nothing is listed
    missing = f"org/nothing-here was not found on {smol_hub.url} (a private repo needs HF_TOKEN)"
    with pytest.raises(ollama.ResponseError) as refused:
        await c.pull("org/nothing-here", stream=False)
    assert refused.value.status_code == 404 and refused.value.error == missing
    seen = []
    with pytest.raises(ollama.ResponseError) as refused_stream:
        async for line in await c.pull("hf.co/org/nothing-here:latest", stream=True):
            seen.append(line.status)
    assert seen == ["pulling manifest"] and refused_stream.value.error == missing
    with pytest.raises(ollama.ResponseError) as malformed:
        await c.pull("just-a-name", stream=False)
    assert malformed.value.status_code == 400 and "is not org/repo[:QUANT]" in malformed.value.error
    assert [m.model for m in (await c.list()).models] == ["org/smol-GGUF:Q4_1"]

    # with keys, a pull needs an admin key
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    user, _ = r.daemon.gate.add("app")
    with pytest.raises(ollama.ResponseError) as anonymous:
        await c.pull("org/smol-GGUF:Q4_1", stream=False)
    assert anonymous.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as not_admin:
        async for _ in await client(r, user).pull("org/smol-GGUF:Q4_1", stream=True):
            pass
    assert not_admin.value.status_code == 403 and "admin key" in not_admin.value.error
    assert len(smol_hub.downloads) == 1
    assert (await client(r, admin).pull("org/smol-GGUF:Q4_1", stream=False)).status == "success"


# -- the translations, without a backend -----------------------------------------------------
def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def test_a_stream_becomes_one_line_per_token_and_a_final_line_with_counts():
    stream = sse({"choices": [{"delta": {"role": "assistant"}}]},
                 {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
                 {"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
                 {"choices": [{"delta": {}, "finish_reason": "stop"}],
                  "timings": {"prompt_n": 5, "prompt_ms": 2.5, "predicted_n": 2, "predicted_ms": 10.0}},
                 {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
    translator = shapes.Translator("m:latest", "chat", began=0.0)
    lines = []
    for i in range(0, len(stream), 7):  # split anywhere: lines come only for whole events
        lines += [json.loads(line) for line in translator.feed(stream[i:i + 7])]
    assert [line["message"].get("thinking", line["message"]["content"]) for line in lines] == ["hmm", "Hel", "lo"]
    final = json.loads(translator.finish())
    assert final["done"] and final["done_reason"] == "stop" and final["model"] == "m:latest"
    assert (final["prompt_eval_count"], final["eval_count"]) == (7, 2)
    assert (final["prompt_eval_duration"], final["eval_duration"]) == (2_500_000, 10_000_000)


def called(**delta) -> dict:
    return {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": delta.pop("function"), **delta}]}}]}


def test_tool_calls_and_errors_in_a_stream():
    first = called(id="c1", function={"name": "f", "arguments": "{\"a\""})
    last = called(function={"arguments": ": 1}"})
    last["choices"][0]["finish_reason"] = "tool_calls"
    translator = shapes.Translator("m", "generate", began=0.0)
    assert [json.loads(line).get("response") for line in translator.feed(sse(first, last))] == [""]
    translator = shapes.Translator("m", "chat", began=0.0)
    (line,) = translator.feed(sse(first, last))
    assert json.loads(line)["message"]["tool_calls"][0]["function"] == {"index": 0, "name": "f", "arguments": {"a": 1}}
    assert json.loads(translator.finish())["done_reason"] == "stop"
    failed = shapes.Translator("m", "chat", began=0.0)
    assert json.loads(failed.feed(b'data: {"error": {"message": "boom", "code": 500}}\n\n')[0]) == {"error": "boom"}
    assert failed.error == "boom"


def test_requests_translate_options_format_images_think_and_tools():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    payload = shapes.chat_request({
        "messages": [{"role": "user", "content": "see", "images": ["iVBORw0KGgo="]},
                     {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
                     {"role": "tool", "content": "42"}],
        "options": {"num_predict": 5, "temperature": 0.2, "top_k": 3, "stop": "END", "seed": 1, "num_ctx": 99,
                    "repeat_penalty": 1.1},
        "format": {"type": "object"}, "think": True, "tools": tools}, "m")
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert (payload["max_tokens"], payload["temperature"], payload["top_k"], payload["stop"], payload["seed"],
            payload["repeat_penalty"]) == (5, 0.2, 3, ["END"], 1, 1.1)
    assert "num_ctx" not in payload and "n_ctx" not in payload
    assert payload["messages"][0]["content"][1] == {"type": "image_url",
                                                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    call = payload["messages"][1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"x": 1}
    assert payload["messages"][2]["tool_call_id"] == call["id"]
    assert payload["response_format"]["type"] == "json_schema" and payload["tools"] == tools
    assert payload["chat_template_kwargs"] == {"enable_thinking": True}
    path, generate = shapes.generate_request({"prompt": "p", "system": "s", "stream": False, "format": "json"}, "m")
    assert path == "/v1/chat/completions" and generate["messages"][0] == {"role": "system", "content": "s"}
    assert generate["stream"] is False and generate["response_format"] == {"type": "json_object"}
    assert shapes.generate_request({"prompt": "p", "raw": True}, "m")[0] == "/v1/completions"


@pytest.mark.parametrize(("given", "seconds"), [
    (None, None), (0, 0.0), ("0", 0.0), (-1, -1.0), ("-1m", -60.0), ("5m", 300.0), ("30s", 30.0), (90, 90.0),
    ("1h30m", 5400.0), ("250ms", 0.25)])
def test_keep_alive(given, seconds):
    assert shapes.keep_alive_seconds(given) == seconds


@pytest.mark.parametrize("given", ["soon", "5x", "", True, [1]])
def test_keep_alive_refuses_what_is_not_a_duration(given):
    with pytest.raises(shapes.ShapeError):
        shapes.keep_alive_seconds(given)


def test_names():
    assert shapes.ollama_name("smollm2-135m") == "smollm2-135m:latest"
    assert shapes.ollama_name("org/repo:Q4_K_M") == "org/repo:Q4_K_M"
    assert shapes.ollama_name("my:model/x") == "my:model/x:latest"
    assert shapes.candidates("hf.co/org/repo:latest") == ["hf.co/org/repo:latest", "hf.co/org/repo",
                                                         "org/repo:latest", "org/repo"]
    assert shapes.pull_ref("hf.co/org/repo:Q4_K_M") == "org/repo:Q4_K_M"


def test_error_message_reads_every_shape():
    assert shapes.error_message(b'{"error": {"message": "no", "type": "x"}}') == "no"
    assert shapes.error_message(b'{"error": "plain"}') == "plain"
    assert shapes.error_message(b"Bad Gateway") == "Bad Gateway"



@pytest.mark.parametrize(("method", "path", "label", "queued"), [
    ("POST", "/api/chat", "/api/chat", True), ("POST", "/api/generate", "/api/generate", True),
    ("POST", "/api/embed", "/api/embed", True), ("POST", "/api/embeddings", "/api/embeddings", True),
    ("POST", "/api/pull", "/api/pull", False), ("GET", "/api/tags", "/api", False), ("GET", "/api/chat", "/api", False),
    ("DELETE", "/api/delete", "/api", False)])
def test_every_api_path_is_ollamas(method, path, label, queued):
    found = routes.route(method, path)
    assert (found.surface, found.label, found.queued) == (routes.Surface.OLLAMA, label, queued)
    assert found.changes_state is (path == "/api/pull") and not routes.is_proxied(method, path)
    assert routes.route("OPTIONS", path).surface is routes.Surface.METHODS
