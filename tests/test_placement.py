"""Pure scheduling and placement decisions of the supervisor: the preload order, fair turns
between models that cannot all be resident, and how many replicas to run."""

from __future__ import annotations

from routerd.backends import scheduler


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
