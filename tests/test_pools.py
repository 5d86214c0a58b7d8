"""Beyond one process per model: remote endpoints, replicas, sticky sessions, selectors.

Pure decisions first (balancing, sessions, replica counts, selector strategies, remote model
lists, config rules), then routerd daemons on loopback ports, one the remote of another, with
the fake llama-server behind them.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import httpx
import pytest
import trio

from routerd import config as config_mod
from routerd.backends import endpoints, selectors
from routerd.backends.endpoints import Candidate, SessionMap, choose, replicas_to_start
from routerd.backends.remote import listed_models
from routerd.errors import ConfigError
from routerd.models.catalog import Catalog
from tests.conftest import DEMO_MODELS, make_config, needs_demo_models, record_spawns

# -- balancing -------------------------------------------------------------------------------


def test_the_least_loaded_endpoint_with_a_free_slot_takes_a_request():
    pool = [Candidate("a", 3, True), Candidate("b", 1, True), Candidate("c", 0, False)]
    assert choose(pool) == "b"
    assert choose([Candidate("a", 4, False)]) is None  # all full: the request waits


def test_a_session_stays_on_its_endpoint_within_the_slack_and_moves_beyond_it():
    pool = [Candidate("a", 3, True), Candidate("b", 1, True)]
    assert choose(pool, last="a", slack=2) == "a"
    assert choose(pool, last="a", slack=1) == "b"  # 3 > 1 + 1: saturated beyond the slack
    assert choose([Candidate("a", 0, False), Candidate("b", 5, True)], last="a", slack=9) == "b"  # a is full
    assert choose(pool, last="gone", slack=2) == "b"  # its endpoint left the pool


def test_new_sessions_spread_over_equally_loaded_endpoints():
    pool = [Candidate("a", 0, True), Candidate("b", 0, True)]
    chosen = collections.Counter(choose(pool, session=f"user-{i}") for i in range(100))
    assert set(chosen) == {"a", "b"} and min(chosen.values()) > 30
    assert choose(pool, session="x") == choose(pool, session="x")  # the same session, the same choice
    assert choose(pool) == "a"  # no session: the first


def test_the_session_map_is_bounded_and_forgets_old_sessions():
    sessions = SessionMap(capacity=2, ttl=10)
    sessions.put("m", "s1", "a", now=0)
    sessions.put("m", "s2", "b", now=1)
    assert sessions.get("m", "s1", now=2) == "a"
    sessions.put("m", "s3", "a", now=3)  # over capacity: the least recently used (s1) goes
    assert sessions.get("m", "s1", now=3) is None and len(sessions) == 2
    assert sessions.get("other", "s2", now=3) is None  # sessions are per model
    assert sessions.get("m", "s2", now=12) is None  # unseen for more than ttl
    sessions.put("m", "s4", "b", now=30)
    assert len(sessions) == 1  # expired ones are dropped as new ones come


def test_replicas_start_to_the_kept_count_then_one_at_a_time_while_requests_wait():
    assert replicas_to_start(live=1, starting=0, keep=3, most=3, oldest_wait=0, scale_up_wait=2) == 2
    assert replicas_to_start(live=3, starting=0, keep=3, most=3, oldest_wait=99, scale_up_wait=2) == 0
    auto = {"keep": 1, "most": 4, "scale_up_wait": 2.0}
    assert replicas_to_start(live=1, starting=0, oldest_wait=1.0, **auto) == 0  # not waited long enough
    assert replicas_to_start(live=1, starting=0, oldest_wait=2.5, **auto) == 1
    assert replicas_to_start(live=2, starting=1, oldest_wait=9.0, **auto) == 0  # one is still loading
    assert replicas_to_start(live=4, starting=0, oldest_wait=9.0, **auto) == 0  # at the most


def test_an_idle_extra_replica_is_evicted_before_any_model_s_first():
    from routerd.backends import admission

    residents = [admission.Resident("old", "", False, last_used=1.0, usage={"ram": 100}),
                 admission.Resident("m#2", "", False, last_used=9.0, usage={"ram": 100}, extra=True),
                 admission.Resident("m", "", False, last_used=8.0, usage={"ram": 100})]
    plan = admission.plan_admission(admission.Newcomer("new", "", {"ram": 100}), residents, {"ram": 300})
    assert plan == admission.Admit(evict=("m#2",))


# -- selectors -------------------------------------------------------------------------------


def T(name: str, state: str = "unloaded", outstanding: int = 0, capacity: int = 4, fits: bool = True):
    return selectors.Target(name, state, outstanding, capacity, fits)


def test_warm_prefers_a_loaded_target_with_room_then_one_loading_then_one_that_fits():
    choose_target = selectors.choose_target
    assert choose_target("warm", [T("big"), T("small", "ready")]) == "small"
    assert choose_target("warm", [T("big", "ready", 4), T("small", "starting")]) == "small"  # big is saturated
    assert choose_target("warm", [T("big", "ready", 4), T("small")]) == "small"  # small fits: load it
    assert choose_target("warm", [T("big", "ready", 4), T("small", fits=False)]) == "big"  # no swap: queue
    assert choose_target("warm", [T("big", fits=False), T("small", fits=False)]) == "big"
    assert choose_target("warm", [T("big"), T("small")]) == "big"  # nothing warm: the first that fits


def test_pin_takes_the_first_and_spillover_fills_targets_in_order():
    choose_target = selectors.choose_target
    assert choose_target("pin", [T("a", outstanding=99), T("b", "ready")]) == "a"
    assert choose_target("spillover", [T("a", outstanding=1), T("b")], per_target=2) == "a"
    assert choose_target("spillover", [T("a", outstanding=2), T("b")], per_target=2) == "b"
    assert choose_target("spillover", [T("a", outstanding=3), T("b", outstanding=2)], per_target=2) == "b"


# -- remotes as data ------------------------------------------------------------------------


def test_a_remote_routerd_s_model_list_gives_models_and_queue_depths_without_aliases_or_its_remotes():
    body = (b'{"object": "list", "data": ['
            b'{"id": "m1", "queued": 3, "in_flight": 2}, {"id": "alias1", "alias_of": "m1"},'
            b'{"id": "c/x", "source": "remote:c"}, {"id": "coder", "selector": {}}, {"id": "plain"}]}')
    assert listed_models(body) == (["m1", "plain"], {"m1": 5})
    with pytest.raises(ValueError):
        listed_models(b'{"models": []}')


def test_remote_models_are_prefixed_and_get_the_bare_name_only_when_nobody_else_claims_it(tmp_path):
    data = make_config(tmp_path, {"local": {"path": str(tmp_path / "l.gguf")}},
                       remotes={"b": {"url": "http://127.0.0.1:1"}, "c": {"url": "http://127.0.0.1:2"}},
                       selectors={"coder": {"targets": ["local"]}})
    config = config_mod.from_mapping(data)
    catalog = Catalog.from_config(config, remote_models={"b": ["only-b", "shared", "local", "coder"],
                                                         "c": ["shared"]})
    assert catalog.resolve("only-b").name == "b/only-b"  # the bare name: unclaimed
    assert catalog.resolve("b/shared").remote_model == "shared"
    assert catalog.get("shared") is None  # two remotes have it: neither gets the bare name
    assert catalog.resolve("local").source == "config" and catalog.resolve("b/local").source == "remote:b"
    assert catalog.get("coder") is None  # a selector's name
    assert catalog.resolve("c/shared").available


def test_pool_config_mistakes_are_reported_with_their_paths(tmp_path):
    data = make_config(tmp_path, {"m": {"path": "m.gguf", "replicas": 0, "remotes": ["nowhere"]}},
                       remotes={"bad name": {"url": "gpu2:8082", "api_key_env": "A", "api_key_file": "f"}},
                       selectors={"m": {"targets": [], "strategy": "fastest"}})
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(data)
    text = "\n".join(caught.value.errors)
    for expected in ("models.m.replicas: 0 is not between 1 and 64", "models.m.remotes: 'nowhere' names no",
                     "remotes.bad name: a remote's name", "remotes.bad name.url: 'gpu2:8082' is not a base URL",
                     "remotes.bad name: set api_key_env or api_key_file, not both",
                     "selectors.m: 'm' is already the name", "selectors.m.strategy: 'fastest' is not one of",
                     "selectors.m.targets: name at least one model"):
        assert expected in text
    data = make_config(tmp_path, {"m": {"path": "m.gguf", "replicas": "some"}})
    with pytest.raises(ConfigError, match='models.m.replicas: expected a number of replicas or "auto"'):
        config_mod.from_mapping(data)


# -- daemons ---------------------------------------------------------------------------------

FAST_CHECKS = {"health_interval": 0.3, "connect_timeout": 2.0, "refresh": 1.0}


async def chat(r: Any, model: str, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", {})
    return await r.http.post("/v1/chat/completions", headers=headers,
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}], **kw})


async def eventually(check, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.05)


def listing(response: httpx.Response) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in response.json()["data"]}


async def remote_pair(start_routerd, tmp_path, model_file, *, b_models: dict | None = None,
                      a_models: dict | None = None, remote: dict | None = None, key: str | None = None,
                      **a_sections: Any):
    """Routerd B serving m1 (and ``b_models``) behind a key, and routerd A with B as remote "b"
    (A sends ``key`` when given, B's real key otherwise)."""
    models = {"m1": {"path": model_file("m1")}, **(b_models or {})}
    b = await start_routerd(make_config(tmp_path, models, control={"socket": str(tmp_path / "b.sock")}), name="b")
    secret, _ = b.daemon.gate.add("from-a")
    b.http.headers["authorization"] = f"Bearer {secret}"
    port = int(b.url.rsplit(":", 1)[1])
    settings = {"url": f"http://127.0.0.1:{port}", "api_key_env": "B_KEY", **FAST_CHECKS, **(remote or {})}
    a = await start_routerd(make_config(tmp_path, a_models or {}, remotes={"b": settings}, **a_sections),
                            env={**os.environ, "B_KEY": key or secret}, name="a")
    return a, b, port


async def test_a_remote_s_models_are_discovered_and_relayed_with_its_key(start_routerd, tmp_path, model_file):
    a, b, _ = await remote_pair(start_routerd, tmp_path, model_file)
    models = listing(await a.http.get("/v1/models"))
    assert models["b/m1"]["source"] == "remote:b" and models["b/m1"]["state"] == "reachable"
    assert models["m1"]["alias_of"] == "b/m1"  # the bare name: no local model claims it
    response = await chat(a, "b/m1")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "m1"  # B was asked for its own name, not "b/m1"
    assert response.headers["x-routerd-endpoint"] == "remote:b"
    assert response.headers["x-routerd-model"] == "b/m1"
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with a.http.stream("POST", "/v1/chat/completions", json=body) as stream:
        assert stream.status_code == 200
        text = "".join([chunk async for chunk in stream.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]") and text.count("data: ") == 10
    # B saw A's key (its request log names it) and refuses a request without one.
    assert {e.data["key"] for e in b.daemon.bus.recent_requests()} == {"from-a"}
    async with httpx.AsyncClient(base_url=b.url) as anonymous:
        assert (await anonymous.post("/v1/chat/completions", json=body)).status_code == 401


async def test_a_remote_that_refuses_the_key_is_unreachable_and_says_why(start_routerd, tmp_path, model_file):
    a, _, _ = await remote_pair(start_routerd, tmp_path, model_file, key="not-the-key", remote={"models": ["m1"]})
    models = listing(await a.http.get("/v1/models"))
    assert models["b/m1"]["state"] == "unreachable"
    response = await chat(a, "b/m1")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "remote_unreachable" and "remote 'b'" in error["message"]
    assert "refused routerd's key" in error["message"]


async def test_an_unreadable_remote_key_stops_startup(start_routerd, tmp_path):
    data = make_config(tmp_path, {}, remotes={"b": {"url": "http://127.0.0.1:9", "api_key_env": "NOT_SET"}})
    with pytest.raises(ConfigError, match=r"remotes.b.api_key_env: \$NOT_SET is not set"):
        await start_routerd(data, env={k: v for k, v in os.environ.items() if k != "NOT_SET"})


async def test_a_dead_remote_s_models_go_unreachable_fail_fast_and_come_back(start_routerd, tmp_path, model_file):
    # A connect timeout far above the bound below: an answer that waited for any timeout fails.
    a, b, port = await remote_pair(start_routerd, tmp_path, model_file, remote={"connect_timeout": 60.0})
    assert (await chat(a, "b/m1")).status_code == 200
    b.daemon.request_shutdown()
    await eventually(lambda: _state(a, "b/m1", "unreachable"))
    began = time.monotonic()
    response = await chat(a, "b/m1")
    assert response.status_code == 503 and time.monotonic() - began < 10  # no 60-s connect wait
    assert response.json()["error"]["code"] == "remote_unreachable"
    assert "retry-after" in response.headers
    # B comes back on the same port: A finds it on its own, and its models serve again.
    data = make_config(tmp_path, {"m1": {"path": model_file("m1")}}, control={"socket": str(tmp_path / "b2.sock")})
    data["server"]["port"] = port
    b2 = await start_routerd(data, name="b")  # the same state: the same key
    del b2
    await eventually(lambda: _state(a, "b/m1", "reachable"))
    assert (await chat(a, "b/m1")).status_code == 200


async def _closed(port: int) -> bool:
    try:
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
    except OSError:
        return True
    return False


async def _no_open_connection_served_on(port: int) -> bool:
    """Whether no TCP connection accepted on ``port`` (127.0.0.1) is still established on the
    server's side (Linux's /proc/net/tcp: local address, remote address, state 01 = ESTABLISHED)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return not any(int(row[1].split(":")[1], 16) == port and row[3] == "01" for row in rows)


async def _state(r: Any, model: str, state: str) -> bool:
    return listing(await r.http.get("/v1/models")).get(model, {}).get("state") == state


async def test_a_request_that_cannot_reach_a_remote_is_sent_to_another_endpoint(start_routerd, tmp_path, model_file):
    # m1 is served locally (loading for 2 s) and by B; B dies unnoticed (checks every 60 s).
    a, b, port = await remote_pair(
        start_routerd, tmp_path, model_file, remote={"health_interval": 60.0},
        a_models={"m1": {"path": model_file("local-m1"), "args": ["--fake-load-seconds", "2"], "remotes": ["b"]}})
    b.daemon.request_shutdown()
    await eventually(lambda: _closed(port))
    await eventually(lambda: _no_open_connection_served_on(port))  # B ends its open ones within 1 s of grace
    response = await chat(a, "m1")  # B looks reachable: tried first, not delivered, then the local one
    assert response.status_code == 200, response.text
    assert response.headers["x-routerd-endpoint"] == "m1"
    assert listing(await a.http.get("/v1/models"))["b/m1"]["state"] == "unreachable"


async def test_a_remote_routerd_s_queue_counts_when_balancing(start_routerd, tmp_path, model_file):
    # m1 is local (1 slot per request: fast) and on B, where 3 slow requests are queued.
    a, b, _ = await remote_pair(
        start_routerd, tmp_path, model_file,
        b_models={"m1": {"path": model_file("m1"), "args": ["--parallel", "1", "--fake-token-delay", "0.3"]}},
        a_models={"m1": {"path": model_file("local-m1"), "remotes": ["b"]}})
    await a.supervisor.load("m1")
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(chat, b, "m1")
        await eventually(lambda: _remote_queued(a, 2))
        served = collections.Counter()
        for _ in range(4):
            served[(await chat(a, "m1")).headers["x-routerd-endpoint"]] += 1
        assert served == {"m1": 4}  # B holds more: none of ours is sent there
    await eventually(lambda: _remote_queued(a, 0))


async def _remote_queued(a: Any, at_least: int) -> bool:
    remote = a.supervisor.remotes.get("b")
    held = remote.queued.get("m1", 0)
    return held >= at_least if at_least else held == 0


def slow(tokens: int, delay: float, parallel: int) -> list[str]:
    return ["--parallel", str(parallel), "--fake-tokens", str(tokens), "--fake-token-delay", str(delay)]


async def timed_burst(r: Any, model: str, count: int, **kw: Any) -> tuple[float, collections.Counter]:
    served: collections.Counter = collections.Counter()

    async def one(i: int) -> None:
        response = await chat(r, model, **kw)
        assert response.status_code == 200, response.text
        served[response.headers["x-routerd-endpoint"]] += 1

    began = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return time.monotonic() - began, served


async def test_two_replicas_serve_a_burst_in_about_half_the_time_of_one(start_routerd, tmp_path, model_file):
    args = slow(tokens=6, delay=0.05, parallel=2)
    r = await start_routerd(make_config(tmp_path, {"one": {"path": model_file("m"), "args": args},
                                                   "two": {"path": model_file("m"), "args": args, "replicas": 2}}))
    for model in ("one", "two"):  # warm: loading is not what is measured
        assert (await chat(r, model)).status_code == 200
    await eventually(lambda: _ready_replicas(r, "two", 2))
    one_time, one_served = await timed_burst(r, "one", 32)
    two_time, two_served = await timed_burst(r, "two", 32)
    print(f"\n32 requests: 1 replica {one_time:.2f} s, 2 replicas {two_time:.2f} s "
          f"(ratio {two_time / one_time:.2f}); served {dict(two_served)}")
    assert set(two_served) == {"two", "two#2"} and min(two_served.values()) >= 12
    assert two_time < 0.7 * one_time
    status = await r.http.get("/v1/models/two")
    assert [e["endpoint"] for e in status.json()["endpoints"]] == ["two", "two#2"]


async def _ready_replicas(r: Any, model: str, count: int) -> bool:
    shown = (await r.http.get(f"/v1/models/{model}")).json()["endpoints"]
    return sum(e["state"] == "ready" for e in shown) == count


async def test_sessions_stick_to_one_replica(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"m": {"path": model_file("m"), "replicas": 2,
                                                         "args": slow(tokens=3, delay=0.01, parallel=4)}}))
    assert (await chat(r, "m")).status_code == 200
    await eventually(lambda: _ready_replicas(r, "m", 2))
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    async def conversation(n: int) -> None:
        for _turn in range(10):  # 20 sessions x 10 turns; half by header, half by the body's user
            if n % 2:
                response = await chat(r, "m", headers={"x-session-id": f"s{n}"})
            else:
                response = await chat(r, "m", user=f"s{n}")
            assert response.status_code == 200
            seen[f"s{n}"][response.headers["x-routerd-endpoint"]] += 1

    async with trio.open_nursery() as nursery:  # 4 at a time: nobody is saturated
        limiter = trio.CapacityLimiter(4)
        for n in range(20):
            async def limited(n: int = n) -> None:
                async with limiter:
                    await conversation(n)
            nursery.start_soon(limited)
    share = sum(max(c.values()) for c in seen.values()) / 200
    print(f"\nsticky share {share:.1%}; sessions per endpoint "
          f"{collections.Counter(c.most_common(1)[0][0] for c in seen.values())}")
    assert share >= 0.95
    assert {c.most_common(1)[0][0] for c in seen.values()} == {"m", "m#2"}  # sessions divide over both


async def test_auto_replicas_scale_up_while_requests_wait_and_the_extra_goes_when_idle(start_routerd, tmp_path,
                                                                                        model_file):
    r = await start_routerd(make_config(
        tmp_path, {"m": {"path": model_file("m"), "replicas": "auto", "max_replicas": 2,
                         "args": slow(tokens=10, delay=0.1, parallel=1)}},
        scheduler={"scale_up_wait": 0.5, "scale_down_idle": 1.0}))
    spawned = record_spawns(r.supervisor)
    elapsed, served = await timed_burst(r, "m", 8)
    assert spawned == ["m", "m"] and set(served) == {"m", "m#2"}, (spawned, served)
    await eventually(lambda: _endpoints_are(r, "m", ["m"]), timeout=10)  # m#2 stopped after 1 s idle


async def _endpoints_are(r: Any, model: str, wanted: list[str]) -> bool:
    return [e["endpoint"] for e in (await r.http.get(f"/v1/models/{model}")).json()["endpoints"]] == wanted


async def test_warm_selector_uses_the_loaded_target_and_never_swaps(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"big": {"path": model_file("big")}, "small": {"path": model_file("small")}},
        selectors={"coder": {"targets": ["big", "small"], "strategy": "warm"}}))
    models = listing(await r.http.get("/v1/models"))
    assert models["coder"]["selector"] == {"strategy": "warm", "targets": ["big", "small"], "per_target": 4}
    await r.supervisor.load("small")
    spawned = record_spawns(r.supervisor)
    for _ in range(5):
        response = await chat(r, "coder")
        assert response.status_code == 200 and response.headers["x-routerd-model"] == "small"
    assert spawned == []  # big was never started
    async def all_five_logged() -> bool:  # a request's record is published after its response
        return len(r.daemon.bus.recent_requests()) >= 5
    await eventually(all_five_logged)
    logged = [e.data for e in r.daemon.bus.recent_requests()][-5:]
    assert len(logged) == 5 and all(d["selector"] == "coder" for d in logged)
    r.supervisor.unload("small")
    await eventually(lambda: _state(r, "small", "unloaded"))
    response = await chat(r, "coder")  # nothing warm: the first target that fits
    assert response.headers["x-routerd-model"] == "big" and spawned == ["big"]


async def test_spillover_opens_the_second_target_only_past_per_target(start_routerd, tmp_path, model_file):
    args = slow(tokens=5, delay=0.1, parallel=4)
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": args}, "b": {"path": model_file("b"), "args": args}},
        selectors={"pool": {"targets": ["a", "b"], "strategy": "spillover", "per_target": 2}}))
    spawned = record_spawns(r.supervisor)
    _, served = await timed_burst(r, "pool", 2)
    assert spawned == ["a"] and served == {"a": 2}
    models: collections.Counter = collections.Counter()

    async def one() -> None:
        models[(await chat(r, "pool")).headers["x-routerd-model"]] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
            await trio.sleep(0.05)  # in order: the choice sees the ones before
    assert models == {"a": 2, "b": 2} and spawned == ["a", "b"]


async def test_reload_adds_and_removes_remotes_and_replicas_without_dropping_requests(start_routerd, tmp_path,
                                                                                       model_file):
    a, b, port = await remote_pair(start_routerd, tmp_path, model_file,
                                   b_models={"m1": {"path": model_file("m1"), "args": slow(20, 0.1, 4)}},
                                   a_models={"m": {"path": model_file("m"), "args": slow(20, 0.1, 4)}})
    data = make_config(tmp_path, {"m": {"path": model_file("m"), "args": slow(20, 0.1, 4), "replicas": 2}})
    results: list[int] = []

    async def one(model: str) -> None:
        results.append((await chat(a, model)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "m")
        nursery.start_soon(one, "b/m1")

        async def both_in_flight() -> bool:  # each takes 2 s; reloading while both run is the point
            local, far = a.supervisor.running("m"), b.supervisor.running("m1")
            return bool(local and local.in_flight and far and far.in_flight)
        await eventually(both_in_flight)
        a.write_config(data)  # b is gone, m gets a second replica
        result = await a.daemon.catalog_service.reload()
        assert result.remotes["removed"] == ["b"] and "b/m1" in result.removed
    assert results == [200, 200]
    assert "b/m1" not in listing(await a.http.get("/v1/models"))
    assert (await chat(a, "m")).status_code == 200
    await eventually(lambda: _ready_replicas(a, "m", 2))
    remote = {"url": f"http://127.0.0.1:{port}", "api_key_env": "B_KEY", **FAST_CHECKS}
    a.write_config(data | {"remotes": {"b": remote}}
                   | {"models": {"m": {"path": model_file("m"), "args": slow(20, 0.1, 4)}}})
    result = await a.daemon.catalog_service.reload()
    assert result.remotes["added"] == ["b"] and result.stopped == ["m#2"] and result.kept == ["m"]
    await eventually(lambda: _state(a, "b/m1", "reachable"))
    assert (await chat(a, "b/m1")).status_code == 200


async def test_routerctl_status_shows_pools_remotes_and_selectors(start_routerd, tmp_path, model_file, capsys):
    from routerctl.cli import main as routerctl

    a, _, _ = await remote_pair(start_routerd, tmp_path, model_file,
                                a_models={"m": {"path": model_file("m"), "replicas": 2, "remotes": ["b/m1"]}},
                                selectors={"any": {"targets": ["m", "b/m1"], "strategy": "spillover"}})
    assert (await chat(a, "m")).status_code == 200
    await eventually(lambda: _ready_replicas(a, "m", 2))
    socket = a.daemon.socket_path
    code = await trio.to_thread.run_sync(routerctl, ["--socket", socket, "status"])
    out = capsys.readouterr().out
    assert code == 0
    pool_lines = [line.split() for line in out.splitlines() if line.startswith("m ")]
    assert [line[1] for line in pool_lines[-3:]] == ["m", "m#2", "remote:b"], out
    assert "REMOTE" in out and "reachable" in out and "SELECTOR" in out and "spillover" in out


def test_the_endpoint_protocol_is_what_both_kinds_provide():
    from routerd.backends.backend import Backend
    from routerd.backends.remote import Remote

    wanted = {"key", "label", "in_flight", "upstream", "accepting", "slots", "acquire", "release", "distrust",
              "failure_reason"}
    assert wanted <= set(endpoints.Endpoint.__annotations__) | set(dir(endpoints.Endpoint))
    assert {"accepting", "slots", "acquire", "release", "distrust", "failure_reason"} <= set(dir(Backend))
    assert {"accepting", "slots", "acquire", "release", "distrust", "failure_reason"} <= set(dir(Remote))


@needs_demo_models
async def test_replicas_spread_over_gpus(start_routerd, tmp_path):
    from tests.conftest import FakeGpus
    from tests.test_serving import _cuda_visible_devices

    # The fake server never reads the file; routerd reads its GGUF header to estimate it on a GPU.
    smollm2 = str(DEMO_MODELS["smollm2-135m"])
    gpus = FakeGpus((0, "fake A", 8 << 30, 8 << 30), (1, "fake B", 8 << 30, 8 << 30))
    r = await start_routerd(make_config(tmp_path, {"m": {"path": smollm2, "replicas": 2}},
                                        memory={"gpu_reserve": "0"}), gpus=gpus)
    assert (await chat(r, "m")).status_code == 200
    await eventually(lambda: _ready_replicas(r, "m", 2))
    pids = [e["pid"] for e in (await r.http.get("/v1/models/m")).json()["endpoints"]]
    assert sorted(_cuda_visible_devices(pid) for pid in pids) == ["0", "1"]  # both fit on either: one each


async def test_a_rescan_reads_a_remote_s_model_list_again_at_once(start_routerd, tmp_path, model_file):
    from routerctl.cli import main as routerctl

    a, b, _ = await remote_pair(start_routerd, tmp_path, model_file, remote={"refresh": 3600.0})
    assert "b/m2" not in listing(await a.http.get("/v1/models"))
    b.write_config(make_config(tmp_path, {"m1": {"path": model_file("m1")}, "m2": {"path": model_file("m2")}},
                               control={"socket": str(tmp_path / "b.sock")}))
    await b.daemon.catalog_service.reload()
    assert await trio.to_thread.run_sync(routerctl, ["--socket", a.daemon.socket_path, "rescan"]) == 0
    await eventually(lambda: _state(a, "b/m2", "reachable"), timeout=5)  # not an hour later
