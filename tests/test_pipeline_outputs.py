"""The last stage keeps no micro-batch outputs between steps: pdv reads only the losses, and the
cost model prices no such outputs (torch's schedules keep them for a merge unless told not to)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.distributed.pipelining.schedules import Schedule1F1B

from pdv.artifacts import ModelSpec, Plan, PlanStage
from pdv.boundaries import input_values, probe_for_stages
from pdv.models import build_model
from pdv.run.dims import ParallelDims, build_meshes
from pdv.run.pipeline import ChainPipeline
from pdv.run.stage import build_stage_module


@pytest.mark.skipif("return_outputs" not in inspect.signature(Schedule1F1B.step).parameters,
                    reason="this torch's schedules always keep the outputs")
def test_last_stage_keeps_no_outputs(world_of_one: None) -> None:
    kwargs = {"n_layer": 1, "dim": 8, "in_dim": 32}
    plan = Plan(model=ModelSpec(spec="mlp", kwargs=kwargs), micro_batch_size=2,
                num_micro_batches=4, global_batch_size=8,
                stages=[PlanStage(layers=(0, 3), ranks=[0])])
    model = build_model("mlp", kwargs)
    dims = ParallelDims.from_plan(plan, len(model.layers))
    meshes = build_meshes(dims, "cpu", 0)
    device = torch.device("cpu")
    module = build_stage_module(model, dims.stages[0], meshes.stage_mesh[0], device)
    boundaries = probe_for_stages(model, [(0, 3)])
    x, y = model.make_batch(8, torch.Generator().manual_seed(0))
    pipe = ChainPipeline(dims, meshes, {0: module}, 0, device, "1F1B", model.loss_fn, boundaries,
                         input_values(x))
    losses = pipe.step(x, y)
    assert len(losses) == 4 and all(v > 0 for v in losses)
    # Each micro-batch's output (8 x 32 floats here; a GPT's logits in general) is gone once
    # its backward ran, not held until the next step.
    assert all(not st.output_chunks for st in pipe.stages)
