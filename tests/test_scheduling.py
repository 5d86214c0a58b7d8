"""Scheduling and self-healing with the fake llama-server: queues, priorities, aging, 429/503,
fair turns between models, health checks, restart backoff, the crash-loop breaker, keep-alives
for waiting streams, preload."""

from __future__ import annotations

import json
import logging
import random

import httpx
import trio
import trio.testing

from routerd.backends import backend, child, scheduler
from routerd.events import EventType
from tests.conftest import make_config, record_spawns
from tests.test_control import call, rpc

COMPLETIONS = "/v1/completions"


def one_slot(model_file, name: str = "a", *extra: str) -> dict:
    return {"path": model_file(name), "args": ["--parallel", "1", "--fake-token-delay", "0.05", *extra]}


async def post(r, model: str, priority: str | None = None, **body):
    headers = {scheduler.PRIORITY_HEADER: priority} if priority else {}
    return await r.http.post(COMPLETIONS, json={"model": model, "prompt": "hi", **body}, headers=headers)


async def wait_queued(r, model: str, n: int) -> None:
    with trio.fail_after(10):
        while r.supervisor.queued(model) != n:
            await r.supervisor.wait_changed()


async def wait_in_flight(r, model: str) -> None:
    """Until ``model`` is running a request (its only slot is taken)."""
    with trio.fail_after(10):
        while not (r.supervisor.running(model) and r.supervisor.running(model).in_flight):
            await r.supervisor.wait_changed()


# -- pure policy ----------------------------------------------------------------------------
def test_pick_next_orders_by_priority_then_arrival_and_ages_waiters():
    low = scheduler.Ticket(priority=2, enqueued=0.0, seq=0, deadline=99)
    normal = scheduler.Ticket(priority=1, enqueued=1.0, seq=1, deadline=99)
    high = scheduler.Ticket(priority=0, enqueued=2.0, seq=2, deadline=99)
    high2 = scheduler.Ticket(priority=0, enqueued=2.5, seq=3, deadline=99)
    assert scheduler.pick_next([low, normal, high2, high], now=3.0, aging=10) is high
    # waiting 25 s lifted the low request two levels: it goes before a high one that just arrived
    fresh_high = scheduler.Ticket(priority=0, enqueued=24.0, seq=9, deadline=99)
    assert scheduler.pick_next([fresh_high, low], now=25.0, aging=10) is low


def test_failure_history_backs_off_exponentially_and_breaks_a_crash_loop():
    history = scheduler.FailureHistory()
    assert history.next_start(1.0, 60.0) == -float("inf")
    for t in (0.0, 10.0, 20.0):
        history.record(t, "exited with status 1", 1, "tail")
    assert history.next_start(1.0, 60.0) == 20.0 + 4.0
    assert history.broken(now=25.0, failures=3, window=300) and not history.broken(now=400.0, failures=3, window=300)
    for t in (30.0, 40.0, 50.0, 60.0, 70.0, 80.0):
        history.record(t, "exited with status 1", 1, "tail")
    assert history.next_start(1.0, 60.0) == 80.0 + 60.0  # 2^8 s, held at the ceiling
    history.loaded()  # ready again: the next failure backs off from the start
    history.record(90.0, "exited with status 1", 1, "tail")
    assert history.next_start(1.0, 60.0) == 90.0 + 1.0


# -- queues ---------------------------------------------------------------------------------
async def test_priority_order_with_fifo_within_a_priority(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": one_slot(model_file)}, scheduler={"aging": 100.0}))
    done: list[str] = []

    async def request(label: str, priority: str | None, tokens: int = 2) -> None:
        response = await post(r, "a", priority, max_tokens=tokens)
        assert response.status_code == 200
        done.append(label)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "busy", None, 20)  # holds the only slot for ~1 s
        await wait_queued(r, "a", 0)
        await wait_in_flight(r, "a")
        for n, (label, priority) in enumerate([("low", "low"), ("normal-1", None), ("high", "high"),
                                               ("normal-2", "normal")]):
            nursery.start_soon(request, label, priority)
            await wait_queued(r, "a", n + 1)
    assert done == ["busy", "high", "normal-1", "normal-2", "low"]


async def test_a_queue_ages_its_waiters_on_trio_s_clock(autojump_clock):
    """ModelQueue in-process on MockClock: a low request is lifted one level per ``aging``
    seconds waited, so after two steps it is served before a high one that came later (a tie
    on level goes to the first come), and not a moment before."""
    queue = scheduler.ModelQueue("a", limit=10, aging=0.25)
    low = queue.enter(scheduler.parse_priority("low"), 60.0)
    await trio.sleep(0.49)  # one step: low counts as normal now, still behind high
    early_high = queue.enter(scheduler.parse_priority("high"), 60.0)
    assert queue.is_next(early_high) and queue.ahead_of(low) == 1
    queue.leave(early_high)
    await trio.sleep(0.01)  # 0.5 s waited: two steps, as high as high, and it came first
    late_high = queue.enter(scheduler.parse_priority("high"), 60.0)
    assert queue.is_next(low) and queue.ahead_of(late_high) == 1 and queue.ahead_of(low) == 0
    # Its turn is given to the waiter woken for it: a freed slot wakes the aged low request.
    woken: list[str] = []

    async def wait_turn(label: str, ticket: scheduler.Ticket) -> None:
        await queue.changed(ticket)
        woken.append(label)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_turn, "high", late_high)
        nursery.start_soon(wait_turn, "low", low)
        await trio.testing.wait_all_tasks_blocked()
        queue.wake()
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["low"]
        nursery.cancel_scope.cancel()


async def test_aging_lifts_a_waiting_low_request_above_newer_high_ones(start_routerd, tmp_path, model_file):
    """Through the daemon: ``scheduler.aging`` reaches the queue, and the proxy serves in the
    queue's order (the aging itself is timed on MockClock above)."""
    r = await start_routerd(make_config(tmp_path, {"a": one_slot(model_file)}, scheduler={"aging": 0.2}))
    done: list[str] = []

    async def request(label: str, priority: str, tokens: int = 2) -> None:
        assert (await post(r, "a", priority, max_tokens=tokens)).status_code == 200
        done.append(label)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "busy", "normal", 20)
        await wait_in_flight(r, "a")
        nursery.start_soon(request, "old-low", "low")
        await wait_queued(r, "a", 1)
        queue = r.supervisor.queues.queue("a")
        assert queue.aging == 0.2
        (low,) = queue.tickets
        await trio.sleep_until(low.enqueued + 3 * queue.aging)  # three aging steps: low is now above high
        nursery.start_soon(request, "new-high", "high")
        await wait_queued(r, "a", 2)
    assert done == ["busy", "old-low", "new-high"]


async def test_unknown_priority_is_a_400(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    response = await post(r, "a", "urgent")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_priority" and "urgent" in response.json()["error"]["message"]


async def test_full_queue_is_429_and_a_long_wait_is_503_both_with_retry_after(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": one_slot(model_file)},
                                        scheduler={"max_queue": 1, "max_queue_wait": 0.6}))
    assert (await post(r, "a")).status_code == 200  # loaded
    results = {}

    async def request(label: str, tokens: int) -> None:
        results[label] = await post(r, "a", max_tokens=tokens)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "busy", 40)  # ~2 s on the only slot
        await wait_in_flight(r, "a")
        nursery.start_soon(request, "queued", 1)
        await wait_queued(r, "a", 1)
        nursery.start_soon(request, "over", 1)
    assert results["busy"].status_code == 200
    over, queued = results["over"], results["queued"]
    assert (over.status_code == 429 and over.json()["error"]["code"] == "queue_full"
            and int(over.headers["retry-after"]) >= 1)
    assert queued.status_code == 503 and queued.json()["error"]["code"] == "queue_timeout"
    assert int(queued.headers["retry-after"]) >= 1 and r.supervisor.queued("a") == 0


async def test_a_queued_client_that_disconnects_leaves_the_queue_at_once(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": one_slot(model_file)}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: post(r, "a", None, max_tokens=60))  # ~3 s on the only slot
        await wait_in_flight(r, "a")
        async with httpx.AsyncClient(base_url=r.url, timeout=0.3) as impatient:
            try:
                await impatient.post(COMPLETIONS, json={"model": "a", "prompt": "hi"})
            except httpx.ReadTimeout:
                pass
        with trio.fail_after(1):  # well before the slot frees up
            while r.supervisor.queued("a"):
                await r.supervisor.wait_changed()
        assert r.supervisor.running("a").in_flight == 1


# -- fair turns -----------------------------------------------------------------------------
async def test_mixed_stream_over_three_models_with_room_for_one_is_fair_without_thrashing(
        start_routerd, tmp_path, model_file):
    turn, rate, count = 1.0, 40.0, 160
    models = {name: {"path": model_file(name), "args": ["--fake-load-seconds", "0.2", "--fake-token-delay", "0.01"]}
              for name in ("a", "b", "c")}
    r = await start_routerd(make_config(tmp_path, models, backend={"max_loaded_models": 1},
                                        scheduler={"max_turn_wait": turn}))
    spawned = record_spawns(r.supervisor)
    rng = random.Random(7)
    waits: list[float] = []
    statuses: list[int] = []
    sequence = [rng.choice("abc") for _ in range(count)]

    async def request(model: str) -> None:
        start = trio.current_time()
        response = await post(r, model, max_tokens=4)
        statuses.append(response.status_code)
        waits.append(trio.current_time() - start)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for model in sequence:  # an open stream: arrivals do not wait for answers
            nursery.start_soon(request, model)
            await trio.sleep(rng.expovariate(rate))
    elapsed = trio.current_time() - start
    swaps = len(spawned) - 1
    naive = sum(1 for x, y in zip(sequence, sequence[1:], strict=False) if x != y)  # a load per change of model
    print(f"\n{count} requests over a/b/c at {rate:g}/s, one resident: {swaps} swaps (a swap per model change "
          f"would be {naive}) in {elapsed:.1f} s; worst wait {max(waits):.2f} s, "
          f"median {sorted(waits)[len(waits) // 2]:.2f} s")
    assert statuses == [200] * count
    assert swaps <= naive / 4
    # each model waits at most for the two others' turns, each a turn plus a drain and a load
    assert max(waits) <= 2 * (turn + 1.5) + 1.0


# -- self-healing ---------------------------------------------------------------------------
async def test_a_hung_backend_is_detected_killed_and_replaced(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-hang-after", "0.5"]}},
        scheduler={"health_interval": 0.2, "health_timeout": 0.2, "health_failures": 2, "restart_backoff": 0.05}))
    assert (await post(r, "a")).status_code == 200
    hung = r.supervisor.running("a")
    with trio.fail_after(5):
        await hung.wait_gone()
    assert "stopped answering /health" in hung.error
    status = (await rpc(r.daemon.socket_path, call("status", {"model": "a"})))[0]["result"]["model"]
    assert "stopped answering /health" in status["last_error"]
    assert (await post(r, "a")).status_code == 200 and r.supervisor.running("a").pid != hung.pid


async def test_crash_loop_marks_the_model_failed_until_reset(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-exit-during-load", "3"]}},
        scheduler={"crash_loop_failures": 3, "crash_loop_window": 60, "restart_backoff": 0.05}))
    spawned = record_spawns(r.supervisor)
    for _ in range(3):
        response = await post(r, "a")
        assert response.status_code == 503 and response.json()["error"]["code"] == "backend_start_failed"
    with trio.fail_after(0.5):  # refused at once, no fourth spawn
        broken = await post(r, "a")
    error = broken.json()["error"]
    assert broken.status_code == 503 and error["code"] == "model_failed" and error["exit_code"] == 3
    assert "routerctl reset a" in error["message"] and "failing on purpose" in error["log_tail"]
    assert len(spawned) == 3 and r.supervisor.state_of("a") == "failed"
    assert (await rpc(r.daemon.socket_path, call("reset", {"model": "a"})))[0]["result"]["had_failures"]
    again = await post(r, "a")
    assert again.json()["error"]["code"] == "backend_start_failed" and len(spawned) == 4  # it was tried again


async def test_a_failed_model_waits_at_least_the_doubling_restart_backoff_before_each_restart(
        start_routerd, tmp_path, model_file, monkeypatch):
    """Lower bounds only, in real time through the whole daemon: each restart is spawned at least
    the backoff, doubled per failure, after the failure before it (how long a slow machine takes
    on top is not asserted). The exact schedule, doubling up to restart_backoff_max and reset by
    a success, is tested on MockClock in tests/test_timers.py."""
    spawned_at: list[float] = []
    failed_at: list[float] = []

    def timed_spawn(*args, **kwargs):
        spawned_at.append(trio.current_time())
        return child.spawn(*args, **kwargs)
    monkeypatch.setattr(backend, "spawn", timed_spawn)
    r = await start_routerd(make_config(
        tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-exit-during-load", "1"]}},
        scheduler={"crash_loop_failures": 10, "restart_backoff": 0.4}))
    # Published as the failure is recorded, before the backoff is counted from it: between
    # spawns, the load's own time (~0.5 s here) would hide a backoff that did not double.
    r.supervisor.bus.listen(lambda event: failed_at.append(trio.current_time())
                            if event.type is EventType.MODEL_FAILED else None)
    for _ in range(3):
        assert (await post(r, "a")).status_code == 503
    waits = [spawned - failed for failed, spawned in zip(failed_at, spawned_at[1:], strict=False)]
    assert len(spawned_at) == 3 and len(failed_at) == 3
    assert waits[0] >= 0.4 and waits[1] >= 0.8, waits


# -- waiting streams, preload ---------------------------------------------------------------
async def test_a_stream_waiting_for_its_model_gets_keepalive_comments(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"slow": {"path": model_file("slow"), "args": ["--fake-load-seconds", "1.0"]},
                   "broken": {"path": model_file("broken"), "args": ["--fake-load-seconds", "0.5",
                                                                     "--fake-exit-during-load", "1"]}},
        scheduler={"keepalive_interval": 0.2}))
    async with r.http.stream("POST", "/v1/chat/completions", json={
            "model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    comments = [line for line in lines if line.startswith(":")]
    assert len(comments) >= 3 and lines.index(comments[-1]) < lines.index(
        next(line for line in lines if line.startswith("data: {")))
    assert lines[-1] == "data: [DONE]"
    # a load that fails after the stream started: the error arrives in-band
    async with r.http.stream("POST", "/v1/chat/completions", json={
            "model": "broken", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
        lines = [line async for line in response.aiter_lines() if line]
    import json
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "backend_start_failed" and error["exit_code"] == 1


async def test_preload_starts_models_after_ready_in_order(start_routerd, tmp_path, model_file, caplog):
    caplog.set_level(logging.WARNING, logger="routerd")
    models = {name: {"path": model_file(name), "args": ["--fake-load-seconds", "0.5"]} for name in ("a", "b", "c")}
    r = await start_routerd(make_config(tmp_path, models, backend={"max_loaded_models": 2},
                                        scheduler={"preload": ["b", "*"]}))
    spawned = record_spawns(r.supervisor)
    # routerd answers at once; the preloads load behind it
    assert (await r.http.get("/health")).json()["ready"] == 0
    with trio.fail_after(10):
        while r.supervisor.counts()["ready"] < 2 or r.supervisor.counts()["starting"]:
            await r.supervisor.wait_changed()
    with trio.fail_after(10):  # the preload's last decision: c is not started (no eviction to preload)
        while not any("preload: skipping c" in rec.getMessage() for rec in caplog.records):
            await trio.sleep(0.02)
    # b first, then the rest in catalog order, skipping what would need an eviction
    assert spawned == ["b", "a"]
    assert [n for n in ("a", "b", "c") if r.supervisor.running(n)] == ["a", "b"]


async def test_reset_of_a_model_that_never_failed_says_so(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    assert (await post(r, "a")).status_code == 200
    result = (await rpc(r.daemon.socket_path, call("reset", {"model": "a"})))[0]["result"]
    assert result == {"model": "a", "had_failures": False, "state": "ready"}


async def test_a_waiting_stream_answered_without_a_stream_gets_that_answer_as_an_event(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(
        tmp_path, {"slow": {"path": model_file("slow"), "args": ["--fake-load-seconds", "1.0"]}},
        scheduler={"keepalive_interval": 0.2}))
    # the fake llama-server has no rerank route: it answers 404 JSON, not an event stream
    async with r.http.stream("POST", "/v1/rerank", json={"model": "slow", "stream": True, "query": "q"}) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[0].startswith(":") and lines[-1].startswith("data: ")
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == 404


async def test_a_change_wakes_only_the_waiter_whose_turn_it_is():
    """With many requests queued, a freed slot wakes the next one, not all of them: waking every
    waiter on each change cost O(queue) per request and made a long queue slow to drain."""
    queue = scheduler.ModelQueue("a", limit=100, aging=100.0)
    tickets = [queue.enter(scheduler.parse_priority(None), 60.0) for _ in range(50)]
    woken: list[int] = []

    async def wait_turn(i: int) -> None:
        await queue.changed(tickets[i])
        woken.append(i)

    async with trio.open_nursery() as nursery:
        for i in reversed(range(50)):
            nursery.start_soon(wait_turn, i)
        await trio.testing.wait_all_tasks_blocked()
        queue.wake()  # a slot freed: ticket 0's turn
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [0]
        queue.leave(tickets[0])  # it took the slot and left: ticket 1's turn
        await trio.testing.wait_all_tasks_blocked()
        assert woken == [0, 1]
        nursery.cancel_scope.cancel()


async def test_tokenizer_routes_do_not_wait_behind_generation(start_routerd, tmp_path, model_file):
    """/tokenize and the like take no slot in llama-server: with the only slot busy and a
    completion queued behind it, they are answered at once, not after the generation."""
    r = await start_routerd(make_config(tmp_path, {"a": one_slot(model_file)}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: post(r, "a", None, max_tokens=40))  # holds the only slot for 2 s
        await wait_in_flight(r, "a")
        busy_until = trio.current_time() + 40 * 0.05
        nursery.start_soon(lambda: post(r, "a", None, max_tokens=2))
        await wait_queued(r, "a", 1)
        for route, body in (("/tokenize", {"content": "hello"}), ("/detokenize", {"tokens": [1, 2]})):
            response = await r.http.post(route, json={"model": "a", **body})
            assert response.status_code == 200, response.text
        assert (await r.http.get("/a/props")).status_code == 200
        assert trio.current_time() < busy_until, "the tokenizer routes waited for the generation"
        assert r.supervisor.queued("a") == 1, "they never joined the queue"
