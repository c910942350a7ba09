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

__all__ = ["ParallelDims", "StageMeshes", "build_meshes"]

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
        mesh = DeviceMesh(
            device_type, torch.tensor(s.ranks).view(s.dp, s.tp), mesh_dim_names=("dp", "tp")
        )
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
