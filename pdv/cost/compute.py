"""What a model profile says about each layer, and how a device of the cluster scales it.

Times come from the profile's per-layer fit t = a + b·micro_batch at the TP degree's local shard
shapes. Where a profile has no fit (a hand-written or single-point profile), the reference
measurement is scaled linearly in micro-batch size. Below the smallest profiled size the fit is
an extrapolation: pdv plan searches no stage whose replicas run fewer samples than that
(pdv.plan.problem.PlanProblem.replica_batch_ok), and simulating a plan that has one says so.
A device that the cluster measured slower or faster than the device the profile was taken on is
priced by the ratio of their measured matmul throughputs (both numbers are measurements).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pdv.artifacts import (
    ClusterArtifact,
    ClusterDevice,
    LayerProfile,
    LayerSample,
    ModelProfile,
    Plan,
    TimeFit,
)
from pdv.errors import PdvError

__all__ = [
    "LayerCost",
    "fsdp_heap_note",
    "fsdp_unpriced_note",
    "ProfileArrays",
    "layer_cost",
    "profile_arrays",
    "profile_for",
    "rank_overhead_bytes",
    "rank_overheads",
    "SharedPlaces",
    "shared_places",
    "smallest_batch",
    "speed_factor",
    "unpriced_note",
    "unsteady_note",
    "unsteady_ranks",
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
    backward_bytes: float = 0.0
    """the backward's peak above what the forward left alive, per micro-batch"""


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
    return LayerCost(fwd, bwd, params, per_sample_act * mbs, per_sample_out * mbs,
                     _backward_bytes(layer, tp_samples, mbs, ref))


def _backward_bytes(layer: LayerProfile, samples: list[LayerSample], mbs: int,
                    ref: int) -> float:
    """The backward's peak at mbs: the measured point, else the least-squares line through the
    measured sizes (a part of it, the parameters' gradient temporaries, does not grow with the
    micro-batch), else the reference point scaled."""
    exact = [s.backward_bytes for s in samples if s.micro_batch_size == mbs]
    if exact:
        return float(exact[0])
    if len({s.micro_batch_size for s in samples}) >= 2:
        x = np.array([s.micro_batch_size for s in samples], dtype=float)
        y = np.array([s.backward_bytes for s in samples], dtype=float)
        slope, intercept = np.polyfit(x, y, 1)
        return max(float(intercept + slope * mbs), 0.0)
    if samples:
        return samples[0].backward_bytes / samples[0].micro_batch_size * mbs
    return layer.backward_bytes / ref * mbs


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


def rank_overheads(device: ClusterDevice) -> tuple[float, ...]:
    """The rank's measured overheads in RankView's order: per micro-batch forward and backward
    and per step of the pipeline schedule's own work, then FSDP's own work per unit (a, b of
    each gathering op; a, b of the step's reduce-scatter), then the gradient sync's excess after
    compute and the plain replicas' gradient passes per byte, then the sync's two bursts and
    its excess after the longer one, as ``pdv profile cluster`` measured them (zeros where the
    cluster predates a probe or was declared: then the terms are unpriced, see
    :func:`unpriced_note`)."""
    o = device.overheads
    if o is None:
        return (0.0,) * 12
    g, r, long = o.fsdp_gather, o.fsdp_reduce_scatter, o.sync_after_long_compute
    return (o.fwd_s, o.bwd_s, o.step_s,
            g.a_s if g else 0.0, g.b_s_per_byte if g else 0.0,
            r.a_s if r else 0.0, r.b_s_per_byte if r else 0.0,
            o.sync_after_compute_s or 0.0, o.grad_passes_s_per_byte or 0.0,
            long.burst_s if long else 0.0, long.long_burst_s if long else 0.0,
            long.long_excess_s if long else 0.0)


def smallest_batch(profiles: Mapping[str, ModelProfile]) -> int:
    """The smallest micro-batch size every profile measured: below it a time extrapolates."""
    return max(min(p.micro_batch_sizes) for p in profiles.values())


def unpriced_note(cluster: ClusterArtifact) -> str | None:
    """A note naming the ranks whose schedule and per-message overheads are priced as zero."""
    missing = [d.rank for d in cluster.devices if d.overheads is None]
    if not missing:
        return None
    which = "every rank" if len(missing) == len(cluster.devices) else f"ranks {missing}"
    why = ("a declared cluster has no measurement of them"
           if cluster.provenance.method == "declared"
           else "the cluster was not profiled with the overhead probe (re-run pdv profile cluster)")
    return f"pipeline schedule and per-message overheads unpriced (0) on {which}: {why}"


def fsdp_unpriced_note(plan: Plan, cluster: ClusterArtifact) -> str | None:
    """A note naming the FSDP stages' ranks whose FSDP own work is priced as zero."""
    ranks = sorted({r for st in plan.stages if st.fsdp and st.dp > 1 for r in st.ranks
                    if (o := cluster.devices[r].overheads) is None or o.fsdp_gather is None})
    if not ranks:
        return None
    return (f"FSDP's own work per unit (hooks, copies, resharding) unpriced (0) on ranks "
            f"{ranks}: the cluster has no FSDP probe (pdv profile cluster with --collectives "
            "measures it)")


def fsdp_heap_note(plan: Plan, cluster: ClusterArtifact) -> str | None:
    """A note naming the CPU ranks of FSDP stages, whose resident memory is above its price."""
    ranks = sorted({r for st in plan.stages if st.fsdp and st.dp > 1 for r in st.ranks
                    if cluster.devices[r].kind == "cpu"})
    if not ranks:
        return None
    return (f"FSDP on CPU ranks {ranks}: peak memory is priced as the tensors held; glibc's heap "
            "keeps the space FSDP's gather and reduce-scatter buffers freed resident, measured at "
            "6-10x the units' parameter bytes beyond it (docs/design-notes.md, \"FSDP's "
            "resident heap on CPU\"); leave that headroom or plan without FSDP")


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


UNSTEADY_SPREAD = 0.05
"""a rank is flagged when none of its other matmul windows alone (three, at three points of
the cluster probe) came within this of its best one. A spell only slows, so one low window is
a dip the best survives, while a best that nothing confirms may be a spell's. On this
project's 2-vCPU VM: the seven earlier files that keep windows (/tmp/pz17-pz22, the held-out
round's) confirmed every best within 1.8%; a file taken in a slow spell that outlasted its
probe (/tmp/pz23) read rank 0 at 98.9 / 91.8 / 86.1 GFLOP/s (second 7.7% under), while the
model profiles a few minutes later read ~100. A diagnostic, priced nowhere"""


def unsteady_ranks(cluster: ClusterArtifact) -> list[tuple[int, float, float]]:
    """Ranks whose speed moved during the cluster probe: (rank, lowest, highest) FLOP/s alone.

    The cost model scales every layer by the rank's best window (:func:`speed_factor`), which
    is right when another window confirms it; when none does, the probe ran while the
    machine's speed moved, and the rate kept may be a spell's rather than the runs'. Read from
    the windows the probe keeps in each device's details (absent in declared clusters: none
    flagged).
    """
    out = []
    for d in cluster.devices:
        windows = sorted((float(w) for w in (d.details or {}).get("matmul_flops_alone_windows")
                          or () if w), reverse=True)
        if len(windows) >= 2 and windows[0] > (1 + UNSTEADY_SPREAD) * windows[1]:
            out.append((d.rank, windows[-1], windows[0]))
    return out


def unsteady_note(cluster: ClusterArtifact) -> str | None:
    """One line for the user when :func:`unsteady_ranks` flags any rank; None otherwise."""
    flagged = unsteady_ranks(cluster)
    if not flagged:
        return None
    worst = max(flagged, key=lambda r: r[2] / r[1])
    return (f"the machine's speed moved during the cluster probe: {len(flagged)} rank(s)' best "
            f"matmul window alone was not confirmed within {UNSTEADY_SPREAD:.0%} by another "
            f"(rank {worst[0]}: {worst[1] / 1e9:.1f} .. {worst[2] / 1e9:.1f} GFLOP/s); compute "
            "is priced at each rank's best window, which may be a slow spell's: profile the "
            "cluster again when the machine is quiet")


SPELL_RATIO = 1.2
"""a model profile and a cluster file are flagged as taken in different states of the machine
when their small-op reference steps differ by more than this factor. On this project's 2-vCPU
VM, 0.5 s windows over a minute read 643 µs at the least, 650 at p25, 657 at the median and
721 at p75, and its spells 1050-1270 µs (1.6-1.8×). A diagnostic, priced nowhere"""


def spell_apart(ratio: float | None) -> bool:
    """Whether a :func:`spell_ratio` is past :data:`SPELL_RATIO` either way (None: not)."""
    return ratio is not None and not 1 / SPELL_RATIO <= ratio <= SPELL_RATIO


def spell_ratio(profile: ModelProfile, cluster: ClusterArtifact) -> float | None:
    """The profile's small-op reference step over the fastest of the cluster's ranks of its
    kind (None where either was not measured)."""
    here = profile.device.small_op_step_s
    there = [d.small_op_step_s for d in cluster.devices
             if d.kind == profile.device.kind and d.small_op_step_s]
    if not here or not there:
        return None
    return here / min(there)


def spell_note(name: str, profile: ModelProfile, cluster: ClusterArtifact) -> str | None:
    """One line for the user when :func:`spell_ratio` is past :data:`SPELL_RATIO` either way;
    None otherwise. `name` says which profile (e.g. "the cpu profile")."""
    ratio = spell_ratio(profile, cluster)
    if ratio is None or not spell_apart(ratio):
        return None
    if ratio > 1:
        return (f"{name} ran the small-op reference {ratio:.2f}x slower than the "
                "cluster file's ranks did: it was taken in a slow spell of the machine and "
                "prices its layers slow; profile the model again when the machine is quiet")
    return (f"the cluster file's ranks ran the small-op reference {1 / ratio:.2f}x slower than "
            f"{name} did: the cluster file was taken in a slow spell of the machine; "
            "profile the cluster again when the machine is quiet")


def spell_notes(profiles: Mapping[str, ModelProfile], cluster: ClusterArtifact) -> list[str]:
    """:func:`spell_note` of each profile (by device kind) that has one."""
    return [n for kind, prof in sorted(profiles.items())
            if (n := spell_note(f"the {kind} profile", prof, cluster))]


@dataclass(frozen=True)
class ProfileArrays:
    """Every layer of one profile at one per-replica micro-batch and TP degree (one rank)."""

    fwd: np.ndarray
    bwd: np.ndarray
    params: np.ndarray
    """parameter bytes of the rank's TP shard"""
    shard: np.ndarray
    """the shard's share of the layer's parameters (1 where the layer has none)"""
    grads: np.ndarray
    """gradient bytes of the shard"""
    optimizer_bytes: np.ndarray
    """optimizer-state bytes of the shard"""
    optimizer_s: np.ndarray
    """one optimizer step over the shard (the step is elementwise: it scales with the share)"""
    activations: np.ndarray
    """bytes saved for backward, per micro-batch"""
    outputs: np.ndarray
    """bytes of the layer's output, per micro-batch"""
    backward: np.ndarray
    """the backward's peak above what the forward left alive, per micro-batch"""


def _arrays(profile: ModelProfile, mbs: int, tp: int) -> ProfileArrays:
    rows = [layer_cost(profile, i, mbs, tp) for i in range(len(profile.layers))]
    params = np.array([c.param_bytes for c in rows], dtype=float)
    shard = np.array(
        [c.param_bytes / x.param_bytes if x.param_bytes else 1.0
         for c, x in zip(rows, profile.layers, strict=True)]
    )  # fmt: skip
    return ProfileArrays(
        fwd=np.array([c.fwd_s for c in rows], dtype=float),
        bwd=np.array([c.bwd_s for c in rows], dtype=float),
        params=params,
        shard=shard,
        grads=np.array([x.grad_bytes for x in profile.layers], dtype=float) * shard,
        optimizer_bytes=np.array([x.optimizer_bytes for x in profile.layers], dtype=float) * shard,
        optimizer_s=np.array([x.optimizer_s or 0.0 for x in profile.layers], dtype=float) * shard,
        activations=np.array([c.activation_bytes for c in rows], dtype=float),
        outputs=np.array([c.output_bytes for c in rows], dtype=float),
        backward=np.array([c.backward_bytes for c in rows], dtype=float),
    )


_ARRAYS: dict[tuple[int, int, int], tuple[ModelProfile, ProfileArrays]] = {}


def profile_arrays(profile: ModelProfile, mbs: int, tp: int) -> ProfileArrays:
    """:func:`layer_cost` of every layer as arrays, cached by profile identity (profiles are
    frozen)."""
    key = (id(profile), mbs, tp)
    hit = _ARRAYS.get(key)
    if hit is None or hit[0] is not profile:
        hit = (profile, _arrays(profile, mbs, tp))
        _ARRAYS[key] = hit
    return hit[1]


_SHARED: dict[int, tuple[ModelProfile, tuple[SharedPlaces, ...]]] = {}


class SharedPlaces(NamedTuple):
    """One set of shared parameters: the layers that use them, and at each the share of the
    layer's own parameter bytes they are (so each of its terms scales by it)."""

    layers: np.ndarray
    share: np.ndarray
    state_bytes: float
    """one whole copy's parameters, gradients and optimizer state"""


def shared_places(profile: ModelProfile) -> tuple[SharedPlaces, ...]:
    """The profile's shared parameter sets (empty in profiles that did not record them),
    cached by profile identity."""
    hit = _SHARED.get(id(profile))
    if hit is None or hit[0] is not profile:
        sets = tuple(
            SharedPlaces(
                np.array(g.layers, dtype=int),
                np.array([g.param_bytes / profile.layers[i].param_bytes
                          if profile.layers[i].param_bytes else 0.0 for i in g.layers]),
                float(g.param_bytes + g.grad_bytes + g.optimizer_bytes),
            )
            for g in profile.shared
        )
        hit = (profile, sets)
        _SHARED[id(profile)] = hit
    return hit[1]


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
