"""A replica's share of a micro-batch is never below what the profile measured.

A layer's time at batch b comes from the profile's fit a + b·t over the measured sizes; below
the smallest one it is an extrapolation (prediction_check measured such plans 24-70% slow of
their prediction). pdv plan does not search them, `pdv check` does not pick them as shapes, a
plan that has them says so when simulated, and a problem left with none says why.
"""

from __future__ import annotations

import pytest

from pdv.check import shape_plans
from pdv.cost.simulate import simulate
from pdv.errors import PdvError
from pdv.plan.problem import PlanProblem
from pdv.plan.search import PLANNERS, search
from tests.plan_fixtures import cluster, profile


def _setup(sizes: list[int], n_dev: int = 4) -> tuple[dict, object]:
    prof = profile(n_layers=6).model_copy(update={"micro_batch_sizes": sizes})
    bw = [[1e10] * n_dev for _ in range(n_dev)]
    return {"gpu": prof}, cluster([f"h{r // 2}" for r in range(n_dev)], bw)


def _shares(plan) -> list[int]:
    return [plan.micro_batch_size // st.dp for st in plan.stages]


@pytest.mark.parametrize("sizes,n_dev", [([4, 8], 4), ([2, 4, 8], 8), ([8], 4)])
def test_no_plan_runs_a_replica_below_the_profiled_sizes(sizes: list[int], n_dev: int) -> None:
    profiles, cl = _setup(sizes, n_dev)
    problem = PlanProblem(profiles, cl, 64, time_limit_s=2)
    smallest = min(sizes)
    seen = 0
    for planner in PLANNERS:
        try:
            plans = search(problem, planner, top=8).plans
        except PdvError:
            continue
        for plan in plans:
            assert min(_shares(plan)) >= smallest, (planner, _shares(plan))
            seen += 1
    for plan in shape_plans(problem):
        assert min(_shares(plan)) >= smallest, ("shape", _shares(plan))
        seen += 1
    assert seen >= 4
    # The rule is not vacuous: with the small sizes measured, the same search runs replicas
    # on fewer samples than `smallest`.
    profiles_all, _ = _setup(sorted({1, 2, *sizes}), n_dev)
    wide = PlanProblem(profiles_all, cl, 64, micro_batch_sizes=tuple(sizes), time_limit_s=2)
    shares = [s for p in shape_plans(wide) for s in _shares(p)]
    assert min(shares) < smallest


def test_a_plan_with_such_a_stage_says_so_when_simulated() -> None:
    profiles_all, cl = _setup([1, 2, 4, 8])
    wide = PlanProblem(profiles_all, cl, 64, micro_batch_sizes=(4, 8), time_limit_s=2)
    low = next(p for p in shape_plans(wide) if min(_shares(p)) < 4)
    profiles, _ = _setup([4, 8])
    notes = simulate(low, profiles, cl).notes
    assert any("below the smallest profiled micro-batch (4)" in n for n in notes), notes
    assert not any("below the smallest" in n for n in simulate(low, profiles_all, cl).notes)


def test_no_allowed_size_reaches_the_profile_says_why() -> None:
    profiles, cl = _setup([4, 8])
    problem = PlanProblem(profiles, cl, 64, micro_batch_sizes=(1, 2), time_limit_s=2)
    with pytest.raises(PdvError, match=r"below the smallest size the profiles measured \(4\)"):
        search(problem, "pdv")
