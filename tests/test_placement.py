"""Pure scheduling and placement decisions of the supervisor: the preload order, fair turns
between models that cannot all be resident, and how many replicas to run."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from routerd.backends import placement, scheduler


# -- preload order ---------------------------------------------------------------------------
def test_preload_starts_named_models_first_then_the_rest_of_the_catalog_in_order():
    catalog = ["a", "b", "c", "d"]
    assert scheduler.preload_order(["b", "*"], catalog) == ["b", "a", "c", "d"]
    assert scheduler.preload_order(["*"], catalog) == catalog
    assert scheduler.preload_order(["c", "a"], catalog) == ["c", "a"]  # names alone: only those
    # "*" stands at its place for the models not named anywhere in the list
    assert scheduler.preload_order(["*", "b"], catalog) == ["a", "c", "d", "b"]
    assert scheduler.preload_order(["d", "*", "a"], catalog) == ["d", "b", "c", "a"]
    assert scheduler.preload_order(["b", "b", "*", "*"], catalog) == ["b", "a", "c", "d"]  # each once
    assert scheduler.preload_order([], catalog) == []


# -- fair turns (property tests) --------------------------------------------------------------
# Whole seconds: advancing the clocks by a step below the timer stays exact.
seconds = st.integers(0, 100).map(float)
served_strategy = st.dictionaries(st.sampled_from(["a", "a#2", "b", "c", "d"]), seconds, max_size=5)


def _advanced(served, waited, give_up_in, dt):
    return dict(waited=waited + dt, served={k: v + dt for k, v in served.items()}, give_up_in=give_up_in - dt)


@given(served_strategy, seconds, st.integers(1, 60).map(float), st.integers(-5, 100).map(float), st.data())
def test_fair_turn_properties(served, waited, turn, give_up_in, data):
    yielding = data.draw(st.sets(st.sampled_from(sorted(served)))) if served else set()
    decision = placement.fair_turn(waited=waited, turn=turn, served=served, yielding=yielding,
                                   give_up_in=give_up_in)
    due = {name for name, s in served.items() if s >= turn and name not in yielding}
    if decision.yield_now:
        # only once the waiting model has waited its turn; only residents that had theirs and
        # are not making way already; and all of them at once
        assert waited >= turn
        assert set(decision.yield_now) == due
        assert len(decision.yield_now) == len(set(decision.yield_now))
        return
    assert waited < turn or not due
    assert decision.wake_in >= 0
    # the timer is never late: before it rings, nothing would be decided differently
    for dt in range(int(decision.wake_in)):
        later = placement.fair_turn(turn=turn, yielding=yielding, **_advanced(served, waited, give_up_in, dt))
        assert not later.yield_now
        assert give_up_in - dt > 0
    # and not pointless: when it rings, a turn ends, the wait reaches its turn, or it gives up
    dt = decision.wake_in
    reasons = [give_up_in - dt <= 0, waited < turn <= waited + dt,
               any(s < turn <= s + dt for s in served.values())]
    assert any(reasons)


def test_a_model_that_waited_its_turn_takes_it_from_those_that_had_theirs():
    decision = placement.fair_turn(waited=15, turn=15, served={"a": 20, "b": 5, "c": 30}, yielding={"c"},
                                   give_up_in=100)
    assert decision == placement.FairTurn(yield_now=("a",), wake_in=0.0)
    # b's turn ends in 10 s: look again then (c already yields; nothing else to decide)
    decision = placement.fair_turn(waited=15, turn=15, served={"b": 5, "c": 30}, yielding={"c"}, give_up_in=100)
    assert decision == placement.FairTurn(wake_in=10.0)
    # before its own wait is up, nobody yields, however long they served
    assert placement.fair_turn(waited=3, turn=15, served={"a": 99}, yielding=set(), give_up_in=100).wake_in == 12


# -- replica scaling (property tests) ----------------------------------------------------------
@given(most=st.integers(1, 6), data=st.data(), starting=st.integers(0, 3), in_progress=st.booleans(),
       closing=st.booleans(), oldest_wait=seconds, scale_up_wait=seconds)
def test_scaling_properties(most, data, starting, in_progress, closing, oldest_wait, scale_up_wait):
    keep = data.draw(st.integers(1, most), label="keep")
    live = data.draw(st.integers(0, most + 1), label="live")
    starting = min(starting, live)
    decide = dict(keep=keep, most=most, live=live, starting=starting, in_progress=in_progress, closing=closing,
                  scale_up_wait=scale_up_wait)
    decision = placement.scaling(oldest_wait=oldest_wait, **decide)
    # never beyond the most configured, never while closing, adding already, or before the first
    assert decision.start >= 0
    if decision.start:
        assert live + decision.start <= most
        assert not closing and not in_progress and live >= 1 and most > 1
    # the configured replicas start at once; beyond them one at a time, after scale_up_wait, and
    # only once none is still starting
    if most > 1 and live and not closing and not in_progress:
        if live < keep:
            assert decision.start == keep - live
        elif live < most and starting == 0 and oldest_wait >= scale_up_wait:
            assert decision.start == 1
        else:
            assert decision.start == 0
    # the timer: never while no more can start; else it rings once the wait earns one more
    if live >= most or in_progress:
        assert decision.recheck_in == math.inf
    else:  # rings a tick (10 ms) after the wait could earn a replica: never before it, not later
        wait_left = max(0.0, scale_up_wait - oldest_wait)
        assert decision.recheck_in > wait_left
        assert math.isclose(decision.recheck_in, wait_left + 0.01, abs_tol=1e-6), decision
        later = placement.scaling(oldest_wait=oldest_wait + decision.recheck_in, **decide)
        if most > 1 and keep <= live and starting == 0 and not closing:
            assert later.start == 1
