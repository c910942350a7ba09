"""The planner's objective J, and the price of a stage on the ranks a search gives it.

For a pipeline of stages with per-micro-batch times ``t_s`` (forward + backward + activation
and gradient transfer to the next stage) and per-step terms ``sync_s`` (gradient sync, then the
optimizer step), with M micro-batches,

    J = Σ_s t_s + max_s ((M − 1)·t_s + sync_s)

Alpa's inter-op objective is Σ t + (M−1)·max t (Zheng et al., 2022, eq. 2); pdv adds the
transfers to t and lets the bottleneck stage carry its own per-step terms, which keeps a single
max so the max-stage-cap enumeration stays exact. The simulator (pdv.cost.simulate) evaluates
the chosen plans on the measured matrix; J only ranks candidates inside the search.

A stage is priced by pdv.cost.terms, the simulator's own pricing, on a reduced view of its
ranks that prices the same: per device kind its slowest rank, largest overhead and smallest
capacity; of the replicas' TP rings those that can be the slowest for some size; each distinct
replica ring. The transfer to the next stage goes over the link between the x-th rank of the
stage and the x-th device after it in the order (:func:`send_pairs`): the search does not know
the next stage's layout yet; the simulator then prices every replica's actual transfers (the
two agree for stages of one rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pdv.artifacts import LayerChoice
from pdv.cost.comm import Ring, pairs_time, ring_of
from pdv.cost.compute import rank_overhead_bytes, rank_overheads, speed_factor
from pdv.cost.schedules import in_flight
from pdv.cost.stage import boundary_tensors
from pdv.cost.terms import (
    LayerTerms,
    RankView,
    RingView,
    StageGroup,
    StagePrice,
    layer_terms,
    price_layers,
    price_ranges,
)
from pdv.plan.problem import PlanProblem, StageSpec

__all__ = [
    "objective",
    "stage_group",
    "terms_of",
    "PlannedStage",
    "StageTable",
    "stage_price",
    "stage_table",
    "send_pairs",
    "followers",
    "stage_prices",
    "pipeline_objective",
]


def objective(times: Sequence[float], syncs: Sequence[float], num_micro: int) -> float:
    """J = Σ t + max((M − 1)·t + sync) (see the module docstring)."""
    return sum(times) + max((num_micro - 1) * t + s for t, s in zip(times, syncs, strict=True))


def _pareto(rings: list[Ring]) -> list[Ring]:
    # Keep only rings that could be the slowest for some message size (max α or min β).
    out = []
    for r in sorted(set(rings)):
        if not any(o.alpha >= r.alpha and o.beta <= r.beta and o != r for o in rings):
            out.append(r)
    return out


@lru_cache(maxsize=65536)
def _group(problem: PlanProblem, ranks: tuple[int, ...], tp: int) -> StageGroup:
    links = problem.net
    dp = len(ranks) // tp
    worst: dict[str, tuple[float, ...]] = {}
    for r in ranks:
        device = problem.cluster.devices[r]
        profile = problem.profile_of(r)
        # capacity and the sync's two bursts (a line that rises sooner): the smallest; every
        # other field: the largest of the kind's ranks
        *own, burst, long_burst, long_excess = rank_overheads(device)
        mine = (speed_factor(profile, device), rank_overhead_bytes(profile, device),
                -problem.capacity(r), *own, -burst, -long_burst, long_excess)
        old = worst.get(device.kind)
        worst[device.kind] = tuple(map(max, old, mine)) if old else mine
    worst = {k: (v[0], v[1], -v[2], *v[3:-3], -v[-3], -v[-2], v[-1])
             for k, v in worst.items()}
    kinds = sorted(worst)
    tp_rings = _pareto([ring_of(links, ranks[r * tp : (r + 1) * tp]) for r in range(dp)])
    dp_rings = sorted({RingView(ring_of(links, ranks[t::tp]),
                                (problem.cluster.devices[ranks[t]].kind,)) for t in range(tp)})
    return StageGroup(
        ranks=tuple(RankView(k, *worst[k]) for k in kinds),
        tp_rings=tuple(RingView(ring, tuple(kinds)) for ring in tp_rings),
        dp_rings=tuple(dp_rings),
        tp=tp,
        dp=dp,
    )


def stage_group(problem: PlanProblem, ranks: Sequence[int], tp: int) -> StageGroup:
    """The reduced view of a stage's ranks at TP degree tp (see the module docstring)."""
    return _group(problem, tuple(ranks), tp)


@lru_cache(maxsize=65536)
def _terms(problem: PlanProblem, group: StageGroup, replica_batch: int,
           choice: LayerChoice) -> LayerTerms:  # fmt: skip
    return layer_terms(problem.profiles, group, replica_batch, choice)


def terms_of(problem: PlanProblem, group: StageGroup, mbs: int, choice: LayerChoice) -> LayerTerms:
    """Every layer's terms under one choice on the group, at micro-batch size mbs (cached)."""
    return _terms(problem, group, mbs // group.dp, choice)


@dataclass(frozen=True)
class PlannedStage:
    """One stage priced for the objective: its cost-model price, its transfer, its budget."""

    price: StagePrice
    send_s: float
    """activations to the next stage and their gradient back, per micro-batch"""
    in_flight: int
    """micro-batches whose activations it holds at its peak"""
    group: StageGroup

    @property
    def fwd_s(self) -> float:
        """One micro-batch's forward, collectives included."""
        return float(self.price.fwd_s)

    @property
    def bwd_s(self) -> float:
        """One micro-batch's backward (with recompute), collectives included."""
        return float(self.price.bwd_s)

    @property
    def time_s(self) -> float:
        """t: per-micro-batch time of the stage in the objective."""
        return float(self.price.fwd_s + self.price.bwd_s) + self.send_s

    @property
    def sync_s(self) -> float:
        """Per step: the gradient sync, then the optimizer step."""
        return float(self.price.grad_sync_s + self.price.optimizer_s)

    @property
    def memory_bytes(self) -> dict[str, float]:
        """Peak bytes per device kind (its tightest rank's budget is capacity_bytes)."""
        peak = self.price.peak_bytes(self.in_flight)
        return {v.kind: float(b) for v, b in zip(self.group.ranks, peak, strict=True)}

    @property
    def capacity_bytes(self) -> dict[str, float]:
        """Bytes the tightest rank of each kind may use."""
        return {v.kind: v.capacity_bytes for v in self.group.ranks}

    @property
    def fits(self) -> bool:
        """Whether every kind's peak stays within its capacity."""
        cap = self.capacity_bytes
        return all(b <= cap[k] for k, b in self.memory_bytes.items())


def send_pairs(ranks: Sequence[int], following: Sequence[int]) -> list[tuple[int, int]]:
    """Who sends to whom: the x-th rank of a stage to the x-th device after it in the order.

    That is the simulator's pairing (replica r, TP shard u → the same replica and shard of the
    next stage) whenever the next stage has this stage's layout.
    """
    return [(s, d) for s, d in zip(ranks, following, strict=False) if s != d]


def stage_price(
    problem: PlanProblem,
    spec: StageSpec,
    mbs: int,
    stages_to_end: int,
    num_micro: int,
    following: Sequence[int] | None,
) -> PlannedStage:
    """Price one stage, each layer with its own choice, for the objective."""
    return _stage_price(problem, spec, mbs, stages_to_end, num_micro,
                        tuple(following) if following else None)  # fmt: skip


@lru_cache(maxsize=65536)  # the DP's candidates share most of their stages
def _stage_price(problem: PlanProblem, spec: StageSpec, mbs: int, stages_to_end: int,
                 num_micro: int, following: tuple[int, ...] | None) -> PlannedStage:  # fmt: skip
    group = stage_group(problem, spec.ranks, spec.choice.tp)
    choices = spec.choices()
    terms = {c: terms_of(problem, group, mbs, c) for c in dict.fromkeys(choices)}
    price = price_layers(problem.profiles, group, mbs // group.dp, spec.lo, choices, terms,
                         num_micro=num_micro)
    send = 0.0
    if following and price.output_bytes > 0:
        nbytes = np.array([float(price.output_bytes)])
        ahead, back = boundary_tensors(problem.profiles, spec.hi - 1)
        send = float(pairs_time(problem.net, send_pairs(spec.ranks, following), nbytes,
                                ahead, back)[0])
    return PlannedStage(price, send, in_flight(problem.schedule, stages_to_end, num_micro), group)


@dataclass(frozen=True)
class StageTable:
    """A group's prices for every layer range: index [lo, hi] (hi exclusive), inf if empty."""

    time: np.ndarray
    """fwd + bwd per micro-batch (without the transfer, which depends on the next group)"""
    sync: np.ndarray
    """per step: gradient sync, then the optimizer step (0 if empty)"""
    max_in_flight: np.ndarray
    """the most in-flight micro-batches that fit in memory (−1 if not even the state fits)"""
    out: np.ndarray
    """bytes sent to the next stage per replica, by end layer hi"""


def stage_table(
    problem: PlanProblem,
    ranks: Sequence[int],
    mbs: int,
    choice: LayerChoice,
    bounds: np.ndarray | None = None,
) -> StageTable:
    """:func:`stage_price` of every [lo, hi) between the given layer boundaries at once.

    Index [x, y] of each table is the stage [bounds[x], bounds[y]); bounds default to every
    layer boundary 0..L.
    """
    b = np.arange(problem.num_layers + 1) if bounds is None else np.asarray(bounds)
    return _table(problem, stage_group(problem, ranks, choice.tp), mbs, choice,
                  tuple(int(x) for x in b))  # fmt: skip


@lru_cache(maxsize=4096)  # the DP's device orders and layouts share most of their groups
def _table(problem: PlanProblem, group: StageGroup, mbs: int, choice: LayerChoice,
           bounds: tuple[int, ...]) -> StageTable:  # fmt: skip
    b = np.asarray(bounds)
    terms = terms_of(problem, group, mbs, choice)
    price = price_ranges(problem.profiles, group, mbs // group.dp, choice, b, terms,
                         num_micro=problem.global_batch // mbs)
    cap = np.array([v.capacity_bytes for v in group.ranks])[:, None, None]
    room = cap - price.static_bytes - price.transient_bytes
    per = price.live_bytes
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(per > 0, np.floor(room / np.where(per > 0, per, 1.0)), np.inf)
    kmax = np.min(np.where(room < 0, -1.0, k), axis=0)
    valid = np.triu(np.ones((len(b), len(b)), dtype=bool), 1)
    if choice.fsdp:
        for layer in problem.sparse_layers:  # [b[x], b[y]) holds it: FSDP cannot shard it
            valid &= ~((b[:, None] <= layer) & (layer < b[None, :]))
    # Cells below the diagonal are no stage; they hold neutral values so that comparing two
    # tables (the DP's dominance test) looks at real stages only.
    time = np.where(valid, price.fwd_s + price.bwd_s, np.inf)
    sync = np.where(valid, price.grad_sync_s + price.optimizer_s, 0.0)
    table = StageTable(time, sync, np.where(valid, kmax, -1.0), price.output_bytes[0])
    for arr in (table.time, table.sync, table.max_in_flight, table.out):
        arr.flags.writeable = False  # cached and shared: a caller must not change it
    return table


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
) -> list[PlannedStage]:
    """Every stage priced for the objective, with its neighbours and in-flight count."""
    M = problem.global_batch // mbs
    return [
        stage_price(problem, spec, mbs, len(stages) - s, M, nxt)
        for s, (spec, nxt) in enumerate(zip(stages, followers(stages, order), strict=True))
    ]


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
