"""The planning problem, the choices a stage can make, and the planner's objective.

Every search in pdv.plan takes a :class:`PlanProblem` and returns ranked candidates, so the
stage DP, the CP-SAT sharding and the baselines are interchangeable (STYLE habit 5).

The planner's objective for a pipeline of stages with per-micro-batch times ``t_s`` (forward +
backward + activation and gradient transfer to the next stage) and per-step gradient sync
``sync_s``, with M micro-batches, is

    J = Σ_s t_s + max_s ((M − 1)·t_s + sync_s)

Alpa's inter-op objective is Σ t + (M−1)·max t (Zheng et al., 2022, eq. 2); pdv adds the
transfers to t and lets the bottleneck stage carry its own gradient sync, which keeps a single
max so the max-stage-cap enumeration stays exact. The simulator (pdv.cost.simulate) evaluates
the chosen plans on the measured matrix; J only ranks candidates inside the search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pdv.artifacts import ClusterArtifact, Links, ModelProfile
from pdv.errors import PdvError

__all__ = ["Choice", "PlanProblem", "Candidate", "StageSpec", "objective", "in_flight"]


@dataclass(frozen=True, order=True)
class Choice:
    """How a stage runs its layers on its g ranks: TP degree k (dp = g / k), FSDP, recompute."""

    tp: int = 1
    fsdp: bool = False
    recompute: bool = False


@dataclass(frozen=True)
class StageSpec:
    """One stage as the search sees it: layers [lo, hi) on `ranks` with one choice."""

    lo: int
    hi: int
    ranks: tuple[int, ...]
    choice: Choice
    layer_choices: tuple[Choice, ...] | None = None
    """per-layer choices where the sharding solver made them differ inside the stage"""

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the stage."""
        return len(self.ranks) // self.choice.tp


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


@dataclass(frozen=True, eq=False)  # hashed by identity: the caches key on the problem object
class PlanProblem:
    """Everything a search needs: profiles per device kind, the cluster, the training setup."""

    profiles: Mapping[str, ModelProfile]
    cluster: ClusterArtifact
    global_batch: int
    micro_batch_sizes: tuple[int, ...] = ()
    """allowed micro-batch sizes; empty = the profiles' measured sizes that divide the batch"""
    memory_margin: float = 0.1
    schedule: str = "1F1B"
    time_limit_s: float = 10.0
    """CP-SAT time limit per stage"""
    links: Links | None = None
    """the network the search believes; None = the cluster's measured links"""
    tp_degrees: tuple[int, ...] = field(default=())
    """allowed TP degrees; empty = those every profile measured"""
    allow_fsdp: bool = True
    allow_recompute: bool = True

    @property
    def num_layers(self) -> int:
        """Layers of the model (all profiles agree on this)."""
        return len(next(iter(self.profiles.values())).layers)

    @property
    def net(self) -> Links:
        """The links the search prices transfers on."""
        return self.links if self.links is not None else self.cluster.links

    def profile_of(self, rank: int) -> ModelProfile:
        """The profile that prices this rank (by its device kind)."""
        kind = self.cluster.devices[rank].kind
        if kind not in self.profiles:
            raise PdvError(
                f"no model profile for device kind {kind!r} (rank {rank}); profile the model "
                f"on that kind, or pass one profile per kind: {sorted(self.kinds())}"
            )
        return self.profiles[kind]

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


def in_flight(schedule: str, stages_to_end: int, num_micro: int) -> int:
    """Micro-batches whose activations a stage holds: all for GPipe, p − s for 1F1B."""
    if schedule.lower() == "gpipe":
        return num_micro
    return max(1, min(num_micro, stages_to_end))


def max_stages(schedule: str, num_micro: int, limit: int) -> int:
    """Most pipeline stages a schedule can run with num_micro micro-batches (at most `limit`).

    torch.distributed.pipelining's 1F1B refuses fewer micro-batches than stages; GPipe does not.
    """
    return limit if schedule.lower() == "gpipe" else min(limit, num_micro)


def objective(times: Sequence[float], syncs: Sequence[float], num_micro: int) -> float:
    """J = Σ t + max((M − 1)·t + sync) (see the module docstring)."""
    return sum(times) + max((num_micro - 1) * t + s for t, s in zip(times, syncs, strict=True))
