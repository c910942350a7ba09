"""The planner's objective J for a whole pipeline, and StageSpec → PlanStage."""

from __future__ import annotations

from collections.abc import Sequence

from pdv.artifacts import PlanStage
from pdv.plan.costs import StagePrice, stage_price
from pdv.plan.problem import PlanProblem, StageSpec, objective

__all__ = ["stage_prices", "pipeline_objective", "plan_stage", "followers"]


def followers(
    stages: Sequence[StageSpec], order: Sequence[int] | None = None
) -> list[tuple[int, ...] | None]:
    """For each stage, the devices after it in the order (None for the last stage).

    `order` is the device order the stages were cut from; by default the stages' ranks in turn.
    """
    seq = list(order) if order else [r for s in stages for r in s.ranks]
    out: list[tuple[int, ...] | None] = []
    for s, spec in enumerate(stages):
        if s + 1 == len(stages):
            out.append(None)
        else:
            out.append(tuple(seq[seq.index(spec.ranks[-1]) + 1 :]))
    return out


def stage_prices(
    problem: PlanProblem,
    stages: Sequence[StageSpec],
    mbs: int,
    order: Sequence[int] | None = None,
) -> list[StagePrice]:
    """Every stage priced by the planner, with its neighbours and in-flight count."""
    from pdv.plan.sharding import layered_price

    M = problem.global_batch // mbs
    out = []
    for s, (spec, nxt) in enumerate(zip(stages, followers(stages, order), strict=True)):
        to_end = len(stages) - s
        if spec.layer_choices is None:
            out.append(
                stage_price(problem, spec.ranks, spec.lo, spec.hi, mbs, spec.choice, to_end, M, nxt)
            )
        else:
            out.append(layered_price(problem, spec, mbs, to_end, M, nxt))
    return out


def pipeline_objective(
    problem: PlanProblem,
    stages: Sequence[StageSpec],
    mbs: int,
    order: Sequence[int] | None = None,
) -> float:
    """J of a pipeline (inf when a stage does not fit in memory)."""
    prices = stage_prices(problem, stages, mbs, order)
    if not all(p.fits for p in prices):
        return float("inf")
    M = problem.global_batch // mbs
    return objective([p.time_s for p in prices], [p.sync_s for p in prices], M)


def plan_stage(spec: StageSpec) -> PlanStage:
    """The artifact form of a stage; per-layer entries only where they differ from the stage."""
    ch = spec.choice
    sharding = None
    if spec.layer_choices is not None and any(c != ch for c in spec.layer_choices):
        sharding = [
            {"tp": c.tp, "fsdp": c.fsdp, "recompute": c.recompute} for c in spec.layer_choices
        ]
    return PlanStage(
        layers=(spec.lo, spec.hi),
        ranks=list(spec.ranks),
        dp=spec.dp,
        tp=ch.tp,
        fsdp=ch.fsdp,
        recompute=ch.recompute,
        layer_sharding=sharding,
    )
