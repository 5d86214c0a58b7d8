"""What routerd shows of itself: /metrics, /events, `routerctl events`, the request log and
loading feedback, against fake backends (the real-llama and real-Prometheus checks are in
test_dashboard.py)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import openai
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from routerd import events
from routerd.front.keys import KeySettings
from routerd.ops import logs, requestlog
from tests.conftest import ROOT, make_config
from tests.test_control import rpc


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels (parsed by prometheus_client)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def scrape(r) -> dict:
    response = await r.http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


def chat(model: str, words: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens, **extra}


async def test_counters_move_as_requests_loads_evictions_and_failures_happen(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {
        "a": {"path": model_file("a")}, "b": {"path": model_file("b")},
        "broken": {"path": model_file("broken"), "args": ["--fake-exit-during-load", "3"]},
    }, backend={"max_loaded_models": 1}, scheduler={"crash_loop_failures": 1}))
    before = await scrape(r)
    assert value(before, "routerd_model_state", model="a", state="unloaded") == 1.0
    assert value(before, "routerd_catalog_models") == 3.0
    assert value(before, "routerd_build_info", version="0.1.0", llama_server=r.supervisor.binary,
                 llama_server_version="9999 (fake)") == 1.0  # its --version

    # Three answers on a: whole, whole and streamed (whose counts come from the last chunk's timings).
    for words, max_tokens, stream in (("one two three", 3, False), ("four five", 4, False), ("six", 5, True)):
        response = await r.http.post("/v1/chat/completions", json=chat("a", words, max_tokens, stream=stream))
        assert response.status_code == 200
    samples = await scrape(r)
    assert value(samples, "routerd_requests_total", model="a", route="/v1/chat/completions", status="200") == 3
    assert value(samples, "routerd_prompt_tokens_total", model="a") == 3 + 2 + 1
    assert value(samples, "routerd_completion_tokens_total", model="a") == 3 + 4 + 5
    assert value(samples, "routerd_request_duration_seconds_count", model="a", route="/v1/chat/completions") == 3
    assert value(samples, "routerd_time_to_first_byte_seconds_count", model="a", route="/v1/chat/completions") == 3
    assert value(samples, "routerd_queue_wait_seconds_count", model="a") == 3
    assert value(samples, "routerd_loads_total", model="a", outcome="ready") == 1
    assert value(samples, "routerd_load_duration_seconds_count", model="a") == 1
    assert value(samples, "routerd_model_state", model="a", state="ready") == 1
    assert value(samples, "routerd_backend_slots", model="a") == 4
    assert value(samples, "routerd_kv_cache_utilization", model="a") == 0.0
    # The child's own metrics, under their own names, with the model's label.
    assert value(samples, "llamacpp:tokens_predicted_total", model="a") == 3 + 4 + 5

    # b needs a's place (max_loaded_models = 1): a is evicted, and its llama-server metrics go with it.
    assert (await r.http.post("/v1/chat/completions", json=chat("b", "hi", 2))).status_code == 200
    samples = await scrape(r)
    assert value(samples, "routerd_evictions_total", model="a", cause="memory") == 1
    assert value(samples, "routerd_stops_total", model="a", cause="memory") == 1
    assert value(samples, "routerd_model_state", model="a", state="unloaded") == 1
    assert value(samples, "routerd_model_state", model="b", state="ready") == 1
    assert value(samples, "llamacpp:tokens_predicted_total", model="a") is None
    assert value(samples, "llamacpp:tokens_predicted_total", model="b") == 2

    # A backend that dies while loading: a failure, a failed load, and (breaker at 1) a crash loop.
    response = await r.http.post("/v1/chat/completions", json=chat("broken", "hi", 1))
    assert response.status_code == 503
    samples = await scrape(r)
    assert value(samples, "routerd_backend_failures_total", model="broken") == 1
    assert value(samples, "routerd_loads_total", model="broken", outcome="failed") == 1
    assert value(samples, "routerd_crash_loops_total", model="broken") == 1
    assert value(samples, "routerd_model_crash_looping", model="broken") == 1
    assert value(samples, "routerd_model_state", model="broken", state="failed") == 1
    response = await r.http.post("/v1/chat/completions", json=chat("broken", "hi", 1))
    samples = await scrape(r)
    assert value(samples, "routerd_requests_rejected_total", model="broken", reason="model_failed") == 1
    assert value(samples, "routerd_requests_total", model="broken", route="/v1/chat/completions", status="503") == 2

    # Control calls by method and outcome; an unknown method is counted without its name.
    await rpc(str(tmp_path / "control.sock"), {"jsonrpc": "2.0", "id": 1, "method": "ping"},
              {"jsonrpc": "2.0", "id": 2, "method": "load", "params": {"model": "nope"}},
              {"jsonrpc": "2.0", "id": 3, "method": "no.such.method"})
    samples = await scrape(r)
    assert value(samples, "routerd_control_calls_total", method="ping", outcome="ok") == 1
    assert value(samples, "routerd_control_calls_total", method="load", outcome="error") == 1
    assert value(samples, "routerd_control_calls_total", method="unknown", outcome="error") == 1


async def test_label_sets_stay_bounded_under_a_thousand_bogus_model_names(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    for i in range(1000):
        response = await r.http.post("/v1/completions", json={"model": f"bogus-{i}", "prompt": "x"})
        assert response.status_code == 404
    samples = await scrape(r)
    models = {dict(labels).get("model") for (name, labels) in samples if name.startswith("routerd_")}
    assert models <= {None, "", "a"}
    assert value(samples, "routerd_requests_rejected_total", model="", reason="model_not_found") == 1000
    assert value(samples, "routerd_requests_total", model="", route="/v1/completions", status="404") == 1000
    assert len(samples) < 400  # every family, all models: no series per bogus name


async def test_metrics_and_events_need_an_admin_key_once_keys_exist(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}, "b": {"path": model_file("b")}}))
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    scoped, _ = r.daemon.gate.add("team-a", KeySettings(models=("a",)))
    assert (await r.http.get("/metrics")).status_code == 401
    refused = await r.http.get("/metrics", headers={"Authorization": f"Bearer {scoped}"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert (await r.http.get("/metrics", headers={"Authorization": f"Bearer {admin}"})).status_code == 200
    data = make_config(tmp_path, {"a": {"path": model_file("a")}, "b": {"path": model_file("b")}},
                       metrics={"open": True})
    r.write_config(data)
    await r.daemon.catalog_service.reload()
    assert (await r.http.get("/metrics")).status_code == 200  # metrics.open: for keyless scrapers
    assert (await r.http.get("/events")).status_code == 401  # the rest still needs a key
    assert (await r.http.get("/v1/models")).status_code == 401

    # A scoped key's event stream shows its own model's events only.
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect_events, r, seen, {"Authorization": f"Bearer {scoped}"}, "")
        await wait_for(lambda: seen)  # the snapshot: subscribed
        for model in ("b", "a"):
            assert (await r.http.post("/v1/completions", json={"model": model, "prompt": "x"},
                                      headers={"Authorization": f"Bearer {admin}"})).status_code == 200
        await wait_for(lambda: any(e.get("type") == "model.ready" for e in seen))
        nursery.cancel_scope.cancel()
    assert [m["model"] for m in seen[0]["models"]] == ["a"]
    assert {e["model"] for e in seen[1:]} == {"a"}


async def collect_events(r, seen: list[dict], headers: dict | None = None, query: str = "") -> None:
    async with r.http.stream("GET", "/events" + query, headers=headers or {}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))


async def wait_for(condition, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def test_events_tell_a_load_and_an_eviction_in_order(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}, "b": {"path": model_file("b")}},
                                        backend={"max_loaded_models": 1}))
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect_events, r, seen, None, "?requests=1")
        await wait_for(lambda: seen)
        assert seen[0]["type"] == "snapshot"
        assert (await r.http.post("/v1/completions", json={"model": "a", "prompt": "x"})).status_code == 200
        assert (await r.http.post("/v1/completions", json={"model": "b", "prompt": "x"})).status_code == 200
        await wait_for(lambda: sum(e["type"] == "request" for e in seen) == 2)
        nursery.cancel_scope.cancel()
    story = [(e["type"], e["model"]) for e in seen[1:] if e["type"] != "model.progress"]
    assert story == [
        ("model.loading", "a"), ("model.ready", "a"), ("request", "a"),
        ("model.evicted", "a"), ("model.stopping", "a"), ("model.stopped", "a"),
        ("model.loading", "b"), ("model.ready", "b"), ("request", "b")]
    by_type = {(e["type"], e["model"]): e for e in seen[1:]}
    assert by_type[("model.evicted", "a")]["for"] == "b"
    assert by_type[("model.stopped", "a")]["cause"] == "memory"
    assert by_type[("model.ready", "b")]["load_seconds"] > 0
    kinds = [(e["type"], e["model"]) for e in seen[1:]]
    progress = [i for i, kind in enumerate(kinds) if kind == ("model.progress", "a")]
    assert progress and kinds.index(("model.loading", "a")) < progress[0] < kinds.index(("model.ready", "a"))
    assert "listening" in seen[1 + progress[0]]["line"]  # the backend's own output while it loads
    seqs = [e["seq"] for e in seen[1:]]
    assert seqs == sorted(seqs)


async def test_a_consumer_that_never_reads_is_dropped_without_slowing_requests(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}},
                                        metrics={"event_buffer": 10}, server={"send_timeout": 2.0}))
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that stops reading
    host, port = r.url.removeprefix("http://").split(":")
    stalled.connect((host, int(port)))
    stalled.sendall(b"GET /events?requests=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: r.daemon.bus.subscribers == 1)

    with trio.fail_after(120):  # a generous bound: the point is that none of them waits on the reader
        for _ in range(400):  # ~200 kB of events: past what the sockets buffer
            response = await r.http.post("/tokenize", json={"model": "a", "content": "hello there " * 20})
            assert response.status_code == 200
    # Its buffer overflowed (dropped), its connection is cut once a write stalls (send_timeout),
    # and nothing of it is left.
    await wait_for(lambda: r.daemon.bus.subscribers == 0, timeout=30)
    assert value(await scrape(r), "routerd_event_subscribers") == 0

    def read_all() -> bytes:
        stalled.settimeout(30)
        data = b""
        while chunk := stalled.recv(65536):
            data += chunk
        return data
    data = await trio.to_thread.run_sync(read_all)  # what the kernel had buffered, then the end
    stalled.close()
    assert data.startswith(b"HTTP/1.1 200") and b'"type": "request"' in data


async def test_a_dropped_subscriber_that_never_reads_is_cut_after_the_grace(autojump_clock):
    bus = events.Bus(3, drop_grace=5.0)
    with bus.subscribe() as subscription:
        for i in range(4):
            bus.publish("model.progress", "a", line=str(i))
        assert subscription.dropped
        started = trio.current_time()
        with subscription.scope:
            await trio.sleep_forever()  # a consumer stuck on a send that never completes
        assert trio.current_time() - started == pytest.approx(5.0)
        # What it had buffered is still there, the drop notice last.
        got = [event async for event in subscription]
    assert [e.type for e in got] == ["model.progress"] * 3 + ["dropped"]
    bus.publish("model.progress", "a", line="after")  # nobody left: publishing goes on
    assert bus.subscribers == 0


async def test_routerctl_events_shows_a_load_as_it_happens(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    command = [sys.executable, "-m", "routerctl", "--socket", str(tmp_path / "control.sock"), "events"]
    lines: list[str] = []

    async def follow(json_lines: bool) -> None:
        process = await trio.lowlevel.open_process(command + (["--json"] if json_lines else []),
                                                   stdout=subprocess.PIPE, cwd=ROOT)
        try:
            buffered = b""
            async for chunk in process.stdout:
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                lines.extend(line.decode() for line in complete)
        finally:
            process.kill()
            await process.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, False)
        await wait_for(lambda: r.daemon.bus.subscribers == 1)
        assert (await r.http.post("/v1/completions", json={"model": "a", "prompt": "x"})).status_code == 200
        await wait_for(lambda: any("ready in" in line for line in lines))
        nursery.cancel_scope.cancel()
    assert any(" a " in line and line.rstrip().endswith("loading") for line in lines)
    ready = next(line for line in lines if "ready in" in line)
    assert ready.split()[1] == "a"

    lines.clear()
    await wait_for(lambda: r.daemon.bus.subscribers == 0)  # routerctl's hang-up ended its subscription
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, True)
        await wait_for(lambda: r.daemon.bus.subscribers == 1)
        await rpc(str(tmp_path / "control.sock"), {"jsonrpc": "2.0", "id": 1, "method": "unload",
                                                    "params": {"model": "a"}})
        await wait_for(lambda: any('"model.stopped"' in line for line in lines))
        nursery.cancel_scope.cancel()
    stopped = next(json.loads(line) for line in lines if '"model.stopped"' in line)
    assert stopped["model"] == "a" and stopped["cause"] == "operator"


async def test_one_request_log_line_per_request_with_its_key(start_routerd, tmp_path, model_file, caplog):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    key, _ = r.daemon.gate.add("alice")
    caplog.set_level(logging.INFO, logger="routerd.requests")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await r.http.post("/v1/chat/completions", json=chat("a", "one two", 3), headers=headers)).status_code == 200
    assert (await r.http.post("/v1/chat/completions", json=chat("zzz", "x", 1), headers=headers)).status_code == 404
    def logged() -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if rec.name == "routerd.requests"]
    await wait_for(lambda: len(logged()) >= 2)  # written once the answer is out
    # One line per request, not more: a third request's line is the barrier (no fixed sleep).
    assert (await r.http.post("/tokenize", json={"model": "a", "content": "x"}, headers=headers)).status_code == 200
    await wait_for(lambda: any(getattr(rec, requestlog.FIELDS)["route"] == "/tokenize" for rec in logged()))
    records = [rec for rec in logged() if getattr(rec, requestlog.FIELDS)["route"] != "/tokenize"]
    assert len(records) == 2 and len(logged()) == 3
    ok, missing = (getattr(rec, requestlog.FIELDS) for rec in records)
    assert ok["model"] == "a" and ok["status"] == 200 and ok["key"] == "alice" and not ok["cancelled"]
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (2, 3)
    assert ok["duration"] >= ok["ttfb"] >= ok["queue_wait"] >= 0 and ok["bytes_out"] > 0
    assert ok["client"].startswith("127.0.0.1:")
    assert missing["model"] is None and missing["status"] == 404 and missing["error"] == "model_not_found"
    text = records[0].getMessage()
    assert text.startswith("a POST /v1/chat/completions 200 ") and "tokens=2/3" in text and "key=alice" in text

    # The same fields as one JSON object per line under logging.format = "json".
    line = logs.JsonFormatter().format(records[0])
    entry = json.loads(line)
    assert entry["logger"] == "routerd.requests" and entry["level"] == "info" and entry["status"] == 200
    assert entry["message"] == text and entry["key"] == "alice"


async def test_a_cancelled_stream_is_logged_as_cancelled(start_routerd, tmp_path, model_file, caplog):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"),
                                                         "args": ["--fake-token-delay", "0.05"]}}))
    caplog.set_level(logging.INFO, logger="routerd.requests")
    async with r.http.stream("POST", "/v1/chat/completions", json=chat("a", "x", 200, stream=True)) as response:
        async for _ in response.aiter_lines():
            break
    await wait_for(lambda: any(rec.name == "routerd.requests" for rec in caplog.records))
    fields = getattr(next(rec for rec in caplog.records if rec.name == "routerd.requests"), requestlog.FIELDS)
    assert fields["cancelled"] and fields["stream"]
    assert "cancelled" in next(rec for rec in caplog.records if rec.name == "routerd.requests").getMessage()


async def test_loading_feedback_only_when_enabled_and_the_sdk_still_parses_the_stream(start_routerd, tmp_path,
                                                                                     model_file):
    slow = ["--fake-load-seconds", "2.5"]
    r = await start_routerd(make_config(tmp_path, {
        "told": {"path": model_file("told"), "args": slow, "loading_feedback": True},
        "quiet": {"path": model_file("quiet"), "args": slow}}, scheduler={"keepalive_interval": 0.5}))
    sdk = openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stream(model: str) -> tuple[list[str], str]:
        thinking, content = [], []
        for chunk in sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if getattr(delta, "reasoning_content", None):
                thinking.append(delta.reasoning_content)
            content.append(delta.content or "")
        return thinking, "".join(content)

    thinking, content = await trio.to_thread.run_sync(stream, "told")
    assert content == "tok0 tok1 tok2 tok3 "
    assert thinking and any(line.startswith("loading told") for line in thinking)

    # Off (the default): nothing but SSE comments, then exactly what the backend sent.
    async def raw(model: str) -> bytes:
        async with r.http.stream("POST", "/v1/chat/completions", json=chat(model, "hi", 4, stream=True)) as response:
            return b"".join([chunk async for chunk in response.aiter_raw()])
    waited = await raw("quiet")
    assert b"reasoning_content" not in waited and b": waiting for quiet" in waited
    direct = await raw("quiet")  # ready now: no wait, the backend's bytes only
    assert b": waiting" not in direct
    assert b"".join(part for part in waited.split(b"\n\n") if not part.startswith(b":")) == \
        b"".join(part for part in direct.split(b"\n\n"))


async def test_the_request_log_can_be_turned_off(start_routerd, tmp_path, model_file, caplog):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}, logging={"requests": False}))
    caplog.set_level(logging.INFO, logger="routerd.requests")
    assert (await r.http.post("/tokenize", json={"model": "a", "content": "x"})).status_code == 200
    with trio.fail_after(10):  # metrics still count it (once the answer is out)
        while value(await scrape(r), "routerd_requests_total", model="a", route="/tokenize", status="200") != 1:
            await trio.sleep(0.05)
    assert not [rec for rec in caplog.records if rec.name == "routerd.requests"]


def test_the_example_config_documents_the_new_sections():
    example = (ROOT / "config.toml.example").read_text()
    for key in ("[logging]", "[metrics]", "loading_feedback", "event_buffer", "backend_timeout"):
        assert key in example


def test_kv_cache_utilization_from_slots():
    from routerd.ops.metrics import kv_utilization
    slots = [{"n_ctx": 4096, "is_processing": True, "n_prompt_tokens": 1000, "next_token": [{"n_decoded": 24}]},
             {"n_ctx": 4096, "is_processing": False, "n_prompt_tokens": 900},
             {"n_ctx": 4096, "is_processing": True, "n_prompt_tokens": 3000, "next_token": [{"n_decoded": 500}]}]
    assert kv_utilization(slots, 4096) == 1.0  # held cells past the context: capped
    assert kv_utilization(slots[:2], 4096) == pytest.approx(1024 / 4096)
    assert kv_utilization(slots[:2], None) == pytest.approx(1024 / 4096)
    assert kv_utilization([], 4096) is None and kv_utilization({"error": 1}, 4096) is None


def test_token_counts_from_usage_anthropic_responses_and_timings():
    from routerd.front import usage
    assert usage.from_body(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 7}}') == (5, 7)
    assert usage.from_body(b'{"usage": {"input_tokens": 5, "output_tokens": 7}}') == (5, 7)
    assert usage.from_body(b'{"timings": {"prompt_n": 1, "cache_n": 30, "predicted_n": 3}}') == (31, 3)
    assert usage.from_body(b'{"choices": []}') is None and usage.from_body(b"not json {\"usage\"") is None
    tail = (b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
            b'data: {"choices":[],"timings":{"prompt_n":4,"cache_n":0,"predicted_n":9}}\n\ndata: [DONE]\n\n')
    assert usage.from_stream_tail(tail) == (4, 9)
    responses = b'event: response.completed\ndata: {"response": {"usage": {"input_tokens": 2, "output_tokens": 3}}}\n\n'
    assert usage.from_stream_tail(responses) == (2, 3)
