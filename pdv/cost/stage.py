"""What one pipeline stage costs per micro-batch and per step, on the actual devices and links.

Conventions (the plan contract, kept the same by the planner, the simulator and the runtime):

- ``global_batch_size = micro_batch_size × num_micro_batches``. A micro-batch of ``mbs`` samples
  is split evenly over a stage's ``dp`` replicas, so each replica computes at micro-batch size
  ``mbs / dp`` (pdv.cost.validity checks that dp divides mbs). Replica r holds samples
  ``[r·mbs/dp, (r+1)·mbs/dp)`` of every micro-batch.
- A stage's ranks are dp-major: ``ranks[r·tp + t]`` is TP shard t of replica r.
- Every device is priced by the profile of its own kind, times its speed factor; a stage
  runs at the pace of its slowest device (all replicas step together).
- ``layer_sharding`` (optional) gives each layer its own LayerChoice (tp 1 or the stage's tp,
  fsdp, recompute).

The layers' terms and their composition are pdv.cost.terms'; this module gives them the stage's
every rank and ring, and prices the transfers to the next stage's actual layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pdv.artifacts import ClusterArtifact, Links, ModelProfile, PlanStage, Schedule
from pdv.cost.comm import exchange_time, message_cpu_time, p2p_time, ring_of
from pdv.cost.compute import (
    profile_arrays,
    profile_for,
    rank_overhead_bytes,
    rank_overheads,
    speed_factor,
)
from pdv.cost.schedules import in_flight
from pdv.cost.terms import RankView, RingView, StageGroup, price_layers

__all__ = [
    "StageCost",
    "stage_cost",
    "stage_group",
    "activation_transfer_time",
    "boundary_messages",
    "boundary_tensors",
    "message_cpu",
]


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
    send_alone_s: float | None = None
    """send_s with each exchange's excess as measured while the host's other ranks idle
    (Links.exchange_latency_alone_s); None: send_s"""
    send_back_alone_s: float | None = None
    """the same for the gradient back; None: send_back_s"""
    static_bytes: dict[int, float] = field(default_factory=dict)
    """per rank: overhead + params + grads + optimizer state (independent of in-flight count)"""
    overhead_bytes: dict[int, float] = field(default_factory=dict)
    """per rank: the rank's own constant bytes inside static_bytes (rank_overhead_bytes), which
    a rank holding several stages pays once"""
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

    @property
    def send_quiet_s(self) -> float:
        """send_s when the host's other ranks idle (pdv.cost.simulate prices between the two)."""
        return self.send_s if self.send_alone_s is None else self.send_alone_s

    @property
    def grad_send_quiet_s(self) -> float:
        """grad_send_s when the host's other ranks idle."""
        return self.grad_send_s if self.send_back_alone_s is None else self.send_back_alone_s


def stage_group(
    profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact, stage: PlanStage
) -> StageGroup:
    """Every rank of the stage, each TP group's ring and each TP position's replica ring."""
    devices = [cluster.devices[r] for r in stage.ranks]
    views = tuple(
        RankView(d.kind, speed_factor(p, d), rank_overhead_bytes(p, d), float(d.memory_bytes),
                 *rank_overheads(d))
        for d, p in ((d, profile_for(profiles, d)) for d in devices)
    )
    tp_groups = [stage.ranks[r * stage.tp : (r + 1) * stage.tp] for r in range(stage.dp)]
    dp_rings = [stage.ranks[t :: stage.tp] for t in range(stage.tp)]
    return StageGroup(
        ranks=views,
        tp_rings=tuple(RingView(ring_of(cluster.links, g), (cluster.devices[g[0]].kind,))
                       for g in tp_groups),
        dp_rings=tuple(RingView(ring_of(cluster.links, g), (cluster.devices[g[0]].kind,))
                       for g in dp_rings),
        tp=stage.tp,
        dp=stage.dp,
    )


def stage_cost(
    profiles: Mapping[str, ModelProfile],
    cluster: ClusterArtifact,
    stage: PlanStage,
    next_stage: PlanStage | None,
    *,
    mbs: int,
    schedule: Schedule,
    stage_index: int,
    num_stages: int,
    num_micro: int,
    prev_stage: PlanStage | None = None,
) -> StageCost:
    """Price one stage: per-micro-batch forward/backward/transfer, per-step sync, peak memory.

    The plan must have passed pdv.cost.validity.check_plan (layers, ranks and batch split).
    The forward and backward include the CPU of the messages they receive and send
    (:func:`message_cpu`; ``prev_stage`` sends this stage its input).
    """
    group = stage_group(profiles, cluster, stage)
    rmbs = mbs // stage.dp
    price = price_layers(profiles, group, rmbs, stage.layers[0], stage.layer_choices(),
                         num_micro=num_micro)
    send = back = 0.0
    send_alone = back_alone = None
    if next_stage is not None:
        per_sample = float(price.output_bytes) / rmbs
        ahead, behind = boundary_tensors(profiles, stage.layers[1] - 1)
        send = activation_transfer_time(cluster.links, stage, next_stage, mbs, per_sample, ahead)
        back = activation_transfer_time(cluster.links, next_stage, stage, mbs, per_sample,
                                        behind)
        if cluster.links.exchange_latency_alone_s is not None:
            send_alone = activation_transfer_time(cluster.links, stage, next_stage, mbs,
                                                  per_sample, ahead, alone=True)
            back_alone = activation_transfer_time(cluster.links, next_stage, stage, mbs,
                                                  per_sample, behind, alone=True)
    fwd_cpu = bwd_cpu = 0.0
    if prev_stage is not None or next_stage is not None:
        fwd_cpu, bwd_cpu = _stage_message_cpu(profiles, cluster, prev_stage, stage, next_stage,
                                              mbs, float(price.output_bytes) / rmbs)
    n_in = in_flight(schedule, num_stages - stage_index, num_micro)
    peak = price.peak_bytes(n_in)

    def per_rank(values) -> dict[int, float]:
        return {r: float(v) for r, v in zip(stage.ranks, values, strict=True)}

    return StageCost(
        fwd_s=float(price.fwd_s) + fwd_cpu,
        bwd_s=float(price.bwd_s) + bwd_cpu,
        send_s=send,
        grad_sync_s=float(price.grad_sync_s),
        peak_memory_bytes=per_rank(peak),
        send_back_s=back,
        send_alone_s=send_alone,
        send_back_alone_s=back_alone,
        static_bytes=per_rank(price.static_bytes),
        overhead_bytes=per_rank([v.overhead_bytes for v in group.ranks]),
        activation_bytes=per_rank(price.live_bytes),
        transient_bytes=per_rank(price.transient_bytes),
        tp_comm_s=float(price.collective_fwd_s + price.collective_bwd_s),
        optimizer_s=float(price.optimizer_s),
    )


def boundary_messages(src: PlanStage, dst: PlanStage, mbs: int, bytes_per_sample: float,
                      tensors: int = 1) -> list[tuple[int, int, float]]:
    """Every (sender, receiver, bytes) message of one micro-batch's boundary src → dst.

    Replica q of dst needs samples [q·mbs/dp', (q+1)·mbs/dp'); it gets each overlapping slice
    from the src replica that holds it. TP shard u of a receiving replica receives from TP shard
    u mod tp of the sending replica (the boundary tensor is replicated over a TP group after its
    all-reduce). A boundary of `tensors` tensors is that many messages per slice (the
    executors send each tensor on its own), the bytes shared among them: every cost of a
    message is a + b·S, so the sum is exact for any split.
    """
    if tensors < 1:
        return []
    src_share = mbs / src.dp
    dst_share = mbs / dst.dp
    out = []
    for q in range(dst.dp):
        lo_q, hi_q = q * dst_share, (q + 1) * dst_share
        for r in range(src.dp):
            overlap = min(hi_q, (r + 1) * src_share) - max(lo_q, r * src_share)
            if overlap <= 0:
                continue
            for u in range(dst.tp):
                out += [(src.ranks[r * src.tp + u % src.tp], dst.ranks[q * dst.tp + u],
                         overlap * bytes_per_sample / tensors)] * tensors
    return out


def boundary_tensors(profiles: Mapping[str, ModelProfile], last_layer: int) -> tuple[int, int]:
    """(forward, backward) messages per slice at the boundary after `last_layer`: the tensors
    it hands on, and those a gradient flows back through (any profile: one model)."""
    layer = next(iter(profiles.values())).layers[last_layer]
    return layer.output_tensors, layer.output_grad_tensors


def activation_transfer_time(
    links: Links,
    src: PlanStage,
    dst: PlanStage,
    mbs: int,
    bytes_per_sample: float,
    tensors: int = 1,
    alone: bool = False,
) -> float:
    """Seconds to move one micro-batch's boundary from stage src's ranks to dst's (with
    `alone`, each exchange's excess as measured with the host's other ranks idle).

    The messages are :func:`boundary_messages`. Each rank sends and receives one message at a
    time, different ranks in parallel: the time is the largest per-rank sum of α + S/β over its
    transfers, on the ordered link (row = sender), plus one exchange excess per rank it
    exchanges with (pdv.cost.comm.exchange_time). Used in both directions: pass (next, this)
    for the gradients coming back.
    """
    busy: dict[tuple[str, int], float] = {}

    def add(s: int, d: int, t: float) -> None:
        busy[("send", s)] = busy.get(("send", s), 0.0) + t
        busy[("recv", d)] = busy.get(("recv", d), 0.0) + t

    messages = boundary_messages(src, dst, mbs, bytes_per_sample, tensors)
    for s, d, nbytes in messages:
        add(s, d, p2p_time(links, s, d, nbytes))
    # A boundary's tensors between two ranks are posted together: one exchange excess.
    for s, d in dict.fromkeys((s, d) for s, d, _ in messages):
        add(s, d, exchange_time(links, s, d, alone))
    return max(busy.values(), default=0.0)


def message_cpu(cluster: ClusterArtifact, src: PlanStage, dst: PlanStage, mbs: int,
                bytes_per_sample: float, tensors: int = 1) -> dict[int, float]:
    """Per rank: CPU seconds its side of one micro-batch's boundary messages src → dst costs.

    Each sender pays its measured send line, each receiver its receive line
    (pdv.cost.comm.message_cpu_time), once per peer for the messages a boundary posts to it
    together (its tensors), plus the batched cost of each message after the first; a rank
    that is unmeasured pays nothing.
    """
    per_pair: dict[tuple[int, int], list[float]] = {}
    for s, d, nbytes in boundary_messages(src, dst, mbs, bytes_per_sample, tensors):
        per_pair.setdefault((s, d), []).append(nbytes)
    cpu: dict[int, float] = {}
    for (s, d), sizes in per_pair.items():
        so, do = cluster.devices[s].overheads, cluster.devices[d].overheads
        total, n = sum(sizes), len(sizes)
        cpu[s] = cpu.get(s, 0.0) + message_cpu_time(so.send_cpu if so else None, total, n)
        cpu[d] = cpu.get(d, 0.0) + message_cpu_time(do.recv_cpu if do else None, total, n)
    return cpu


def _stage_message_cpu(profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact,
                       prev: PlanStage | None, stage: PlanStage, nxt: PlanStage | None,
                       mbs: int, out_per_sample: float) -> tuple[float, float]:  # fmt: skip
    """(forward, backward) message CPU of the stage's slowest rank, per micro-batch.

    A forward receives its input from the previous stage and sends its output on; a backward
    receives the output's gradient and sends its input's gradient back.
    """
    fwd: dict[int, float] = dict.fromkeys(stage.ranks, 0.0)
    bwd: dict[int, float] = dict.fromkeys(stage.ranks, 0.0)
    mine = set(stage.ranks)

    def add(into: dict[int, float], cpu: dict[int, float]) -> None:
        for r, t in cpu.items():
            if r in mine:
                into[r] += t

    if prev is not None:
        lo = stage.layers[0]
        profile = profile_for(profiles, cluster.devices[stage.ranks[0]])
        in_per_sample = float(profile_arrays(profile, 1, 1).outputs[lo - 1])
        ahead, back = boundary_tensors(profiles, lo - 1)
        add(fwd, message_cpu(cluster, prev, stage, mbs, in_per_sample, ahead))
        add(bwd, message_cpu(cluster, stage, prev, mbs, in_per_sample, back))
    if nxt is not None:
        ahead, back = boundary_tensors(profiles, stage.layers[1] - 1)
        add(fwd, message_cpu(cluster, stage, nxt, mbs, out_per_sample, ahead))
        add(bwd, message_cpu(cluster, nxt, stage, mbs, out_per_sample, back))
    return max(fwd.values()), max(bwd.values())
