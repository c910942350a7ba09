"""No-plan messages: each claim is checked against the simulator on a plan that shows it."""

from __future__ import annotations

import re

import pytest

from pdv.artifacts import LayerChoice, Plan
from pdv.cost.simulate import simulate
from pdv.errors import PdvError
from pdv.plan.problem import PlanProblem, StageSpec, plan_stage
from pdv.plan.reasons import closest_layout, layer_fit, why_no_plan
from pdv.plan.search import search
from tests.plan_fixtures import GiB, cluster, profile


def _flat_cluster(n: int, memory: int):
    bw = [[10e9] * n for _ in range(n)]
    return cluster([f"h{r}" for r in range(n)], bw, memory=memory)


def _peaks(problem: PlanProblem, stages: list[StageSpec], mbs: int) -> dict[int, float]:
    plan = Plan(
        stages=[plan_stage(s) for s in stages],
        micro_batch_size=mbs,
        num_micro_batches=problem.global_batch // mbs,
        global_batch_size=problem.global_batch,
        schedule=problem.schedule,
    )
    return simulate(plan, problem.profiles, problem.cluster).peak_memory_bytes


def _gib_over(message: str) -> list[float]:
    return [float(x) for x in re.findall(r"(-?[\d.]+) GiB over", message)]


def test_a_layer_that_fits_no_stage_is_named_with_its_positive_excess() -> None:
    # The last layer holds 48 GiB of state; without TP or FSDP no stage of 8 GiB ranks holds it.
    prof = profile(kind="gpu", n_layers=4, param_bytes=64 << 20, tp_degrees=(1,))
    big = prof.layers[-1].model_copy(
        update={"param_bytes": 12 * GiB, "grad_bytes": 12 * GiB, "optimizer_bytes": 24 * GiB}
    )
    prof = prof.model_copy(update={"layers": [*prof.layers[:-1], big]})
    problem = PlanProblem({"gpu": prof}, _flat_cluster(4, 8 * GiB), 4, allow_fsdp=False)
    with pytest.raises(PdvError) as err:
        search(problem, "pdv")
    msg = str(err.value)
    assert "layer 3 (layer3) fits no stage" in msg
    assert "profile with --tp-degrees" in msg and "--fsdp" in msg
    assert all(x > 0 for x in _gib_over(msg)) and _gib_over(msg)
    stuck = layer_fit(problem)
    assert stuck is not None
    layer, e = stuck
    assert layer == 3 and e.bytes > 0
    # The claim, simulated: that stage as the pipeline's last (its most frugal place), the rest
    # of the model on another rank, overshoots rank e.rank's budget by exactly the excess.
    other = next(r for r in range(4) if r not in e.spec.ranks)
    first = StageSpec(0, 3, (other,), LayerChoice())
    peaks = _peaks(problem, [first, e.spec], e.mbs)
    assert peaks[e.rank] - problem.capacity(e.rank) == pytest.approx(e.bytes, rel=1e-6)


def test_state_beyond_all_devices_is_named_and_every_layout_is_over() -> None:
    # 8 layers of 4 GiB state each (32 GiB) on 4 ranks of 8 GiB (28.8 GiB after the margin):
    # every layer fits (FSDP shards it over 4 replicas), the model does not.
    prof = profile(kind="gpu", n_layers=8, param_bytes=1 * GiB, act_bytes=1 << 20)
    problem = PlanProblem({"gpu": prof}, _flat_cluster(4, 8 * GiB), 4)
    assert layer_fit(problem) is None
    with pytest.raises(PdvError) as err:
        search(problem, "pdv")
    msg = str(err.value)
    assert "more than all 4 devices may hold together" in msg
    state, short = (float(x.replace(",", "")) for x in
                    re.search(r"take ([\d,]+) bytes, ([\d,]+) more", msg).groups())  # type: ignore[union-attr]  # fmt: skip
    assert state == 32 * GiB and short > 0
    # The claim, simulated on the most frugal layouts: the ranks together hold at least the
    # state, so some rank is over.
    ch = LayerChoice(tp=2, fsdp=True, recompute=True)
    for stages in (
        [StageSpec(0, 8, (0, 1, 2, 3), ch)],
        [StageSpec(0, 4, (0, 1), ch), StageSpec(4, 8, (2, 3), ch)],
    ):
        peaks = _peaks(problem, stages, 2)
        assert sum(peaks.values()) >= state
        assert max(peaks[r] - problem.capacity(r) for r in peaks) > 0


def test_the_closest_layout_is_named_with_a_positive_excess_the_simulator_confirms() -> None:
    # Two layers of 6 GiB state on two 8 GiB ranks, no TP/FSDP/recompute: each layer fits as
    # the last stage (one micro-batch in flight), the first stage of two holds two and is over.
    prof = profile(kind="gpu", n_layers=2, param_bytes=1536 << 20, act_bytes=1 * GiB,
                   out_bytes=1 << 20, tp_degrees=(1,))  # fmt: skip
    problem = PlanProblem({"gpu": prof}, _flat_cluster(2, 8 * GiB), 4, micro_batch_sizes=(1,),
                          allow_fsdp=False, allow_recompute=False)  # fmt: skip
    assert layer_fit(problem) is None
    with pytest.raises(PdvError) as err:
        search(problem, "pdv")
    msg = str(err.value)
    assert "the closest, 2 stage(s) of 1 rank(s)" in msg, msg
    e, fits = closest_layout(problem)
    assert e is not None and fits is None and e.bytes > 0
    assert _gib_over(msg) == [pytest.approx(e.bytes / 2**30, abs=0.01)]
    other = 1 - e.rank
    stages = [StageSpec(0, 1, (e.rank,), e.spec.choice), StageSpec(1, 2, (other,), e.spec.choice)]
    peaks = _peaks(problem, stages, e.mbs)
    assert peaks[e.rank] - problem.capacity(e.rank) == pytest.approx(e.bytes, rel=1e-6)


def test_the_margin_advice_is_true() -> None:
    # A layer just over its budget at the default margin: the advice names a margin that fits.
    prof = profile(kind="gpu", n_layers=2, param_bytes=1900 << 20, act_bytes=1 << 20,
                   tp_degrees=(1,))  # fmt: skip
    problem = PlanProblem({"gpu": prof}, _flat_cluster(1, 8 * GiB), 2, allow_fsdp=False)
    msg = why_no_plan(problem)
    found = re.search(r"it fits with --memory-margin ([\d.]+)", msg)
    assert found, msg
    relaxed = PlanProblem({"gpu": prof}, _flat_cluster(1, 8 * GiB), 2, allow_fsdp=False,
                          memory_margin=float(found.group(1)))  # fmt: skip
    assert layer_fit(relaxed) is None
