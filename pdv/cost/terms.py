"""The one pricing of a stage: each layer's cost terms, and how a stage composes them.

:func:`layer_terms` is the only place where a layer's time, memory and communication are
derived from the profiles and the links. Every consumer composes its output and restates
nothing:

- the simulator (pdv.cost.stage) sums the terms over a stage's layers for every rank;
- the stage DP (pdv.plan.objective.stage_table) takes prefix sums of them, every layer range at
  once (:func:`price_ranges`);
- CP-SAT (pdv.plan.sharding) takes them as the coefficients of its per-layer choices;
- all of them turn range sums into a stage's price with :func:`compose`.

A stage of layers [lo, hi) on ranks R (dp-major: replica r holds R[r·k:(r+1)·k] for TP degree
k) with micro-batch size m runs each replica on m / dp samples. Per layer and micro-batch:

- compute: the profile of the rank's device kind at (m/dp, layer tp), times the rank's measured
  speed (pdv.cost.compute.speed_factor); recompute runs the forward again before the backward;
- TP (Megatron): two all-reduces of the layer output in forward and two in backward
  (Narayanan et al., 2021, §2.3), on the replica's ring; recompute repeats the forward's; a
  layer the model's TP plan leaves whole runs replicated, without collectives;
- FSDP (each layer its own FSDP2 unit), as torch.distributed.pipelining runs it (and
  ``pdv run``'s own executor alike): a forward reshards the layer after itself, a backward
  leaves it unsharded and its gradient unsharded and unsynced until the step's last backward.
  So an op all-gathers the layer when the stage's previous op was a forward or there was
  none — under GPipe and 1F1B, M + 1 all-gathers per step of M micro-batches (counted in the
  runs: 2, 3 and 5 per layer at M = 1, 2, 4), not 2M. They are priced in every backward and
  once per step; the gradients' reduce-scatter once per step. FSDP2's own work per unit
  besides the collectives (hooks, copies into and out of the collectives' buffers,
  resharding), as each rank measured it (:class:`RankView`), goes with them: into the
  rank's backward, and per step into its optimizer term;
- memory: parameters, gradients and optimizer state (FSDP: the rank's 1/dp of the parameters
  and optimizer state, plus the whole layer's parameters and gradients, unsharded from a
  backward until the step's reduce-scatter); the activations one in-flight micro-batch keeps
  until its backward (with recompute only the layer's input, plus its full activations while
  it is recomputed), and the largest backward's own peak above that (its gradients'
  temporaries, measured by the profile): the transient.

Per stage and micro-batch, besides its layers: the pipeline schedule's own work on each rank
(receive buffers, autograd calls, the loss call), and per step zero_grad and the schedule's
work outside its micro-batches — each rank's measured RankOverheads (:class:`RankView`),
added in :func:`compose` before the maximum over the ranks.

Per step: the gradient sync on each replica ring — one all-reduce of the stage's plain
gradients, a reduce-scatter of each FSDP layer's, and what its first collective pays coming
from the last backward rather than from another collective (each rank's measured
RankOverheads.sync_after_compute_s, the slowest rank's), and the plain replicas' two passes
over their flat gradient buffer per all-reduced byte (RankOverheads.grad_passes_s_per_byte,
the slowest rank's) — then the optimizer step over the rank's parameter shard (the profile's
measured step by shard share, 1/dp of it under FSDP).

A stage runs at the pace of its slowest rank and its slowest ring: each time is the largest
over the ranks (or rings) of its sum over the layers. A new per-layer term is one field of
:class:`LayerTerms` and one line of :func:`layer_terms` (and of :func:`compose` where it enters
a stage's time); a new per-step term is one line of :func:`compose`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from pdv.artifacts import LayerChoice, ModelProfile
from pdv.cost.comm import Ring, all_gather_time, all_reduce_time, reduce_scatter_time
from pdv.cost.compute import profile_arrays, shared_places

__all__ = [
    "TP_ALL_REDUCES",
    "RankView",
    "RingView",
    "StageGroup",
    "LayerTerms",
    "StagePrice",
    "layer_terms",
    "price_layers",
    "sync_after_compute",
    "price_ranges",
    "compose",
    "ONE_COPY",
]

TP_ALL_REDUCES = 2
"""all-reduces of the layer output in a Megatron-LM block's forward (after attention, after the
MLP), and their conjugates in its backward (Narayanan et al., 2021, §2.3)"""


class RankView(NamedTuple):
    """A rank as a stage's costs see it (the planner: the worst of one device kind's ranks)."""

    kind: str
    """device kind: the profile that prices it"""
    speed: float
    """time multiplier against the profiled device (pdv.cost.compute.speed_factor)"""
    overhead_bytes: float
    """constant bytes besides the model (pdv.cost.compute.rank_overhead_bytes)"""
    capacity_bytes: float
    """bytes the rank may use"""
    schedule_fwd_s: float = 0.0
    """per micro-batch forward: the pipeline schedule's own work on the rank, besides the
    layers (RankOverheads.fwd_s, measured by ``pdv profile cluster``; 0 where unmeasured)"""
    schedule_bwd_s: float = 0.0
    """per micro-batch backward: the same (RankOverheads.bwd_s)"""
    schedule_step_s: float = 0.0
    """per step: zero_grad and the schedule's work outside its micro-batches
    (RankOverheads.step_s)"""
    fsdp_gather_a_s: float = 0.0
    """FSDP's own work per unit and gathering op besides the all-gather: a + b·(unit bytes)
    (RankOverheads.fsdp_gather; 0 where unmeasured)"""
    fsdp_gather_b_s: float = 0.0
    """seconds per byte of the unit"""
    fsdp_scatter_a_s: float = 0.0
    """FSDP's own work per unit and step besides the reduce-scatter: a + b·(unit bytes)
    (RankOverheads.fsdp_reduce_scatter)"""
    fsdp_scatter_b_s: float = 0.0
    """seconds per byte of the unit"""
    sync_after_compute_s: float = 0.0
    """per step of a stage with replicas: the gradient sync's excess coming from compute
    (RankOverheads.sync_after_compute_s; 0 where unmeasured)"""
    grad_passes_s_per_byte: float = 0.0
    """per step of a stage with plain replicas, per all-reduced gradient byte: the flat
    buffer's zeroing and division (RankOverheads.grad_passes_s_per_byte; 0 where unmeasured)"""
    sync_burst_s: float = 0.0
    """the compute before the rounds sync_after_compute_s was measured after
    (RankOverheads.sync_after_long_compute; 0 where unmeasured: the excess does not grow)"""
    sync_long_burst_s: float = 0.0
    """a longer compute before the sync"""
    sync_long_excess_s: float = 0.0
    """the sync's excess after the longer compute"""


class RingView(NamedTuple):
    """A ring the stage's collectives run on, and the device kinds whose bytes it moves."""

    ring: Ring
    kinds: tuple[str, ...]
    """the largest of these kinds' per-layer bytes is moved (the kinds of one model agree)"""


@dataclass(frozen=True)
class StageGroup:
    """A stage's ranks as its costs see them: who computes, and the rings it communicates on."""

    ranks: tuple[RankView, ...]
    tp_rings: tuple[RingView, ...]
    """each replica's TP group"""
    dp_rings: tuple[RingView, ...]
    """each TP position's replica ring"""
    tp: int
    dp: int


@dataclass(frozen=True)
class LayerTerms:
    """Every layer of the model under one choice on one stage group.

    Row = rank view (the first group of fields) or ring (tp_*: the TP rings; the rest: the
    replica rings); column = layer. Seconds per micro-batch unless marked per step; bytes per
    rank.
    """

    fwd_s: np.ndarray
    bwd_s: np.ndarray
    """backward, and the forward again under recompute"""
    optimizer_s: np.ndarray
    """per step: the optimizer step over the rank's parameter shard"""
    state_bytes: np.ndarray
    """parameters, gradients and optimizer state held by the rank"""
    live_bytes: np.ndarray
    """kept by each in-flight micro-batch until its backward"""
    transient_bytes: np.ndarray
    """held during the layer's backward, on top of what is live: its gradients' temporaries,
    and under recompute the activations made again (a stage holds its largest): not summed"""
    output_bytes: np.ndarray
    """the layer's output: what the next stage receives if the stage ends here"""
    tp_fwd_s: np.ndarray
    tp_bwd_s: np.ndarray
    gather_s: np.ndarray
    """FSDP all-gather of the layer: in every micro-batch's backward and once more per step"""
    reduce_scatter_s: np.ndarray
    """per step: FSDP reduce-scatter of the layer's gradients"""
    dp_grad_bytes: np.ndarray
    """per step: plain gradients, all-reduced in one call for the whole stage"""


_FIELDS = tuple(f.name for f in fields(LayerTerms))


def layer_terms(
    profiles: Mapping[str, ModelProfile],
    group: StageGroup,
    replica_batch: int,
    choice: LayerChoice,
) -> LayerTerms:
    """Every layer's terms under one choice on one stage group (see the module docstring)."""
    fsdp = choice.fsdp and group.dp > 1
    rows: dict[str, list[np.ndarray]] = {name: [] for name in _FIELDS}
    for view in group.ranks:
        a = profile_arrays(profiles[view.kind], replica_batch, choice.tp)
        fwd = a.fwd * view.speed
        state = a.params + a.grads + a.optimizer_bytes
        step = a.optimizer_s * view.speed
        own: np.ndarray | float = 0.0
        if fsdp:  # FSDP2: parameters, optimizer state and step sharded over the replicas,
            # and the unsharded parameters and gradients held between backwards (the docstring)
            state = (a.params + a.optimizer_bytes) / group.dp + a.params + a.grads
            # FSDP2's own work per unit (hooks, copies, resharding): in each backward (the op
            # that gathers), and per step one more gathering op and the reduce-scatter's side.
            # A layer without parameters is no unit of its own.
            unit = a.params > 0
            own = (view.fsdp_gather_a_s + view.fsdp_gather_b_s * a.params) * unit
            step = step / group.dp + own + (view.fsdp_scatter_a_s
                                            + view.fsdp_scatter_b_s * a.grads) * unit
        rows["fwd_s"].append(fwd)
        rows["bwd_s"].append(a.bwd * view.speed + (fwd if choice.recompute else 0.0) + own)
        rows["optimizer_s"].append(step)
        rows["state_bytes"].append(state)
        rows["live_bytes"].append(a.outputs if choice.recompute else a.activations)
        # a layer's backward holds its gradients' temporaries on top (recomputed: on top of
        # the activations it made again)
        rows["transient_bytes"].append(a.activations * choice.recompute + a.backward)
        rows["output_bytes"].append(a.outputs)
    for rv in group.tp_rings:
        out = _moved(profiles, rv, replica_batch, choice.tp, "outputs")
        # Only layers the TP plan splits communicate; one it leaves whole (an embedding, a
        # head) runs replicated on every shard of the group (its parameter share stays 1).
        split = _moved(profiles, rv, replica_batch, choice.tp, "shard") < 1
        tp = TP_ALL_REDUCES * all_reduce_time(rv.ring, out) * (choice.tp > 1) * split
        rows["tp_fwd_s"].append(tp)
        rows["tp_bwd_s"].append(tp + (tp if choice.recompute else 0.0))
    for rv in group.dp_rings:
        params = _moved(profiles, rv, replica_batch, choice.tp, "params")
        grads = _moved(profiles, rv, replica_batch, choice.tp, "grads")
        rows["gather_s"].append(all_gather_time(rv.ring, params) * fsdp)
        rows["reduce_scatter_s"].append(reduce_scatter_time(rv.ring, grads) * fsdp)
        rows["dp_grad_bytes"].append(grads * (not fsdp))
    return LayerTerms(**{k: np.array(v) for k, v in rows.items()})


def _moved(profiles: Mapping[str, ModelProfile], rv: RingView, replica_batch: int, tp: int,
           what: str) -> np.ndarray:  # fmt: skip
    moved = [getattr(profile_arrays(profiles[k], replica_batch, tp), what) for k in rv.kinds]
    return moved[0] if len(moved) == 1 else np.max(moved, axis=0)


@dataclass(frozen=True)
class StagePrice:
    """A stage's price, composed from its layers' terms by :func:`compose`.

    Each field is a float for one stage or, from :func:`price_ranges`, an (n, n) array over
    layer ranges; the *_bytes fields have one row per rank view first.
    """

    compute_fwd_s: np.ndarray
    compute_bwd_s: np.ndarray
    tp_fwd_s: np.ndarray
    tp_bwd_s: np.ndarray
    gather_s: np.ndarray
    """one all-gather of the stage's FSDP layers (slowest ring): in each backward, and once
    per step within grad_sync_s"""
    grad_sync_s: np.ndarray
    """per step: the slowest replica ring's all-reduce and reduce-scatters, and the step's one
    all-gather beyond the backwards' (the first forward's)"""
    optimizer_s: np.ndarray
    """per step, after the sync: the slowest rank's optimizer step and per-step schedule work"""
    static_bytes: np.ndarray
    """overhead, parameters, gradients, optimizer state"""
    live_bytes: np.ndarray
    """per in-flight micro-batch"""
    transient_bytes: np.ndarray
    output_bytes: np.ndarray
    """the boundary tensor to the next stage, per micro-batch and replica"""

    @property
    def collective_fwd_s(self) -> np.ndarray:
        """The collectives inside one forward: TP all-reduces."""
        return self.tp_fwd_s

    @property
    def collective_bwd_s(self) -> np.ndarray:
        """The collectives inside one backward: TP all-reduces and FSDP all-gathers."""
        return self.tp_bwd_s + self.gather_s

    @property
    def fwd_s(self) -> np.ndarray:
        """One micro-batch's forward: the slowest rank's compute and the slowest rings."""
        return self.compute_fwd_s + self.collective_fwd_s

    @property
    def bwd_s(self) -> np.ndarray:
        """One micro-batch's backward (with recompute), collectives included."""
        return self.compute_bwd_s + self.collective_bwd_s

    def peak_bytes(self, in_flight: int) -> np.ndarray:
        """Per rank view: peak bytes with this many micro-batches in flight."""
        return self.static_bytes + self.live_bytes * in_flight + self.transient_bytes


def compose(group: StageGroup, sums: Mapping[str, np.ndarray], num_micro: int) -> StagePrice:
    """A stage's price from its layers' terms summed (rows first) over its layers.

    ``sums`` has one entry per :class:`LayerTerms` field: summed over the layers, except
    transient_bytes (the largest) and output_bytes (the last layer's); state_bytes includes the
    rank's overhead. The stage runs at the pace of its slowest rank and slowest ring; its sync
    comes after its ``num_micro`` micro-batches' compute.
    """
    def per_rank(field: str, like: np.ndarray) -> np.ndarray:
        # One value per rank view, broadcast over the layer ranges (the DP's (n, n) cells).
        v = np.array([getattr(r, field) for r in group.ranks], dtype=float)
        return v.reshape(v.shape + (1,) * (like.ndim - 1))

    fwd, bwd, opt = sums["fwd_s"], sums["bwd_s"], sums["optimizer_s"]
    gather = sums["gather_s"].max(axis=0)
    passes = grad_passes_per_byte(group)
    compute_fwd = (fwd + per_rank("schedule_fwd_s", fwd)).max(axis=0)
    compute_bwd = (bwd + per_rank("schedule_bwd_s", bwd)).max(axis=0)
    sync = np.max(
        [all_reduce_time(rv.ring, sums["dp_grad_bytes"][d])
         + passes * sums["dp_grad_bytes"][d] + sums["reduce_scatter_s"][d]
         for d, rv in enumerate(group.dp_rings)],
        axis=0,
    ) + gather + sync_after_compute(group, num_micro * (compute_fwd + compute_bwd))  # fmt: skip
    return StagePrice(
        compute_fwd_s=compute_fwd,
        compute_bwd_s=compute_bwd,
        tp_fwd_s=sums["tp_fwd_s"].max(axis=0),
        tp_bwd_s=sums["tp_bwd_s"].max(axis=0),
        gather_s=gather,
        grad_sync_s=sync,
        optimizer_s=(opt + per_rank("schedule_step_s", opt)).max(axis=0),
        static_bytes=sums["state_bytes"],
        live_bytes=sums["live_bytes"],
        transient_bytes=sums["transient_bytes"],
        output_bytes=sums["output_bytes"].max(axis=0),
    )


def _by_shape(terms: LayerTerms) -> list[tuple[str, ...]]:
    # Fields with the same rows (rank views, TP rings, replica rings) are summed in one call.
    return _shape_groups(tuple(getattr(terms, name).shape for name in _FIELDS))


@lru_cache(maxsize=1024)
def _shape_groups(shapes: tuple[tuple[int, ...], ...]) -> list[tuple[str, ...]]:
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, shape in zip(_FIELDS, shapes, strict=True):
        groups.setdefault(shape, []).append(name)
    return [tuple(names) for names in groups.values()]


@lru_cache(maxsize=65536)
def _overheads(group: StageGroup) -> np.ndarray:
    out = np.array([v.overhead_bytes for v in group.ranks], dtype=float)
    out.flags.writeable = False  # shared by every caller
    return out


def grad_passes_per_byte(group: StageGroup) -> float:
    """Per step and all-reduced gradient byte: the plain replicas' two passes over their flat
    gradient buffer (zeroed before the first backward, divided after the all-reduce: pdv.run
    .stage.ReplicaGrads), at the slowest rank's measured rate; 0 without replicas."""
    return max(r.grad_passes_s_per_byte for r in group.ranks) if group.dp > 1 else 0.0


def sync_after_compute(group: StageGroup, step_compute_s: np.ndarray | float) -> np.ndarray:
    """Per step: what a stage's gradient sync pays coming from its compute rather than from
    another collective, its slowest rank's; 0 without replicas.

    Each rank's excess was measured after two bursts of compute (about 5 and 50 ms). After
    the step's compute it is priced on the line between them, held at the nearer end outside
    them: the longer wait for the partner's end grew over 5-100 ms in a scratch loop here
    (1.9-2.6 ms, then 3.4-3.8 ms after 100 ms), but no burst past the longer one is measured.
    A longer burst's excess under the shorter's is priced as no growth: a slower stage never
    prices a cheaper sync (the DP's dominance test relies on it).
    """
    t = np.asarray(step_compute_s, dtype=float)
    if group.dp < 2:
        return np.zeros_like(t)
    out = np.zeros_like(t)
    for r in group.ranks:
        grow = max(0.0, r.sync_long_excess_s - r.sync_after_compute_s)
        span = r.sync_long_burst_s - r.sync_burst_s
        frac = np.clip((t - r.sync_burst_s) / span, 0.0, 1.0) if span > 0 else 0.0
        out = np.maximum(out, r.sync_after_compute_s + grow * frac)
    return out


def price_layers(
    profiles: Mapping[str, ModelProfile],
    group: StageGroup,
    replica_batch: int,
    lo: int,
    choices: Sequence[LayerChoice],
    terms: Mapping[LayerChoice, LayerTerms] | None = None,
    *,
    num_micro: int,
) -> StagePrice:
    """Price layers [lo, lo + len(choices)), each with its own choice, on one stage group, in
    a step of ``num_micro`` micro-batches.

    Sums run layer by layer in order (the simulator's event times depend on no summation
    trick). `terms` may hold the layer terms of the choices already computed.
    """
    hi = lo + len(choices)
    have = dict(terms or {})
    for c in dict.fromkeys(choices):
        if c not in have:
            have[c] = layer_terms(profiles, group, replica_batch, c)
    order = list(dict.fromkeys(choices))
    which = np.array([order.index(c) for c in choices])
    sums: dict[str, np.ndarray] = {}
    picked: dict[str, np.ndarray] = {}
    for names in _by_shape(have[order[0]]):
        cols = np.stack([getattr(have[order[0]], n)[:, lo:hi] for n in names])
        for j, c in enumerate(order[1:], 1):  # each layer's column from its own choice
            mine = np.stack([getattr(have[c], n)[:, lo:hi] for n in names])
            cols = np.where(which == j, mine, cols)
        # Sums run from each field's start (the rank's overhead for its state) layer by layer.
        start = np.zeros(cols.shape[:2] + (1,))
        if "state_bytes" in names:
            start[names.index("state_bytes"), :, 0] = _overheads(group)
        total = np.cumsum(np.concatenate([start, cols], axis=2), axis=2)[:, :, -1]
        for i, n in enumerate(names):
            sums[n] = total[i]
            if n in ONE_COPY:
                picked[n] = cols[i]
        if "transient_bytes" in names:
            sums["transient_bytes"] = np.maximum(cols[names.index("transient_bytes")].max(axis=1),
                                                 0.0)
        if "output_bytes" in names:
            sums["output_bytes"] = cols[names.index("output_bytes"), :, -1]
    for places in shared_places(profiles[group.ranks[0].kind]):
        inside = (places.layers >= lo) & (places.layers < hi)
        if not inside.any():
            continue
        at = places.layers[inside] - lo
        for name in ONE_COPY:
            copies = picked[name][:, at] * places.share[inside]
            sums[name] = sums[name] - _beyond_one_copy(name, copies, bool(inside.all()),
                                                       places.state_bytes)
    return compose(group, sums, num_micro)


def price_ranges(
    profiles: Mapping[str, ModelProfile],
    group: StageGroup,
    replica_batch: int,
    choice: LayerChoice,
    bounds: np.ndarray,
    terms: LayerTerms | None = None,
    *,
    num_micro: int,
) -> StagePrice:
    """Price every layer range [bounds[x], bounds[y]) at once with one choice for all layers,
    in a step of ``num_micro`` micro-batches.

    Index [x, y] of each field (after its row axis) is that range; ranges with y ≤ x are
    meaningless (the caller masks them). Sums are prefix-sum differences.
    """
    t = terms or layer_terms(profiles, group, replica_batch, choice)
    n = len(bounds)
    sums: dict[str, np.ndarray] = {}
    for names in _by_shape(t):
        summed = [name for name in names if name not in ("transient_bytes", "output_bytes")]
        v = np.stack([getattr(t, name) for name in summed])
        c = np.concatenate([np.zeros(v.shape[:2] + (1,)), np.cumsum(v, axis=2)], axis=2)
        c = c[:, :, bounds]
        pairs = c[:, :, None, :] - c[:, :, :, None]
        for i, name in enumerate(summed):
            sums[name] = pairs[i]
    rows = t.output_bytes.shape[0]
    sums["transient_bytes"] = np.stack(
        [_range_max(row, bounds) if row.any() else np.zeros((n, n)) for row in t.transient_bytes]
    )
    ends = np.concatenate([np.zeros((rows, 1)), t.output_bytes], axis=1)[:, bounds]
    sums["output_bytes"] = np.broadcast_to(ends[:, None, :], (rows, n, n))
    sums["state_bytes"] = sums["state_bytes"] + _overheads(group)[:, None, None]
    for places in shared_places(profiles[group.ranks[0].kind]):
        # [x, y, j]: range [bounds[x], bounds[y]) holds the set's j-th place
        inside = ((bounds[:, None, None] <= places.layers)
                  & (places.layers < bounds[None, :, None]))
        every = np.asarray(inside.all(axis=2))
        for name in ONE_COPY:
            copies = getattr(t, name)[:, places.layers] * places.share  # (rows, places)
            held = np.where(inside[None], copies[:, None, None, :], 0.0)
            sums[name] = sums[name] - np.where(
                inside.any(axis=2), _beyond_one_copy(name, held, every, places.state_bytes), 0.0)
    return compose(group, sums, num_micro)


ONE_COPY = ("state_bytes", "optimizer_s", "dp_grad_bytes")
"""The terms a stage pays once for parameters that several of its layers use."""


def _beyond_one_copy(name: str, copies: np.ndarray, every: np.ndarray | bool,
                     whole_copy_state: float) -> np.ndarray:
    """What the layers' sum counts of shared parameters beyond what a stage holding some of
    their places pays, over the last axis (the places it holds).

    A stage holds one copy of them and steps it once: its optimizer step counts one place.
    Where it holds every place, its state counts one place's copy and its replicas all-reduce
    that copy with the stage's other gradients. Where other stages hold places too, the run
    keeps the copy out of FSDP's shards and of the replicas' buffer (pdv.run.tied), and a TP
    plan must leave it whole: the stage holds the whole copy, and the copies' own all-reduce
    over every holder (priced per step by the simulator) syncs it.
    """
    total = copies.sum(axis=-1)
    one = copies.max(axis=-1)
    if name == "dp_grad_bytes":
        return total - np.where(every, one, 0.0)
    if name == "state_bytes":
        return total - np.where(every, one, whole_copy_state)
    return total - one


def _range_max(v: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """[x, y] = the largest v (≥ 0) over layers [bounds[x], bounds[y]) (0 for none).

    bounds must rise strictly from 0 to len(v).
    """
    n = len(bounds)
    seg = np.maximum.reduceat(v, bounds[:-1])  # each span between consecutive bounds
    k = np.arange(n - 1)
    upper = np.where(k[None, :] >= k[:, None], seg[None, :], 0.0)
    biggest = np.zeros((n, n))
    biggest[: n - 1, 1:] = np.maximum.accumulate(upper, axis=1)
    return biggest
