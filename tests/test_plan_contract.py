"""The plan contract: typed per-layer choices, canonical schedules, and one validity check that
`pdv plan`, `pdv simulate` and `pdv run` share."""

from __future__ import annotations

import json

import pytest

from pdv import artifacts
from pdv.artifacts import LayerChoice, PlanStage
from pdv.cost.simulate import simulate
from pdv.errors import PdvError
from pdv.run.dims import ParallelDims
from tests.test_cost_builders import chain_plan, make_cluster, make_plan, make_profile


def _plan_json(**changes) -> dict:
    data = json.loads(artifacts.dumps(chain_plan(2, num_micro=2)))
    data.update(changes)
    return data


def test_a_misspelt_layer_choice_is_an_error() -> None:
    """extra="forbid" reaches the per-layer entries: a typo names the field."""
    data = _plan_json()
    data["stages"][0]["layer_sharding"] = [{"recompte": True}]
    with pytest.raises(PdvError, match="recompte"):
        artifacts.parse(data)


def test_a_layer_entry_takes_the_stage_values_it_leaves_out() -> None:
    stage = PlanStage(layers=(0, 3), ranks=[0, 1], tp=2, recompute=True,
                      layer_sharding=[{"tp": 1}, {}, {"recompute": False}])  # fmt: skip
    assert stage.layer_choices() == [
        LayerChoice(tp=1, fsdp=False, recompute=True),
        LayerChoice(tp=2, fsdp=False, recompute=True),
        LayerChoice(tp=2, fsdp=False, recompute=False),
    ]
    # Written back in full, so the file says what runs.
    again = artifacts.parse(json.loads(artifacts.dumps(make_plan([stage], num_micro=1))))
    assert again.stages[0].layer_sharding == stage.layer_sharding
    assert PlanStage(layers=(0, 2), ranks=[0]).layer_choices() == [LayerChoice()] * 2


@pytest.mark.parametrize(("written", "canonical"), [
    ("1f1b", "1F1B"), ("ScheduleGPipe", "GPipe"), ("interleaved_1f1b", "Interleaved1F1B"),
    ("zbv-zero-bubble", "ZBVZeroBubble"), ("LoopedBFS", "LoopedBFS"),
])
def test_schedules_are_canonical_once_read(written: str, canonical: str) -> None:
    assert artifacts.parse(_plan_json(schedule=written)).schedule == canonical
    assert artifacts.canonical_schedule(written) == canonical


# Plans every consumer must judge alike: (plan, the error's words or None when valid).
CASES = {
    "valid": (chain_plan(2, num_micro=2, layers_per_stage=2), None),
    "megatron batch convention": (
        make_plan([PlanStage(layers=(0, 2), ranks=[0, 1], dp=2),
                   PlanStage(layers=(2, 4), ranks=[2, 3], dp=2)], mbs=2, num_micro=2)
        .model_copy(update={"global_batch_size": 8}),
        "global_batch_size 8",
    ),  # fmt: skip
    "gap": (make_plan([PlanStage(layers=(0, 1), ranks=[0]), PlanStage(layers=(2, 4), ranks=[1])]),
            "starts at layer 2"),
    "short": (make_plan([PlanStage(layers=(0, 3), ranks=[0])]), "model has 4 layers"),
    "split": (make_plan([PlanStage(layers=(0, 4), ranks=[0, 1], dp=2)], mbs=3),
              "multiple of 2"),
    "1f1b few micro-batches": (chain_plan(4, num_micro=2), "at least as many micro-batches"),
    "gpipe few micro-batches": (chain_plan(4, num_micro=2, schedule="GPipe"), None),
    "placement": (chain_plan(4, schedule="GPipe", groups=[0, 1, 0, 1]),
                  "one stage per rank group"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_simulate_and_run_accept_the_same_plans(case: str) -> None:
    plan, error = CASES[case]
    prof = make_profile(n_layers=4)

    def run_side() -> None:
        ParallelDims.from_plan(plan, num_layers=4)

    def simulate_side() -> None:
        simulate(plan, {"cpu": prof}, make_cluster(4))

    for side in (run_side, simulate_side):
        if error is None:
            side()
        else:
            with pytest.raises(PdvError, match=error):
                side()
