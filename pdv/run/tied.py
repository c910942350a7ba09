"""Tied weights across stages: one gradient for the copies of a shared parameter.

A model may use one parameter in two layers (GPT-2's LM head is its token embedding). When a
plan puts those layers in different stages, each stage's ranks hold a copy; pdv keeps the
copies equal by summing their gradients after every step's backward (Megatron-LM's embedding
all-reduce between the first and last stage), so every copy takes the same optimizer step from
the same state. The alternative, a planner rule that keeps tied layers in one stage, would put
the embedding and the LM head -- the first and last layers -- in one stage, which is no
pipeline at all. The sum runs over one group: every rank that holds a copy. A rank's copy
enters it scaled by 1 / (tp x the stage's replica divisor): TP shards of a replicated layer
hold identical gradients, and replicas average (or sum) as the stage's other gradients do.
Tied parameters are left out of FSDP sharding and of the replicas' flat all-reduce; a TP plan
must leave them replicated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pdv.errors import PdvError
from pdv.models import ModelDef
from pdv.run.dims import ParallelDims

__all__ = ["TiedGrads", "TIED_ATTR"]

TIED_ATTR = "_pdv_tied"
"""Marks a parameter whose gradient TiedGrads sums (the replicas' own sync skips it)."""


class TiedGrads:
    """This rank's copies of tied parameters and the groups that sum their gradients."""

    def __init__(self, model: ModelDef, dims: ParallelDims, rank: int,
                 replica_divisor: int) -> None:
        """Built on every rank in the same order (process groups are created collectively),
        before the stages are parallelized. `replica_divisor`: what the executor divides the
        replicas' gradient sum by (dp for equal widths, 1 for the split/merge executor)."""
        self.syncs: list[tuple[nn.Parameter, Any, float]] = []
        self.params: set[nn.Parameter] = set()
        stage_of = {i: s for s, st in enumerate(dims.stages) for i in range(*st.layers)}
        for group in model.tied_groups():
            stages = sorted({stage_of[i] for i, _ in group})
            if len(stages) == 1:
                continue  # one stage holds every use: one parameter, nothing to sync
            holders = sorted({r for s in stages for r in dims.stages[s].ranks})
            pg = dist.new_group(holders)
            mine = [s for s in stages if rank in dims.stages[s].ranks]
            if not mine:
                continue
            index, name = next((i, n) for i, n in group if stage_of[i] in mine)
            param = model.layers[index][1].get_parameter(name)
            width = dims.stages[mine[0]]
            setattr(param, TIED_ATTR, True)
            self.params.add(param)
            self.syncs.append((param, pg, 1.0 / (width.tp * replica_divisor)))

    def check(self) -> None:
        """A PdvError when a TP plan sharded a tied parameter (copies would not line up)."""
        from torch.distributed.tensor import DTensor

        for param, _, _ in self.syncs:
            if isinstance(param, DTensor):
                raise PdvError("a tied parameter (shared by layers in different stages) is "
                               "sharded by the model's TP plan; leave tied layers replicated")

    def reduce(self) -> None:
        """Sum the copies' gradients (scaled) over every rank that holds one."""
        for param, pg, weight in self.syncs:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if weight != 1.0:
                param.grad.mul_(weight)
            dist.all_reduce(param.grad, group=pg)
