"""The planner's price of a stage: per-layer arrays from the profiles, priced on given ranks.

A stage of layers [lo, hi) on ranks R (dp-major: replica r holds R[r·k:(r+1)·k] for TP degree
k) with micro-batch size m runs each replica on m / dp samples. Per micro-batch it costs

- compute: the slowest device kind of R, each kind's profile at (m/dp, k) scaled by the
  measured matmul speed of its slowest rank (pdv.cost.compute.speed_factor);
  recompute adds one forward to the backward;
- TP (Megatron): two all-reduces of the layer output in forward and two in backward, on the
  slowest replica's ring (pdv.cost.comm);
- transfer: the output of layer hi−1 (m/dp samples per replica) to the next stage and its
  gradient back, over the link between the last rank of R and the first rank of the next stage
  (the DP knows only where the next stage starts; the simulator then prices every replica's
  actual transfers, as pdv.cost.stage does — the two agree for single-rank stages).

FSDP (each layer its own FSDP2 unit): per micro-batch, an all-gather of each layer's params in
the forward and again in the backward, on the replicas' slowest ring.

Per step: the gradient sync over the replicas' slowest ring: an all-reduce of the grads, or with
FSDP a reduce-scatter of each layer's grads (pdv.cost.stage's rule);
then the optimizer step over the rank's parameter shard (the profile's measured optimizer_s
per layer, by shard share, FSDP divides it by dp). `sync` below is that per-step sum.
Memory per rank: pdv.cost.compute.stage_memory_bytes' formula (state, in-flight activations).
The same arrays serve the scalar price (:func:`stage_price`) and the DP's vectorized tables
(:func:`stage_table`), and a test checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pdv.artifacts import Links, ModelProfile
from pdv.cost.comm import ring_link
from pdv.cost.compute import layer_cost, rank_overhead_bytes, speed_factor
from pdv.plan.problem import Choice, PlanProblem, in_flight

__all__ = [
    "LayerArrays",
    "StagePrice",
    "StageTable",
    "layer_arrays",
    "stage_price",
    "stage_table",
    "link",
]

# Megatron-LM: 2 all-reduces of the layer output in a block's forward and 2 in its backward
# (Narayanan et al., 2021, §2.3), as pdv.cost.stage prices them.
TP_ALL_REDUCES = 2


@dataclass(frozen=True)
class LayerArrays:
    """Per-layer numbers of one profile at one per-replica batch and TP degree."""

    fwd: np.ndarray
    bwd: np.ndarray
    params: np.ndarray
    """parameter bytes per rank (TP shard)"""
    state: np.ndarray
    """params + grads + optimizer state per rank (TP shard)"""
    grads: np.ndarray
    act: np.ndarray
    """activation bytes saved for backward per micro-batch"""
    out: np.ndarray
    """output bytes per micro-batch"""
    opt: np.ndarray
    """optimizer step seconds per rank (TP shard), before any FSDP sharding"""


def _arrays(profile: ModelProfile, batch: int, tp: int) -> LayerArrays:
    n = len(profile.layers)
    rows = [layer_cost(profile, i, batch, tp) for i in range(n)]
    full = np.array([max(x.param_bytes, 1) for x in profile.layers], dtype=float)
    params = np.array([c.param_bytes for c in rows], dtype=float)
    ratio = params / full
    grads = np.array([x.grad_bytes for x in profile.layers], dtype=float) * ratio
    opt = np.array([x.optimizer_bytes for x in profile.layers], dtype=float) * ratio
    return LayerArrays(
        fwd=np.array([c.fwd_s for c in rows]),
        bwd=np.array([c.bwd_s for c in rows]),
        params=params,
        state=params + grads + opt,
        grads=grads,
        act=np.array([c.activation_bytes for c in rows], dtype=float),
        out=np.array([c.output_bytes for c in rows], dtype=float),
        opt=np.array([x.optimizer_s or 0.0 for x in profile.layers], dtype=float) * ratio,
    )


_ARRAYS: dict[tuple[int, int, int], tuple[ModelProfile, LayerArrays]] = {}


def layer_arrays(profile: ModelProfile, batch: int, tp: int) -> LayerArrays:
    """Per-layer arrays, cached by profile identity (profiles are frozen)."""
    key = (id(profile), batch, tp)
    hit = _ARRAYS.get(key)
    if hit is None or hit[0] is not profile:
        hit = (profile, _arrays(profile, batch, tp))
        _ARRAYS[key] = hit
    return hit[1]


def link(links: Links, src: int, dst: int) -> tuple[float, float]:
    """(α, β) of one directed link."""
    return links.latency_s[src][dst], links.bandwidth_Bps[src][dst]


@dataclass(frozen=True)
class _Group:
    """What a set of ranks contributes to a stage's price, independent of the layers."""

    kinds: tuple[tuple[str, float, float, float], ...]
    """(kind, speed factor of its slowest rank, capacity of its smallest rank, largest overhead
    bytes of its ranks)"""
    tp_rings: tuple[tuple[float, float], ...]
    """(α, β) of each replica's TP ring, dominated ones dropped (the slowest ring paces)"""
    dp_rings: tuple[tuple[float, float, str], ...]
    """(α, β, kind of its first rank) of each TP position's replica ring"""
    dp: int
    tp: int


def _pareto(rings: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    # Keep only rings that could be the slowest for some message size (max α or min β).
    out = []
    for a, b in sorted(set(rings)):
        if not any(a2 >= a and b2 <= b and (a2, b2) != (a, b) for a2, b2 in rings):
            out.append((a, b))
    return tuple(out)


@lru_cache(maxsize=65536)
def _group_cached(problem: PlanProblem, ranks: tuple[int, ...], tp: int) -> _Group:
    links = problem.net
    dp = len(ranks) // tp
    by_kind: dict[str, tuple[float, float, float]] = {}
    for r in ranks:
        device = problem.cluster.devices[r]
        sf = speed_factor(problem.profile_of(r), device)
        cap = problem.capacity(r)
        over = rank_overhead_bytes(problem.profile_of(r), device)
        old = by_kind.get(device.kind)
        by_kind[device.kind] = (
            (max(sf, old[0]), min(cap, old[1]), max(over, old[2])) if old else (sf, cap, over)
        )
    kinds = tuple((k, sf, cap, over) for k, (sf, cap, over) in sorted(by_kind.items()))
    tp_rings = _pareto([ring_link(links, ranks[r * tp : (r + 1) * tp]) for r in range(dp)])
    dp_rings = tuple(
        sorted(
            {
                (*ring_link(links, ranks[t::tp]), problem.cluster.devices[ranks[t]].kind)
                for t in range(tp)
            }
        )
    )
    return _Group(kinds, tp_rings, dp_rings, dp, tp)


def _group(problem: PlanProblem, ranks: tuple[int, ...], tp: int) -> _Group:
    return _group_cached(problem, tuple(ranks), tp)


def _ring(alpha: float, beta: float, n: int, nbytes: np.ndarray, steps: float) -> np.ndarray:
    # steps·(n−1)/n·S/β + steps·(n−1)·α, with steps 2 for all-reduce, 1 for gather/scatter
    if n <= 1:
        return np.zeros_like(nbytes)
    return steps * ((n - 1) / n * nbytes / beta + (n - 1) * alpha) * (nbytes > 0)


@dataclass(frozen=True)
class StagePrice:
    """One stage priced by the planner, per micro-batch (times) and per step (sync)."""

    fwd_s: float
    bwd_s: float
    send_s: float
    """activations to the next stage and their gradient back, per micro-batch"""
    sync_s: float
    """per step: gradient sync, then the optimizer step"""
    memory_bytes: dict[str, float]
    """peak bytes per device kind of the stage (its smallest-capacity rank of that kind)"""
    capacity_bytes: dict[str, float]

    @property
    def time_s(self) -> float:
        """t: per-micro-batch time of the stage in the objective."""
        return self.fwd_s + self.bwd_s + self.send_s

    @property
    def fits(self) -> bool:
        """Whether every kind's peak stays within its capacity."""
        return all(self.memory_bytes[k] <= self.capacity_bytes[k] for k in self.memory_bytes)


def _kind_arrays(problem: PlanProblem, g: _Group, kind: str, mbs: int) -> LayerArrays:
    return layer_arrays(problem.profiles[kind], mbs // g.dp, g.tp)


def _tp_per_layer(problem: PlanProblem, g: _Group, mbs: int) -> list[np.ndarray]:
    """Forward TP all-reduce seconds per layer, one array per (non-dominated) replica ring."""
    if g.tp < 2:
        return [np.zeros(problem.num_layers)]
    out = np.max([_kind_arrays(problem, g, k[0], mbs).out for k in g.kinds], axis=0)
    return [TP_ALL_REDUCES * _ring(a, b, g.tp, out, 2.0) for a, b in g.tp_rings]


def _sync_terms(problem: PlanProblem, g: _Group, mbs: int, choice: Choice):
    """Per ring: (α-term, bytes-term per layer) of the per-step gradient sync."""
    for alpha, beta, kind in g.dp_rings:
        arr = _kind_arrays(problem, g, kind, mbs)
        yield alpha, beta, arr


def _per_layer(alpha: float, beta: float, n: int, nbytes: np.ndarray,
               layers: np.ndarray) -> np.ndarray:  # fmt: skip
    # One ring all-gather or reduce-scatter per FSDP layer (each its own FSDP2 unit): the bytes
    # of all of them, (n−1) α for each layer that has parameters.
    return (n - 1) / n * nbytes / beta + (n - 1) * alpha * layers


def _sync_of(
    g: _Group, alpha: float, beta: float, grads: np.ndarray, layers: np.ndarray, fsdp: bool
) -> np.ndarray:
    """Per-step gradient sync on one replica ring: an all-reduce, or FSDP's reduce-scatters."""
    if g.dp < 2:
        return np.zeros_like(grads)
    if fsdp:
        return _per_layer(alpha, beta, g.dp, grads, layers)
    return _ring(alpha, beta, g.dp, grads, 2.0)


def _gather_of(
    g: _Group, alpha: float, beta: float, params: np.ndarray, layers: np.ndarray, fsdp: bool
) -> np.ndarray:
    """FSDP's all-gathers in one micro-batch's forward (and again in its backward)."""
    if g.dp < 2 or not fsdp:
        return np.zeros_like(params)
    return _per_layer(alpha, beta, g.dp, params, layers)


def send_pairs(ranks: tuple[int, ...], following: tuple[int, ...]) -> list[tuple[int, int]]:
    """Who sends to whom: the x-th rank of a stage to the x-th device after it in the order.

    That is the simulator's pairing (replica r, TP shard u → the same replica and shard of the
    next stage) whenever the next stage has this stage's layout; the DP does not know the next
    stage's layout yet, so it prices this pairing (as the scalar price does, for agreement).
    """
    return [(s, d) for s, d in zip(ranks, following, strict=False) if s != d]


def send_time(links: Links, pairs: list[tuple[int, int]], nbytes: np.ndarray) -> np.ndarray:
    """Activations over every pair and gradients back, each direction paced by its worst pair."""
    fwd = np.zeros_like(nbytes)
    bwd = np.zeros_like(nbytes)
    for s, d in pairs:
        a1, b1 = link(links, s, d)
        a2, b2 = link(links, d, s)
        fwd = np.maximum(fwd, a1 + nbytes / b1)
        bwd = np.maximum(bwd, a2 + nbytes / b2)
    return np.where(nbytes > 0, fwd + bwd, 0.0)


def _send(
    links: Links, ranks: tuple[int, ...], following: tuple[int, ...] | None, nbytes: float
) -> float:
    if not following or nbytes <= 0:
        return 0.0
    return float(send_time(links, send_pairs(ranks, following), np.array([nbytes]))[0])


def stage_price(
    problem: PlanProblem,
    ranks: tuple[int, ...],
    lo: int,
    hi: int,
    mbs: int,
    choice: Choice,
    stages_to_end: int,
    num_micro: int,
    following: tuple[int, ...] | None,
) -> StagePrice:
    """Price one stage with one choice for all its layers (the reference for the DP tables)."""
    g = _group(problem, ranks, choice.tp)
    n_in = in_flight(problem.schedule, stages_to_end, num_micro)
    sl = slice(lo, hi)
    fwd_c = bwd_c = opt_c = 0.0
    memory: dict[str, float] = {}
    capacity: dict[str, float] = {}
    out_last = 0.0
    shards = g.dp if choice.fsdp and g.dp > 1 else 1
    for kind, sf, cap, overhead in g.kinds:
        arr = _kind_arrays(problem, g, kind, mbs)
        fwd_c = max(fwd_c, sf * float(arr.fwd[sl].sum()))
        opt_c = max(opt_c, sf * float(arr.opt[sl].sum()) / shards)
        bwd_c = max(bwd_c, sf * float((arr.bwd[sl] + arr.fwd[sl] * choice.recompute).sum()))
        state = float(arr.state[sl].sum()) / (g.dp if choice.fsdp and g.dp > 1 else 1)
        if choice.recompute:
            live = float(arr.out[sl].sum()) * n_in + float(arr.act[sl].max())
        else:
            live = float(arr.act[sl].sum()) * n_in
        memory[kind] = overhead + state + live
        capacity[kind] = cap
        out_last = max(out_last, float(arr.out[hi - 1]))
    tp_f = max(float(t[sl].sum()) for t in _tp_per_layer(problem, g, mbs))
    tp_b = tp_f * (2 if choice.recompute else 1)  # recompute repeats the forward's all-reduces
    sync = gather = 0.0
    for alpha, beta, arr in _sync_terms(problem, g, mbs, choice):
        grads = np.array([arr.grads[sl].sum()])
        params = np.array([arr.params[sl].sum()])
        layers = np.array([float((arr.params[sl] > 0).sum())])
        sync = max(sync, float(_sync_of(g, alpha, beta, grads, layers, choice.fsdp)[0]))
        gather = max(gather, float(_gather_of(g, alpha, beta, params, layers, choice.fsdp)[0]))
    send = _send(problem.net, ranks, following, out_last)
    return StagePrice(fwd_c + tp_f + gather, bwd_c + tp_b + gather, send, sync + opt_c, memory,
                      capacity)


@dataclass(frozen=True)
class StageTable:
    """A group's prices for every layer range: index [lo, hi] (hi exclusive), inf if empty."""

    time: np.ndarray
    """fwd + bwd per micro-batch (without the transfer, which depends on the next group)"""
    sync: np.ndarray
    """per step: gradient sync, then the optimizer step"""
    max_in_flight: np.ndarray
    """the most in-flight micro-batches that fit in memory (−1 if not even the state fits)"""
    out: np.ndarray
    """bytes sent to the next stage per replica, by end layer hi"""


def _pairwise(prefix: np.ndarray) -> np.ndarray:
    return prefix[None, :] - prefix[:, None]


def stage_table(
    problem: PlanProblem,
    ranks: tuple[int, ...],
    mbs: int,
    choice: Choice,
    bounds: np.ndarray | None = None,
) -> StageTable:
    """Vectorized :func:`stage_price` for every [lo, hi) between the given layer boundaries.

    Index [x, y] of each table is the stage [bounds[x], bounds[y]); bounds default to every
    layer boundary 0..L.
    """
    g = _group(problem, ranks, choice.tp)
    b = np.arange(problem.num_layers + 1) if bounds is None else np.asarray(bounds)
    n = len(b)

    def pair(v: np.ndarray) -> np.ndarray:
        c = _cum(v)[b]
        return c[None, :] - c[:, None]

    fwd_c = np.zeros((n, n))
    bwd_c = np.zeros((n, n))
    opt_c = np.zeros((n, n))
    kmax = np.full((n, n), np.inf)
    out = np.zeros(n)
    shards = g.dp if choice.fsdp and g.dp > 1 else 1
    for kind, sf, cap, overhead in g.kinds:
        arr = _kind_arrays(problem, g, kind, mbs)
        fwd_c = np.maximum(fwd_c, sf * pair(arr.fwd))
        opt_c = np.maximum(opt_c, sf * pair(arr.opt) / shards)
        bwd_c = np.maximum(bwd_c, sf * pair(arr.bwd + arr.fwd * choice.recompute))
        state = pair(arr.state) / (g.dp if choice.fsdp and g.dp > 1 else 1)
        if choice.recompute:
            per = pair(arr.out)
            room = cap - overhead - state - _range_max(arr.act, b)
        else:
            per = pair(arr.act)
            room = cap - overhead - state
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(per > 0, np.floor(room / np.where(per > 0, per, 1.0)), np.inf)
        kmax = np.minimum(kmax, np.where(room < 0, -1.0, k))
        out = np.maximum(out, np.concatenate([[0.0], arr.out])[b])
    tp_f = np.max([pair(t) for t in _tp_per_layer(problem, g, mbs)], axis=0)
    time = fwd_c + bwd_c + tp_f * (3 if choice.recompute else 2)
    sync = np.zeros((n, n))
    gather = np.zeros((n, n))
    for alpha, beta, arr in _sync_terms(problem, g, mbs, choice):
        grads, params = pair(arr.grads), pair(arr.params)
        layers = pair((arr.params > 0).astype(float))
        sync = np.maximum(sync, _sync_of(g, alpha, beta, grads, layers, choice.fsdp))
        gather = np.maximum(gather, _gather_of(g, alpha, beta, params, layers, choice.fsdp))
    time = time + 2 * gather
    valid = np.triu(np.ones((n, n), dtype=bool), 1)
    time = np.where(valid, time, np.inf)
    return StageTable(time, sync + opt_c, np.where(valid, kmax, -1.0), out)


def _cum(v: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(v)])


def _range_max(act: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """[x, y] = the largest act over layers [bounds[x], bounds[y])."""
    n = len(bounds)
    biggest = np.zeros((n, n))
    for x in range(n - 1):
        run = np.concatenate([[0.0], np.maximum.accumulate(act[bounds[x] :])])
        biggest[x, x + 1 :] = run[bounds[x + 1 :] - bounds[x]]
    return biggest
