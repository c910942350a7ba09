"""The parallel degrees of a plan, checked once, and the one function that builds its meshes.

Vocabulary (as torchtitan's parallel_dims): an *axis* is a device-mesh axis ("dp", "tp"); a
*dim* is a tensor dimension. A *stage* is a contiguous range of layers on a group of ranks; a
*replica* is one data-parallel copy of a stage (``dp`` of them); a *shard* is one tensor-parallel
rank inside a replica (``tp`` of them). Stage ranks are dp-major: ``ranks[r * tp + t]`` is
replica r, shard t.

Micro-batching convention: one pipeline micro-batch holds ``M = micro_batch_size =
global_batch_size / num_micro_batches`` samples, and every stage splits each micro-batch evenly
over its replicas (replica r of a stage with dp replicas takes rows ``[r*M/dp, (r+1)*M/dp)``).
That is Alpa's convention, and it is what lets stages have different widths; the plan, simulate
and run all check it with pdv.cost.validity.check_plan.

A *chain* is the sequence of ranks that one sample slice visits through the pipeline when every
stage has the same (dp, tp): chain (r, t) is replica r, shard t of every stage. Each chain is one
``torch.distributed.pipelining`` pipeline with its own process group.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdv.artifacts import Plan, PlanStage
from pdv.cost.validity import check_plan
from pdv.errors import PdvError

__all__ = ["ParallelDims", "StageMeshes", "build_meshes", "checkpoint_blocker", "mesh_grid"]

_MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")


@dataclass(frozen=True)
class ParallelDims:
    """Owns the plan's stages and degrees; every question about who-does-what asks it."""

    stages: tuple[PlanStage, ...]
    num_micro_batches: int
    pipeline_micro_batch: int
    """M: samples in one pipeline micro-batch (split over a stage's replicas)."""

    @classmethod
    def from_plan(cls, plan: Plan, num_layers: int | None = None) -> ParallelDims:
        """Check the plan (pdv.cost.validity, as plan and simulate do) and what this runtime
        can execute of it."""
        check_plan(plan, num_layers)
        dims = cls(stages=tuple(plan.stages), num_micro_batches=plan.num_micro_batches,
                   pipeline_micro_batch=plan.micro_batch_size)
        dims._check_ranks(plan.schedule)
        return dims

    def _check_ranks(self, schedule: str) -> None:
        seen = sorted({r for s in self.stages for r in s.ranks})
        if seen != list(range(len(seen))):
            missing = sorted(set(range(max(seen) + 1)) - set(seen))
            raise PdvError(
                f"the plan's ranks must be 0..N-1 with none missing; ranks {missing} are in "
                "no stage"
            )
        if self.multi_stage:
            if not self.uniform:
                raise PdvError(
                    "a rank holds several stages (interleaved) but stages differ in dp/tp; "
                    "interleaving needs the same dp and tp in every stage"
                )
            if schedule not in _MULTI_STAGE_SCHEDULES:
                raise PdvError(
                    f"a rank holds several stages, which needs an interleaved schedule "
                    f"({', '.join(_MULTI_STAGE_SCHEDULES)}), not {schedule!r}"
                )
        elif schedule in _MULTI_STAGE_SCHEDULES:
            raise PdvError(
                f"schedule {schedule} needs several stages per rank, but each rank holds one "
                "stage; use 1F1B or GPipe, or place stages round-robin on the ranks"
            )

    # ------------------------------------------------------------------ questions

    @property
    def world_size(self) -> int:
        """Number of ranks the plan uses."""
        return len({r for s in self.stages for r in s.ranks})

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stages)

    @property
    def multi_stage(self) -> bool:
        """True when some rank holds more than one stage (interleaved / looped schedules)."""
        return sum(len(s.ranks) for s in self.stages) != self.world_size

    @property
    def uniform(self) -> bool:
        """True when every stage has the same (dp, tp): one pipeline per chain."""
        return len({(s.dp, s.tp) for s in self.stages}) == 1

    def stages_of(self, rank: int) -> list[int]:
        """Indices of the stages this rank runs, in pipeline order."""
        return [i for i, s in enumerate(self.stages) if rank in s.ranks]

    def position(self, rank: int, stage: int) -> tuple[int, int]:
        """(replica, shard) of the rank in the stage."""
        s = self.stages[stage]
        k = s.ranks.index(rank)
        return k // s.tp, k % s.tp

    def replica_rows(self, stage: int) -> int:
        """Samples of one micro-batch that each replica of the stage processes."""
        return self.pipeline_micro_batch // self.stages[stage].dp

    def chains(self) -> list[list[int]]:
        """For uniform plans: chain (r, t) -> the rank of replica r, shard t in every stage."""
        assert self.uniform
        s0 = self.stages[0]
        return [[s.ranks[k] for s in self.stages] for k in range(s0.dp * s0.tp)]

    def chain_of(self, rank: int) -> int:
        """The chain (index r*tp + t) the rank belongs to, for uniform plans."""
        stage = self.stages_of(rank)[0]
        return self.stages[stage].ranks.index(rank)


@dataclass
class StageMeshes:
    """This rank's meshes: a (dp, tp) mesh per stage it runs, and its pipeline group."""

    stage_mesh: dict[int, object]
    """stage index -> DeviceMesh with axes ("dp", "tp") over the stage's ranks"""
    pp_group: object | None
    """process group of this rank's chain (uniform plans), None otherwise"""
    pp_ranks: list[int]
    """global ranks of the chain in pipeline order (one per stage; repeats when interleaved)"""


def build_meshes(dims: ParallelDims, device_type: str, rank: int) -> StageMeshes:
    """Build every stage's DeviceMesh and the chain groups; every rank calls this in step.

    Process-group creation is collective over the whole world, so all ranks create all meshes
    and groups in the same order and keep only their own.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    mine: dict[int, object] = {}
    for i, s in enumerate(dims.stages):
        grid = mesh_grid(s.ranks, s.dp, s.tp)
        mesh = DeviceMesh(device_type, torch.tensor(grid), mesh_dim_names=("dp", "tp"))
        if rank in s.ranks:
            mine[i] = mesh
    pp_group = None
    pp_ranks: list[int] = []
    if dims.uniform:
        for chain in dims.chains():
            group = dist.new_group(sorted(set(chain)))
            if rank in chain:
                pp_group, pp_ranks = group, chain
    return StageMeshes(stage_mesh=mine, pp_group=pp_group, pp_ranks=pp_ranks)


def mesh_grid(ranks: list[int], dp: int, tp: int) -> list[list[int]]:
    """The stage's (dp, tp) grid of ranks with each axis ascending where its TP groups allow.

    A process group numbers its ranks in ascending order, and torch 2.13's DTensor keeps the
    shard of a rank's group rank while torch.distributed.checkpoint reads and writes at the
    offset of its mesh coordinate: on a mesh like [1, 0] a checkpoint resharded another
    plan's weights into the wrong rows (so did its whole-tensor state dicts). Nothing else
    reads the mesh's order (replicas and shards take their data and routes from the plan's
    order), so the rows (TP groups) are sorted, and sorted by first rank, whenever every
    column then ascends too; checkpoint_blocker names the stages where they cannot.
    """
    rows = [list(ranks[r * tp:(r + 1) * tp]) for r in range(dp)]
    tidy = sorted(sorted(row) for row in rows)
    return tidy if in_group_order(tidy) else rows


def in_group_order(grid: list[list[int]]) -> bool:
    """Whether every row and every column of the grid ascends (coordinate = group rank)."""
    rows_up = all(a < b for row in grid for a, b in zip(row, row[1:], strict=False))
    cols_up = all(grid[i][k] < grid[i + 1][k]
                  for i in range(len(grid) - 1) for k in range(len(grid[0])))
    return rows_up and cols_up


def checkpoint_blocker(stages: tuple[PlanStage, ...] | list[PlanStage]) -> str | None:
    """Why this plan's sharded state cannot be checkpointed, or None when it can."""
    for i, s in enumerate(stages):
        grid = mesh_grid(s.ranks, s.dp, s.tp)
        if (s.fsdp or s.tp > 1) and s.dp * s.tp > 1 and not in_group_order(grid):
            groups = ", ".join("{" + ", ".join(map(str, sorted(row))) + "}" for row in grid)
            return (f"stage {i}'s TP groups {groups} cannot be laid out with ranks ascending "
                    f"along both mesh axes, and torch's checkpoint resharding misplaces shards "
                    f"on such a mesh: checkpoints and resume are refused for this plan "
                    "(order the stage's ranks so that its TP groups ascend together, as "
                    "{0, 1}, {2, 3} do)")
    return None
