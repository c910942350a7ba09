"""The planning problem: what every search takes, and the stages and candidates it returns.

Every search in pdv.plan takes a :class:`PlanProblem` and returns ranked candidates, so the
stage DP, the CP-SAT sharding and the baselines are interchangeable (STYLE habit 5). The
package reads in the order a search runs: problem → objective (the price of a stage and the
objective J) → stages (the stage DP) → sharding (CP-SAT per stage) → baselines → search.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from pdv.artifacts import ClusterArtifact, LayerChoice, Links, ModelProfile, PlanStage, Schedule
from pdv.cost.compute import profile_for, smallest_batch
from pdv.errors import PdvError

__all__ = ["DEFAULT_VIRTUAL_STAGES", "PlanProblem", "Candidate", "StageSpec", "choices_for",
           "plan_stage"]

DEFAULT_VIRTUAL_STAGES = (2, 3, 4)
"""model chunks per rank group tried as interleaved forms of pdv's 1F1B pipelines. On by
default since the simulator's interleaved pricing passed benchmarks/schedule_check.py (2026-12-05:
largest |error| 1.0% over 7 plans, 4 of them interleaved; docs/design-notes.md)"""


@dataclass(frozen=True)
class StageSpec:
    """One stage as the search sees it: layers [lo, hi) on `ranks` with one choice."""

    lo: int
    hi: int
    ranks: tuple[int, ...]
    choice: LayerChoice
    layer_choices: tuple[LayerChoice, ...] | None = None
    """per-layer choices where the sharding solver made them differ inside the stage"""

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the stage."""
        return len(self.ranks) // self.choice.tp

    def choices(self) -> tuple[LayerChoice, ...]:
        """Each layer's choice, in layer order."""
        return self.layer_choices or (self.choice,) * (self.hi - self.lo)


@dataclass(frozen=True)
class Candidate:
    """A pipeline the search found, with its objective J (seconds)."""

    stages: tuple[StageSpec, ...]
    micro_batch_size: int
    num_micro_batches: int
    objective_s: float
    search: str = "pdv"
    """which generator produced it (pdv, hierarchy, uniform, pipedream)"""
    order: tuple[int, ...] = ()
    """the device order the stages were cut from (transfers are paired along it)"""
    schedule: Schedule | None = None
    """the candidate's own schedule (an interleaved form); None = the problem's"""


@dataclass(frozen=True, eq=False)  # hashed by identity: the caches key on the problem object
class PlanProblem:
    """Everything a search needs: profiles per device kind, the cluster, the training setup."""

    profiles: Mapping[str, ModelProfile]
    cluster: ClusterArtifact
    global_batch: int
    micro_batch_sizes: tuple[int, ...] = ()
    """allowed micro-batch sizes; empty = the profiles' measured sizes that divide the batch"""
    memory_margin: float = 0.1
    schedule: Schedule = "1F1B"
    time_limit_s: float = 10.0
    """CP-SAT time limit per stage"""
    links: Links | None = None
    """the network the search believes; None = the cluster's measured links"""
    tp_degrees: tuple[int, ...] = field(default=())
    """allowed TP degrees; empty = those every profile measured"""
    allow_fsdp: bool = True
    allow_recompute: bool = True
    virtual_stages: tuple[int, ...] = DEFAULT_VIRTUAL_STAGES
    """chunks per rank group tried as interleaved forms of 1F1B pipelines (pdv.plan.interleave);
    empty = plain pipelines only"""

    @property
    def num_layers(self) -> int:
        """Layers of the model (all profiles agree on this)."""
        return len(next(iter(self.profiles.values())).layers)

    @property
    def sparse_layers(self) -> frozenset[int]:
        """Layers with sparse gradients (a sparse embedding): FSDP cannot shard their stage."""
        return frozenset(i for p in self.profiles.values()
                         for i, layer in enumerate(p.layers) if layer.sparse_grads)

    def holds_sparse(self, lo: int, hi: int) -> bool:
        """Whether layers [lo, hi) hold a layer with sparse gradients."""
        return any(lo <= i < hi for i in self.sparse_layers)

    @property
    def net(self) -> Links:
        """The links the search prices transfers on."""
        return self.links if self.links is not None else self.cluster.links

    def profile_of(self, rank: int) -> ModelProfile:
        """The profile that prices this rank (by its device kind)."""
        return profile_for(self.profiles, self.cluster.devices[rank])

    def kinds(self) -> set[str]:
        """Device kinds present in the cluster."""
        return {d.kind for d in self.cluster.devices}

    def mbs_options(self) -> list[int]:
        """Micro-batch sizes to try: allowed ones that divide the global batch."""
        sizes = self.micro_batch_sizes or tuple(
            sorted(set().union(*(p.micro_batch_sizes for p in self.profiles.values())))
        )
        ok = sorted({m for m in sizes if m >= 1 and self.global_batch % m == 0})
        if not ok:
            raise PdvError(
                f"no micro-batch size in {list(sizes)} divides the global batch "
                f"{self.global_batch}; pass --micro-batch-sizes with a divisor"
            )
        return ok

    def smallest_batch(self) -> int:
        """The smallest micro-batch size every profile measured."""
        return smallest_batch(self.profiles)

    def replica_batch_ok(self, mbs: int, dp: int) -> bool:
        """Whether a replica's share of a micro-batch (mbs/dp samples) is priced from the
        profiles' measurements: not below their smallest size, where a time would extrapolate
        their fit past what was measured (its intercept is least certain there)."""
        return mbs % dp == 0 and mbs // dp >= self.smallest_batch()

    def tp_options(self) -> list[int]:
        """TP degrees every profile can price."""
        common = set.intersection(*(set(p.tp_degrees) for p in self.profiles.values()))
        common.add(1)
        if self.tp_degrees:
            common &= set(self.tp_degrees) | {1}
        return sorted(common)

    def capacity(self, rank: int) -> float:
        """Bytes a rank may use: its memory less the margin."""
        return self.cluster.devices[rank].memory_bytes * (1.0 - self.memory_margin)


def choices_for(problem: PlanProblem, size: int, mbs: int) -> Iterator[LayerChoice]:
    """Stage choices on `size` ranks at micro-batch size mbs (dp must divide mbs, and each
    replica's share must be a profiled size or larger: PlanProblem.replica_batch_ok)."""
    for tp in problem.tp_options():
        if size % tp or not problem.replica_batch_ok(mbs, size // tp):
            continue
        for fsdp in (False, True) if size // tp > 1 and problem.allow_fsdp else (False,):
            for recompute in (False, True) if problem.allow_recompute else (False,):
                yield LayerChoice(tp=tp, fsdp=fsdp, recompute=recompute)


def plan_stage(spec: StageSpec) -> PlanStage:
    """The artifact form of a stage; per-layer entries only where they differ from the stage."""
    ch = spec.choice
    sharding = None
    if spec.layer_choices is not None and any(c != ch for c in spec.layer_choices):
        sharding = list(spec.layer_choices)
    return PlanStage(
        layers=(spec.lo, spec.hi),
        ranks=list(spec.ranks),
        dp=spec.dp,
        tp=ch.tp,
        fsdp=ch.fsdp,
        recompute=ch.recompute,
        layer_sharding=sharding,
    )
