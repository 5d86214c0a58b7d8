"""The metrics with real llama-servers, and the Grafana dashboard's every query against a real
Prometheus scraping routerd (Debian's `prometheus`; .ci/run installs it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import ROOT, needs_real_llama
from tests.test_observability import scrape, value
from tests.test_real_llama import real_config

pytestmark = [pytest.mark.real, needs_real_llama]
DASHBOARD = ROOT / "packaging" / "grafana" / "routerd.json"
PROMETHEUS = shutil.which("prometheus")
#: What Grafana puts in for the dashboard's variables when every model is selected.
VARIABLES = {"$model": ".*", "$__rate_interval": "1m"}


def tight_config(tmp_path: Path) -> dict:
    """Both demo models in a RAM budget that fits one (each load evicts the other), and a model
    whose file is not a GGUF (its llama-server fails to load)."""
    data = real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}})
    data["memory"] = {"ram_total": "450MiB", "ram_reserve": "0"}
    junk = tmp_path / "broken.gguf"
    junk.write_bytes(b"this is not a GGUF file" * 100)
    data["models"]["broken"] = {"path": str(junk)}
    data["scheduler"] = {"restart_backoff": 0.1}
    return data


async def traffic(r, rounds: int) -> dict[str, list[int]]:
    """Chats on both models in turn (streamed and whole), a failing model and an unknown one.
    Returns the (prompt, completion) usage the answers reported, per model."""
    reported: dict[str, list[int]] = {"smollm2-135m": [0, 0], "gemma3-270m": [0, 0]}
    for i in range(rounds):
        for model in ("smollm2-135m", "gemma3-270m"):
            body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
            if i % 2:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
                async with r.http.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
                usage = [json.loads(line[6:]).get("usage") for line in lines]
                usage = next(u for u in reversed(usage) if u)
            else:
                response = await r.http.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                usage = response.json()["usage"]
            reported[model][0] += usage["prompt_tokens"]
            reported[model][1] += usage["completion_tokens"]
        assert (await r.http.post("/v1/completions", json={"model": "broken", "prompt": "x"})).status_code == 503
        assert (await r.http.post("/v1/completions", json={"model": f"nope-{i}", "prompt": "x"})).status_code == 404
    return reported


async def test_metrics_count_real_tokens_loads_evictions_and_the_llama_servers_own(start_routerd, tmp_path):
    r = await start_routerd(tight_config(tmp_path))
    reported = await traffic(r, 2)
    samples = await scrape(r)
    for model, (prompt, completion) in reported.items():
        assert value(samples, "routerd_prompt_tokens_total", model=model) == prompt
        assert value(samples, "routerd_completion_tokens_total", model=model) == completion
        assert value(samples, "routerd_loads_total", model=model, outcome="ready") == 2
    # Each load of one evicted the other: smollm2 twice, gemma once (it is loaded now).
    assert value(samples, "routerd_evictions_total", model="smollm2-135m", cause="memory") == 2
    assert value(samples, "routerd_evictions_total", model="gemma3-270m", cause="memory") == 1
    assert value(samples, "routerd_backend_failures_total", model="broken") >= 2
    # The loaded llama-server's own metrics, with routerd's model label; the evicted one's are gone.
    assert value(samples, "llamacpp:tokens_predicted_total", model="gemma3-270m") > 0
    assert value(samples, "llamacpp:tokens_predicted_total", model="smollm2-135m") is None
    assert value(samples, "routerd_model_memory_measured_bytes", model="gemma3-270m", device="ram") > 100e6
    assert value(samples, "routerd_model_memory_estimate_bytes", model="smollm2-135m", device="ram") > 50e6
    assert value(samples, "routerd_device_memory_budget_bytes", device="ram") == 450 * 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, replacement in VARIABLES.items():
                expr = expr.replace(name, replacement)
            queries.append((panel["title"], expr))
    return queries


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary: install Debian's `prometheus` "
                                               "package (.ci/run does) to check the dashboard's queries")
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(start_routerd, tmp_path):
    r = await start_routerd(tight_config(tmp_path))
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: routerd\n    static_configs:\n"
        f"      - targets: ['{r.url.removeprefix('http://')}']\n")
    log = open(tmp_path / "prometheus.log", "w")
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            with trio.fail_after(60):
                while True:
                    try:
                        if (await api.get("/-/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.2)
            started = time.monotonic()
            await traffic(r, 3)
            await trio.sleep(max(0.0, 8 - (time.monotonic() - started)) + 3)  # a few scrapes after the last
            targets = (await api.get("/api/v1/targets")).json()["data"]["activeTargets"]
            assert [t["health"] for t in targets] == ["up"], targets
            empty = []
            for title, expr in panel_queries():
                result = (await api.get("/api/v1/query", params={"query": expr})).json()
                assert result["status"] == "success", (title, expr, result)
                if not result["data"]["result"]:
                    empty.append(f"{title}: {expr}")
            assert not empty, "panels with no data:\n" + "\n".join(empty)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()
