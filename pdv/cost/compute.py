"""Compute time and memory of layers and stages, read from a model profile.

Times come from the profile's per-layer fit t = a + b·micro_batch at the TP degree's local shard
shapes. Where a profile has no fit (a hand-written or single-point profile), the reference
measurement is scaled linearly in micro-batch size, and that is the only extrapolation done here.
A device that the cluster measured slower or faster than the device the profile was taken on is
priced by the ratio of their measured matmul throughputs (both numbers are measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdv.artifacts import ClusterDevice, LayerProfile, ModelProfile, TimeFit
from pdv.errors import PdvError

__all__ = [
    "LayerCost",
    "layer_cost",
    "speed_factor",
    "stage_compute_time",
    "stage_memory_bytes",
    "in_flight_micro_batches",
]


@dataclass(frozen=True)
class LayerCost:
    """One layer at one micro-batch size and TP degree, per rank."""

    fwd_s: float
    bwd_s: float
    param_bytes: float
    """parameter bytes of this rank's TP shard"""
    activation_bytes: float
    """bytes saved for backward, per micro-batch"""
    output_bytes: float
    """bytes of the layer's output (what the next stage receives), per micro-batch"""


def _fit_at(fit: TimeFit, mbs: int) -> float:
    return max(fit.a_s + fit.b_s * mbs, 0.0)


def layer_cost(profile: ModelProfile, index: int, mbs: int, tp: int = 1) -> LayerCost:
    """Cost of layer `index` at micro-batch size mbs and TP degree tp, from the profile."""
    layer: LayerProfile = profile.layers[index]
    key = str(tp)
    ref = profile.reference_micro_batch_size
    scale = mbs / ref
    exact = [s for s in layer.samples if s.tp_degree == tp and s.micro_batch_size == mbs]
    tp_samples = [s for s in layer.samples if s.tp_degree == tp]
    if tp != 1 and not tp_samples and key not in layer.fwd_fit:
        raise PdvError(
            f"profile of {profile.model.spec} on {profile.device.kind} has no TP {tp} "
            f"measurement for layer {layer.name}; profile with --tp-degrees including {tp}"
        )
    if exact:
        fwd, bwd = exact[0].fwd_s, exact[0].bwd_s
    elif key in layer.fwd_fit and key in layer.bwd_fit:
        fwd, bwd = _fit_at(layer.fwd_fit[key], mbs), _fit_at(layer.bwd_fit[key], mbs)
    else:
        fwd, bwd = layer.fwd_s * scale, layer.bwd_s * scale
    if tp_samples:
        s0 = tp_samples[0]
        per_sample_act = s0.activation_bytes / s0.micro_batch_size
        per_sample_out = s0.output_bytes / s0.micro_batch_size
        params = float(s0.param_bytes)
    else:
        per_sample_act = layer.activation_bytes / ref
        per_sample_out = layer.output_bytes / ref
        params = layer.param_bytes / tp
    return LayerCost(fwd, bwd, params, per_sample_act * mbs, per_sample_out * mbs)


def rank_overhead_bytes(profile: ModelProfile, device: ClusterDevice) -> float:
    """Constant bytes a rank holds besides the model, as the rank's memory cap counts them.

    The model profile's ``overhead_bytes`` is the rank's own runtime after warm-up. The cluster
    profiler measures, per rank under torchrun with its process group up, what the cap counts
    (``runtime_bytes``) and how much of it is the rank's own process (``runtime_own_bytes``);
    the difference (the launcher sharing its cgroup, page cache) is added. Where only the total
    is known (CUDA: device memory in use, NCCL buffers included) the larger figure is taken.
    """
    base = float(profile.overhead_bytes)
    if device.runtime_bytes is None:
        return base
    if device.runtime_own_bytes is not None:
        return base + max(0.0, float(device.runtime_bytes - device.runtime_own_bytes))
    return max(base, float(device.runtime_bytes))


def speed_factor(profile: ModelProfile, device: ClusterDevice) -> float:
    """Time multiplier for running this profile on `device`: profiled / device matmul FLOP/s.

    The profile was timed in one process, so it compares with the device's probe taken alone
    (matmul_flops_alone) where the cluster has it; the sharing of a host's cores by ranks that
    compute at the same time is priced by the simulator's processor sharing, not here.
    """
    measured_here = profile.device.matmul_flops
    measured_there = device.matmul_flops_alone or device.matmul_flops
    if measured_here and measured_there:
        return measured_here / measured_there
    return 1.0


def stage_compute_time(
    profile: ModelProfile, start: int, end: int, mbs: int, tp: int = 1, recompute: bool = False
) -> tuple[float, float]:
    """(forward, backward) seconds of layers [start, end) for one micro-batch on one rank.

    Recompute runs the forward again before the backward, so it adds one forward to backward.
    """
    fwd = bwd = 0.0
    for i in range(start, end):
        c = layer_cost(profile, i, mbs, tp)
        fwd += c.fwd_s
        bwd += c.bwd_s
    if recompute:
        bwd += fwd
    return fwd, bwd


def in_flight_micro_batches(schedule: str, stage: int, num_stages: int, num_micro: int) -> int:
    """Micro-batches whose activations a stage holds at its peak.

    GPipe (and LoopedBFS, its looped form) runs all forwards before any backward: every
    micro-batch is in flight. 1F1B (Narayanan et al., 2021, §2.2) caps stage s of p at p − s in
    flight; the interleaved and zero-bubble schedules are charged the same here (the simulator
    counts them exactly from their op order).
    """
    if schedule.lower().removeprefix("schedule") in ("gpipe", "loopedbfs"):
        return num_micro
    return max(1, min(num_micro, num_stages - stage))


def stage_memory_bytes(
    profile: ModelProfile,
    start: int,
    end: int,
    mbs: int,
    *,
    tp: int = 1,
    dp: int = 1,
    fsdp: bool = False,
    recompute: bool = False,
    in_flight: int = 1,
) -> float:
    """Peak bytes on one rank of a stage: weights, grads, optimizer state, live activations.

    FSDP shards params, grads and optimizer state over the dp replicas (ZeRO-3); TP shards them
    by the measured shard sizes. With recompute a micro-batch keeps only each layer's input
    (the previous output) until its backward, plus one layer's activations while recomputing.
    """
    state = 0.0
    acts = 0.0
    boundary = 0.0
    biggest = 0.0
    for i in range(start, end):
        layer = profile.layers[i]
        c = layer_cost(profile, i, mbs, tp)
        unsharded = max(layer.param_bytes, 1)
        shard = c.param_bytes / unsharded
        state += c.param_bytes + (layer.grad_bytes + layer.optimizer_bytes) * shard
        acts += c.activation_bytes
        boundary += c.output_bytes
        biggest = max(biggest, c.activation_bytes)
    if fsdp and dp > 1:
        state /= dp
    live = (boundary * in_flight + biggest) if recompute else acts * in_flight
    return profile.overhead_bytes + state + live
