"""benchmarks/pipeline_gaps.py: which gaps between ops count as a waited exchange."""

from __future__ import annotations

import pytest

from benchmarks.pipeline_gaps import timeline, waited_gaps
from pdv.artifacts import Plan, PlanStage
from pdv.cost.simulate import simulate, stage_costs
from tests.plan_fixtures import cluster
from tests.test_cost_builders import make_profile


def test_only_gaps_the_taking_rank_waited_out_count() -> None:
    ops = {
        0: [("F", 0, 0, 0.0, 1.0), ("F", 0, 1, 1.0, 2.0), ("B", 0, 0, 2.7, 3.5),
            ("B", 0, 1, 4.9, 5.4)],
        # micro-batch 1's activation lands while rank group 1 is in B(1, 0): not waited for
        1: [("F", 1, 0, 1.3, 1.8), ("B", 1, 0, 1.8, 2.5), ("F", 1, 1, 2.6, 3.0),
            ("B", 1, 1, 3.0, 4.6)],
    }
    got = waited_gaps(ops, [0, 1])
    assert got[(0, "act")] == [pytest.approx(0.3)]
    # B(0, 0) waited for B(1, 0) (0.2); B(0, 1) for B(1, 1) (0.3): rank group 0 idled from 3.5
    assert sorted(got[(0, "grad")]) == [pytest.approx(0.2), pytest.approx(0.3)]
    busy, between = timeline(ops)[0]
    assert busy == pytest.approx(3.3) and between == pytest.approx(5.4 - 3.3)
    # stages on one rank group exchange nothing
    assert waited_gaps({0: ops[0] + ops[1]}, [0, 0]) == {}


@pytest.mark.parametrize(("stages", "micro"), [(2, 4), (3, 6)])
def test_a_simulated_waited_gap_is_the_priced_transfer(stages: int, micro: int) -> None:
    """On the simulator's own events the rule finds exactly the transfers it priced: each
    waited gap is the boundary's send_s (activations) or grad_send_s (gradients)."""
    per = 6 // stages
    prof = make_profile(n_layers=6, fwd=[0.01, 0.02, 0.01, 0.03, 0.01, 0.02],
                        bwd=[0.02, 0.05, 0.02, 0.04, 0.03, 0.02], out=4 * 10**6)
    cl = cluster([f"h{r}" for r in range(stages)],
                 [[0.0 if i == j else 1e9 for j in range(stages)] for i in range(stages)],
                 kinds=["cpu"] * stages)
    plan = Plan(stages=[PlanStage(layers=[i * per, (i + 1) * per], ranks=[i], dp=1, tp=1)
                        for i in range(stages)],
                micro_batch_size=1, num_micro_batches=micro, global_batch_size=micro,
                schedule="1F1B")
    sim = simulate(plan, {"cpu": prof}, cl)
    ops: dict[int, list] = {}
    for e in sim.events:
        if e.lane == "compute" and e.micro is not None and e.name in ("F", "B"):
            ops.setdefault(e.group, []).append((e.name, e.stage, e.micro, e.start_s, e.end_s))
    got = waited_gaps(ops, sim.stage_group)
    costs = stage_costs(plan, {"cpu": prof}, cl)
    assert {k for k, v in got.items() if v}, got
    for (s, direction), gaps in got.items():
        want = costs[s].send_s if direction == "act" else costs[s].grad_send_s
        assert want > 0.003  # 4 MB at 1 GB/s: the transfer is what is found, not noise
        assert gaps == [pytest.approx(want)] * len(gaps), (s, direction)
