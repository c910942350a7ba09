"""The one pricing: range sums for the DP equal the layer-by-layer sums the simulator takes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdv.artifacts import LayerChoice
from pdv.cost.comm import Ring
from pdv.cost.terms import RankView, RingView, StageGroup, _range_max, price_layers, price_ranges
from tests.test_cost_builders import make_profile


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e9), min_size=1, max_size=30), st.data())
def test_range_max_is_the_largest_over_each_range(values: list[float], data) -> None:
    v = np.array(values)
    inner = data.draw(st.sets(st.integers(1, len(v) - 1), max_size=len(v))) if len(v) > 1 else []
    bounds = np.array(sorted({0, len(v), *inner}))
    got = _range_max(v, bounds)
    for x in range(len(bounds)):
        for y in range(len(bounds)):
            want = v[bounds[x] : bounds[y]].max() if y > x else 0.0
            assert got[x, y] == want


@pytest.mark.parametrize("choice", [
    LayerChoice(), LayerChoice(tp=2), LayerChoice(fsdp=True), LayerChoice(recompute=True),
    LayerChoice(tp=2, fsdp=True, recompute=True),
])  # fmt: skip
def test_every_range_at_once_prices_as_one_range(choice: LayerChoice) -> None:
    """price_ranges (prefix sums, the DP) and price_layers (layer by layer) agree everywhere."""
    profiles = {
        "a": make_profile("a", n_layers=5, fwd=[0.01, 0.02, 0.005, 0.03, 0.01], act=700,
                          tp_degrees=(1, 2), optimizer_s=0.002),
        "b": make_profile("b", n_layers=5, fwd=0.02, act=700, tp_degrees=(1, 2)),
    }  # fmt: skip
    fast, slow = Ring(2, 1e-5, 1e9), Ring(2, 3e-5, 2e8)
    group = StageGroup(
        # Rank a's sync excess grows with the stage's compute: some ranges end on the line
        # between the probe's two bursts, the longer ones past it, where it is held.
        ranks=(RankView("a", 1.0, 100.0, 1e9, 1e-3, 2e-3, 3e-3, sync_after_compute_s=1e-3,
                        sync_burst_s=0.005, sync_long_burst_s=0.15, sync_long_excess_s=0.004),
               RankView("b", 1.5, 0.0, 1e9)),
        tp_rings=(RingView(fast, ("a", "b")), RingView(slow, ("a", "b"))),
        dp_rings=(RingView(slow, ("a",)), RingView(fast, ("b",))),
        tp=2,
        dp=2,
    )
    bounds = np.array([0, 1, 3, 5])
    table = price_ranges(profiles, group, 2, choice, bounds, num_micro=3)
    for x in range(len(bounds)):
        for y in range(x + 1, len(bounds)):
            lo, hi = int(bounds[x]), int(bounds[y])
            one = price_layers(profiles, group, 2, lo, [choice] * (hi - lo), num_micro=3)
            for field in ("fwd_s", "bwd_s", "grad_sync_s", "optimizer_s", "output_bytes"):
                assert getattr(table, field)[x, y] == pytest.approx(float(getattr(one, field)))
            assert table.peak_bytes(3)[:, x, y] == pytest.approx(one.peak_bytes(3))


def test_tp_charges_all_reduces_only_on_layers_the_plan_splits() -> None:
    """A layer the TP plan leaves whole (its TP sample keeps every parameter: an embedding, an
    unsplit head) runs replicated on each shard and sends no all-reduce; split layers do."""
    from pdv.cost.terms import layer_terms

    prof = make_profile("a", n_layers=3, tp_degrees=(1, 2), out=10**6)
    whole = prof.layers[0].model_copy(update={"samples": [
        s.model_copy(update={"param_bytes": prof.layers[0].param_bytes})
        for s in prof.layers[0].samples]})
    prof = prof.model_copy(update={"layers": [whole, *prof.layers[1:]]})
    ring = Ring(2, 1e-5, 1e8)
    group = StageGroup(ranks=(RankView("a", 1.0, 0.0, 1e9),) * 2,
                       tp_rings=(RingView(ring, ("a",)),), dp_rings=(), tp=2, dp=1)
    terms = layer_terms({"a": prof}, group, 1, LayerChoice(tp=2))
    tp = np.asarray(terms.tp_fwd_s).reshape(-1, 3)  # (tp rings, layers)
    assert (tp[:, 0] == 0.0).all()
    assert (tp[:, 1:] > 0).all()
