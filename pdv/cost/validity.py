"""The one validity check of a plan, called by `pdv plan` (through the simulator), `pdv simulate`
and `pdv run` (pdv.run.dims), so all three accept the same plans.

What a plan alone must satisfy beyond its fields is here; what each stage must satisfy alone
(ranks = dp × tp, no rank twice, one layer choice per layer with tp 1 or the stage's) is checked
when the artifact is read (pdv.artifacts.PlanStage), and the schedule's name is made canonical
there. One batch convention: ``global_batch_size = micro_batch_size × num_micro_batches``, each
micro-batch split evenly over a stage's replicas.
"""

from __future__ import annotations

from pdv.artifacts import Plan
from pdv.cost.schedules import StageLayout, check_rounds, max_stages, stage_layout
from pdv.errors import PdvError

__all__ = ["check_plan"]


def check_plan(
    plan: Plan, num_layers: int | None = None, num_devices: int | None = None
) -> StageLayout:
    """PdvError naming the fix unless the plan is valid (for a model of `num_layers` layers on
    `num_devices` devices, where known); returns its stages' placement on rank groups."""
    if plan.micro_batch_size * plan.num_micro_batches != plan.global_batch_size:
        raise PdvError(
            f"global_batch_size {plan.global_batch_size} != micro_batch_size "
            f"{plan.micro_batch_size} x num_micro_batches {plan.num_micro_batches}; set "
            f"global_batch_size to {plan.micro_batch_size * plan.num_micro_batches}"
        )
    expect = 0
    for i, s in enumerate(plan.stages):
        if s.layers[0] != expect:
            raise PdvError(
                f"stage {i} starts at layer {s.layers[0]} but the previous stage ends at {expect}; "
                f"stages must cover the layers in order without gaps"
            )
        expect = s.layers[1]
        if plan.micro_batch_size % s.dp:
            raise PdvError(
                f"stage {i}: micro-batch size {plan.micro_batch_size} does not split evenly over "
                f"its {s.dp} replicas; use a micro-batch size that is a multiple of {s.dp}"
            )
        bad = [r for r in s.ranks if num_devices is not None and r >= num_devices]
        if bad and num_devices is not None:
            raise PdvError(
                f"stage {i} uses ranks {bad} but the cluster has ranks 0..{num_devices - 1}"
            )
    if num_layers is not None and expect != num_layers:
        raise PdvError(
            f"the stages end at layer {expect} but the model has {num_layers} layers; plan for "
            "this model (or pass the model the plan was made for)"
        )
    layout = stage_layout([s.ranks for s in plan.stages], plan.schedule)
    check_rounds(layout, plan.schedule, plan.num_micro_batches)
    uniform = len({(s.dp, s.tp) for s in plan.stages}) == 1
    n = len(plan.stages)
    if uniform and max_stages(plan.schedule, plan.num_micro_batches, n) < n:
        # torch's Schedule1F1B refuses this inside every rank; say it once, before launch
        raise PdvError(
            f"{plan.schedule} needs at least as many micro-batches as stages: "
            f"{plan.num_micro_batches} < {n}; raise num_micro_batches to {n} or use GPipe"
        )
    return layout
