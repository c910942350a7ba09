"""What one pipeline stage costs per micro-batch and per step, on the actual devices and links.

Conventions (the plan contract, kept the same by the planner, the simulator and the runtime):

- ``global_batch_size = micro_batch_size × num_micro_batches``. A micro-batch of ``mbs`` samples
  is split evenly over a stage's ``dp`` replicas, so each replica computes at micro-batch size
  ``mbs / dp`` (a PdvError when dp does not divide mbs). Replica r holds samples
  ``[r·mbs/dp, (r+1)·mbs/dp)`` of every micro-batch.
- A stage's ranks are dp-major: ``ranks[r·tp + t]`` is TP shard t of replica r.
- Every device is priced by the profile of its own kind, times :func:`speed_factor`; a stage
  runs at the pace of its slowest device (all replicas step together).
- ``layer_sharding`` (optional) is a list aligned with the stage's layers; each entry may override
  ``tp`` (1 = replicated inside the TP group, or the stage's tp), ``fsdp`` and ``recompute`` for
  that layer. Other keys are the planner's notes and are not priced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pdv.artifacts import ClusterArtifact, ClusterDevice, Links, ModelProfile, PlanStage
from pdv.cost.comm import all_gather_time, all_reduce_time, p2p_time, reduce_scatter_time
from pdv.cost.compute import (
    in_flight_micro_batches,
    layer_cost,
    rank_overhead_bytes,
    speed_factor,
)
from pdv.errors import PdvError

__all__ = [
    "StageCost",
    "LayerChoice",
    "stage_cost",
    "layer_choices",
    "replica_micro_batch",
    "profile_for",
    "tp_groups",
    "replica_rings",
    "activation_transfer_time",
]

# Megatron-LM tensor parallelism puts 2 all-reduces of the layer output in the forward of a
# transformer block (after attention, after the MLP) and 2 in the backward (their conjugates):
# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", §2.3.
TP_ALL_REDUCES_PER_LAYER = 2


@dataclass(frozen=True)
class StageCost:
    """One stage priced on its devices and links."""

    fwd_s: float
    """one micro-batch forward on the stage, slowest replica/device, incl. TP collectives"""
    bwd_s: float
    """one micro-batch backward (+ recompute forward), incl. TP collectives"""
    send_s: float
    """activations of one micro-batch to the next stage over the actual links (0 for the last)"""
    grad_sync_s: float
    """per step: DP all-reduce (or FSDP reduce-scatters) of this stage's grads"""
    peak_memory_bytes: dict[int, float]
    """per global rank of the stage, at the schedule's in-flight count"""
    send_back_s: float | None = None
    """gradient of one micro-batch back from the next stage (next → this links, which may be
    slower or faster than this → next); None means the same as send_s"""
    static_bytes: dict[int, float] = field(default_factory=dict)
    """per rank: overhead + params + grads + optimizer state (independent of in-flight count)"""
    activation_bytes: dict[int, float] = field(default_factory=dict)
    """per rank: bytes one in-flight micro-batch keeps until its backward"""
    transient_bytes: dict[int, float] = field(default_factory=dict)
    """per rank: extra bytes while one layer is recomputed (0 without recompute)"""
    tp_comm_s: float = 0.0
    """the collectives inside fwd_s + bwd_s: TP all-reduces, FSDP all-gathers (breakdown)"""
    optimizer_s: float = 0.0
    """per step: the optimizer step over the slowest rank's parameter shard, after the sync"""

    @property
    def grad_send_s(self) -> float:
        """Gradient transfer time back from the next stage."""
        return self.send_s if self.send_back_s is None else self.send_back_s


@dataclass(frozen=True)
class LayerChoice:
    """How one layer of a stage is run."""

    tp: int
    fsdp: bool
    recompute: bool


def replica_micro_batch(mbs: int, dp: int) -> int:
    """Samples of one micro-batch that each of a stage's dp replicas computes."""
    if mbs % dp:
        raise PdvError(
            f"micro-batch size {mbs} does not split evenly over a stage's {dp} replicas; "
            f"use a micro-batch size that is a multiple of {dp}"
        )
    return mbs // dp


def profile_for(profiles: Mapping[str, ModelProfile], device: ClusterDevice) -> ModelProfile:
    """The profile that prices a device: the one taken on the device's kind."""
    try:
        return profiles[device.kind]
    except KeyError:
        have = ", ".join(sorted(profiles)) or "none"
        raise PdvError(
            f"no model profile for device kind {device.kind!r} (rank {device.rank}); "
            f"profiles given for: {have}; profile the model on a {device.kind} device "
            f"or pass its profile"
        ) from None


def tp_groups(stage: PlanStage) -> list[list[int]]:
    """The TP groups of a stage: one per replica, shards in order."""
    return [stage.ranks[r * stage.tp : (r + 1) * stage.tp] for r in range(stage.dp)]


def replica_rings(stage: PlanStage) -> list[list[int]]:
    """The DP rings of a stage: one per TP position, replicas in order."""
    return [stage.ranks[t :: stage.tp] for t in range(stage.tp)]


def layer_choices(stage: PlanStage) -> list[LayerChoice]:
    """Per-layer (tp, fsdp, recompute) of a stage: its defaults, overridden by layer_sharding."""
    n = stage.layers[1] - stage.layers[0]
    base = LayerChoice(stage.tp, stage.fsdp, stage.recompute)
    if stage.layer_sharding is None:
        return [base] * n
    if len(stage.layer_sharding) != n:
        raise PdvError(
            f"stage with layers {list(stage.layers)} has {len(stage.layer_sharding)} "
            f"layer_sharding entries; it needs one per layer ({n})"
        )
    out = []
    for i, entry in enumerate(stage.layer_sharding):
        tp = int(entry.get("tp", stage.tp))
        if tp not in (1, stage.tp):
            raise PdvError(
                f"layer {stage.layers[0] + i}: layer_sharding tp {tp} must be 1 (replicated) "
                f"or the stage's tp {stage.tp}"
            )
        fsdp = bool(entry.get("fsdp", stage.fsdp))
        out.append(LayerChoice(tp, fsdp, bool(entry.get("recompute", stage.recompute))))
    return out


@dataclass(frozen=True)
class _RankCompute:
    fwd_s: float
    bwd_s: float
    static_bytes: float
    activation_bytes: float
    transient_bytes: float
    grad_bytes_dp: float
    fsdp_grad_bytes: tuple[float, ...]
    """per FSDP layer (each its own FSDP2 unit): gradient bytes, reduce-scattered once a step"""
    fsdp_param_bytes: tuple[float, ...]
    """per FSDP layer: parameter bytes, all-gathered in every micro-batch's forward and backward"""
    optimizer_s: float


def _rank_compute(
    profile: ModelProfile,
    device: ClusterDevice,
    stage: PlanStage,
    choices: Sequence[LayerChoice],
    rmbs: int,
) -> _RankCompute:
    """Compute time and memory of one rank of the stage (no communication)."""
    speed = speed_factor(profile, device)
    fwd = bwd = 0.0
    static = rank_overhead_bytes(profile, device)
    acts = 0.0
    transient = 0.0
    grad_dp = 0.0
    grad_fsdp: list[float] = []
    param_fsdp: list[float] = []
    opt = 0.0
    for i, ch in zip(range(stage.layers[0], stage.layers[1]), choices, strict=True):
        if i >= len(profile.layers):
            raise PdvError(
                f"stage layers {list(stage.layers)} go past the model's {len(profile.layers)} "
                f"layers (profile of {profile.device.kind})"
            )
        layer = profile.layers[i]
        c = layer_cost(profile, i, rmbs, ch.tp)
        f, b = c.fwd_s * speed, c.bwd_s * speed
        fwd += f
        # Recompute runs the layer's forward again right before its backward.
        bwd += b + (f if ch.recompute else 0.0)
        shard = c.param_bytes / layer.param_bytes if layer.param_bytes else 1.0
        grads = layer.grad_bytes * shard
        state = c.param_bytes + grads + layer.optimizer_bytes * shard
        # The step is elementwise over the rank's parameters: its time scales with the shard.
        step = (layer.optimizer_s or 0.0) * shard * speed
        if ch.fsdp and stage.dp > 1:
            # ZeRO-3 / FSDP2: params, grads and optimizer state sharded over the replicas.
            state /= stage.dp
            step /= stage.dp
            grad_fsdp.append(grads)
            param_fsdp.append(c.param_bytes)
        else:
            grad_dp += grads
        opt += step
        static += state
        if ch.recompute:
            # Only the layer's input (the previous layer's output) stays; the full activations
            # live again for one layer at a time while it is recomputed.
            acts += c.output_bytes
            transient = max(transient, c.activation_bytes)
        else:
            acts += c.activation_bytes
    return _RankCompute(fwd, bwd, static, acts, transient, grad_dp, tuple(grad_fsdp),
                        tuple(param_fsdp), opt)


def _tp_collective_time(
    profiles: Mapping[str, ModelProfile],
    cluster: ClusterArtifact,
    stage: PlanStage,
    choices: Sequence[LayerChoice],
    rmbs: int,
) -> tuple[float, float]:
    """(forward, backward) TP all-reduce seconds per micro-batch, slowest replica's ring."""
    worst_f = worst_b = 0.0
    for group in tp_groups(stage):
        if len(group) < 2:
            continue
        profile = profile_for(profiles, cluster.devices[group[0]])
        f = b = 0.0
        for i, ch in zip(range(stage.layers[0], stage.layers[1]), choices, strict=True):
            if ch.tp < 2:
                continue
            out = layer_cost(profile, i, rmbs, ch.tp).output_bytes
            t = TP_ALL_REDUCES_PER_LAYER * all_reduce_time(cluster.links, group, out)
            f += t
            b += t + (t if ch.recompute else 0.0)
        worst_f, worst_b = max(worst_f, f), max(worst_b, b)
    return worst_f, worst_b


def _output_bytes_per_sample(profile: ModelProfile, stage: PlanStage, rmbs: int) -> float:
    last = stage.layers[1] - 1
    tp = layer_choices(stage)[-1].tp
    return layer_cost(profile, last, rmbs, tp).output_bytes / rmbs


def activation_transfer_time(
    links: Links,
    src: PlanStage,
    dst: PlanStage,
    mbs: int,
    bytes_per_sample: float,
) -> float:
    """Seconds to move one micro-batch's boundary tensor from stage src's ranks to dst's.

    Replica q of dst needs samples [q·mbs/dp', (q+1)·mbs/dp'); it gets each overlapping slice
    from the src replica that holds it. TP shard u of a receiving replica receives from TP shard
    u mod tp of the sending replica (the boundary tensor is replicated over a TP group after its
    all-reduce). Each rank sends and receives one message at a time, different ranks in parallel:
    the time is the largest per-rank sum of α + S/β over its transfers, on the ordered link
    (row = sender). Used in both directions: pass (next, this) for the gradients coming back.
    """
    src_share = mbs / src.dp
    dst_share = mbs / dst.dp
    busy: dict[tuple[str, int], float] = {}
    for q in range(dst.dp):
        lo_q, hi_q = q * dst_share, (q + 1) * dst_share
        for r in range(src.dp):
            overlap = min(hi_q, (r + 1) * src_share) - max(lo_q, r * src_share)
            if overlap <= 0:
                continue
            nbytes = overlap * bytes_per_sample
            for u in range(dst.tp):
                s = src.ranks[r * src.tp + u % src.tp]
                d = dst.ranks[q * dst.tp + u]
                t = p2p_time(links, s, d, nbytes)
                busy[("send", s)] = busy.get(("send", s), 0.0) + t
                busy[("recv", d)] = busy.get(("recv", d), 0.0) + t
    return max(busy.values(), default=0.0)


def _fsdp_gather_time(
    cluster: ClusterArtifact, stage: PlanStage, per_rank: Mapping[int, _RankCompute]
) -> float:
    """Per micro-batch, forward and backward each: every FSDP layer's all-gather, slowest ring.

    Each FSDP layer is its own FSDP2 unit and reshards after forward; under a pipeline schedule
    every micro-batch's forward gathers it and its backward gathers it again (torch's stage keeps
    params unsharded after backward only until the next forward reshards them).
    """
    if stage.dp < 2:
        return 0.0
    return max(
        sum(all_gather_time(cluster.links, ring, b) for b in per_rank[ring[0]].fsdp_param_bytes)
        for ring in replica_rings(stage)
    )


def _grad_sync_time(
    cluster: ClusterArtifact, stage: PlanStage, per_rank: Mapping[int, _RankCompute]
) -> float:
    """Per-step gradient sync over each TP position's replica ring, slowest ring.

    Plain DP: one ring all-reduce of the stage's grads (nccl-tests formula; pdv run sums them
    as one flat buffer). FSDP (ZeRO-3): each FSDP layer reduce-scatters its grads after the last
    backward; its all-gathers are per micro-batch (:func:`_fsdp_gather_time`).
    """
    if stage.dp < 2:
        return 0.0
    worst = 0.0
    for ring in replica_rings(stage):
        rc = per_rank[ring[0]]
        t = all_reduce_time(cluster.links, ring, rc.grad_bytes_dp)
        t += sum(reduce_scatter_time(cluster.links, ring, b) for b in rc.fsdp_grad_bytes)
        worst = max(worst, t)
    return worst


def stage_cost(
    profiles: Mapping[str, ModelProfile],
    cluster: ClusterArtifact,
    stage: PlanStage,
    next_stage: PlanStage | None,
    *,
    mbs: int,
    schedule: str,
    stage_index: int,
    num_stages: int,
    num_micro: int,
) -> StageCost:
    """Price one stage: per-micro-batch forward/backward/transfer, per-step sync, peak memory."""
    n = len(cluster.devices)
    for r in stage.ranks + (next_stage.ranks if next_stage else []):
        if r >= n:
            raise PdvError(f"plan uses rank {r} but the cluster has {n} devices (0..{n - 1})")
    rmbs = replica_micro_batch(mbs, stage.dp)
    choices = layer_choices(stage)
    per_rank = {
        r: _rank_compute(
            profile_for(profiles, cluster.devices[r]), cluster.devices[r], stage, choices, rmbs
        )
        for r in stage.ranks
    }
    tp_f, tp_b = _tp_collective_time(profiles, cluster, stage, choices, rmbs)
    gather = _fsdp_gather_time(cluster, stage, per_rank)
    tp_f, tp_b = tp_f + gather, tp_b + gather
    fwd = max(rc.fwd_s for rc in per_rank.values()) + tp_f
    bwd = max(rc.bwd_s for rc in per_rank.values()) + tp_b

    send = back = 0.0
    if next_stage is not None:
        sender = profile_for(profiles, cluster.devices[stage.ranks[0]])
        per_sample = _output_bytes_per_sample(sender, stage, rmbs)
        send = activation_transfer_time(cluster.links, stage, next_stage, mbs, per_sample)
        back = activation_transfer_time(cluster.links, next_stage, stage, mbs, per_sample)

    in_flight = in_flight_micro_batches(schedule, stage_index, num_stages, num_micro)
    peak = {
        r: rc.static_bytes + rc.activation_bytes * in_flight + rc.transient_bytes
        for r, rc in per_rank.items()
    }
    return StageCost(
        fwd_s=fwd,
        bwd_s=bwd,
        send_s=send,
        grad_sync_s=_grad_sync_time(cluster, stage, per_rank),
        peak_memory_bytes=peak,
        send_back_s=back,
        static_bytes={r: rc.static_bytes for r, rc in per_rank.items()},
        activation_bytes={r: rc.activation_bytes for r, rc in per_rank.items()},
        transient_bytes={r: rc.transient_bytes for r, rc in per_rank.items()},
        tp_comm_s=tp_f + tp_b,
        optimizer_s=max(rc.optimizer_s for rc in per_rank.values()),
    )
