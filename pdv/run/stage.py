"""Build one rank's stage module: keep the stage's layers, then TP, recompute, and replicas.

Order follows torchtitan's parallelize: tensor parallel first (parallelize_module with the model's
own TP plan on the stage's "tp" axis), then activation checkpointing, then data parallel over the
"dp" axis: FSDP2 ``fully_shard`` per layer and on the stage when the plan says fsdp, else DDP.
DDP does not take DTensor parameters, so a stage with both TP and plain replicas goes through
torch's ``_pre_dp_module_transform`` (local shards under DDP, DTensors rebuilt in forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pdv.artifacts import PlanStage
from pdv.cost.stage import layer_choices
from pdv.errors import PdvError
from pdv.models import ModelDef

__all__ = ["build_stage_module", "check_tp_support", "reduce_replica_grads"]


def check_tp_support(model: ModelDef, stages: list[PlanStage], spec: str) -> None:
    """A PdvError when the plan asks for a TP degree the model does not offer."""
    for i, s in enumerate(stages):
        if s.tp == 1:
            continue
        if model.tp_plan is None:
            raise PdvError(
                f"stage {i} asks for tp={s.tp} but model {spec} has no TP plan; use tp=1"
            )
        if s.tp not in model.tp_degrees:
            raise PdvError(
                f"stage {i} asks for tp={s.tp} but model {spec} supports TP degrees "
                f"{list(model.tp_degrees)}"
            )


def build_stage_module(model: ModelDef, stage: PlanStage, mesh: Any,
                       device: torch.device) -> nn.Module:
    """The stage's layers as one module, parallelized for this rank (TP, recompute, FSDP2).

    Plain replicas come back unwrapped; the executor calls reduce_replica_grads after each step.
    """
    start, end = stage.layers
    choices = layer_choices(stage)
    module = model.sequential(start, end)
    module.to(device)
    if stage.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        assert model.tp_plan is not None
        tp_mesh = mesh["tp"]
        for index in range(start, end):
            layer = module[index - start]
            plan = model.tp_plan(index, layer)
            # tp 1 in layer_sharding: the layer stays replicated inside the TP group.
            if plan and choices[index - start].tp > 1:
                parallelize_module(layer, tp_mesh, plan)
    if any(c.recompute for c in choices):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for k, c in enumerate(choices):
            if c.recompute:
                module[k] = checkpoint_wrapper(module[k])
    if stage.dp == 1:
        return module
    if any(c.fsdp for c in choices):
        from torch.distributed.fsdp import fully_shard

        # Layers marked fsdp are their own units; the rest fall into the stage's root unit,
        # so a stage with any FSDP layer shards all of its parameters.
        dp_mesh = mesh["dp"]
        for k, c in enumerate(choices):
            if c.fsdp:
                fully_shard(module[k], mesh=dp_mesh)
        fully_shard(module, mesh=dp_mesh)
        return module
    return module


def reduce_replica_grads(module: nn.Module, group: Any, divide_by: int) -> None:
    """Sum the module's gradients over its replicas (one flat all-reduce), then divide."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = []
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        grads.append(g.to_local() if isinstance(g, DTensor) else g)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat.div_(divide_by)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)
