"""Typed artifacts: the JSON contract between profile, plan, simulate and run.

Every artifact is one JSON object with ``"schema": "pdv.<kind>/v<N>"`` and a ``provenance``
block. Units are SI (seconds, bytes, bytes per second); human units live at the CLI edge only.
Writing is atomic and deterministic (sorted keys, no timestamps), so identical inputs give
identical bytes and a failed write never leaves half a file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from pdv import __version__
from pdv.errors import PdvError

__all__ = [
    "KINDS",
    "SCHEDULES",
    "Artifact",
    "ClusterArtifact",
    "ClusterDevice",
    "DeviceInfo",
    "LayerChoice",
    "LayerProfile",
    "LayerSample",
    "HostRing",
    "Links",
    "FsdpUnitCost",
    "MessageCost",
    "ModelProfile",
    "ModelSpec",
    "Plan",
    "PlanStage",
    "PLAN_SCHEMA",
    "Planner",
    "Predicted",
    "Provenance",
    "Replan",
    "RunMeasured",
    "RankOverheads",
    "SyncAfterLongCompute",
    "RunReport",
    "Schedule",
    "SharedParams",
    "SlowRank",
    "StagePrediction",
    "TimeFit",
    "WholeModelTiming",
    "canonical_schedule",
    "digest",
    "dumps",
    "load",
    "load_as",
    "load_profiles",
    "parse",
    "schema_of",
    "write",
]


def _drop_none(data: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        for key in keys:
            if data.get(key, 0) is None:
                data.pop(key)
    return data


class _Strict(BaseModel):
    # Frozen so an artifact read once cannot drift; extra="forbid" so a typo in a hand-written
    # file is an error naming the field rather than a silently ignored key.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Provenance(_Strict):
    """Where an artifact came from."""

    pdv_version: str = Field(__version__, description="pdv version that wrote the artifact")
    method: Literal["measured", "estimated", "declared"] = Field(
        "declared",
        description="measured on hardware, estimated from FLOPs/bytes, or declared by a person",
    )
    inputs: dict[str, str] = Field(
        default_factory=dict, description="name -> sha256 digest of each input artifact"
    )
    notes: list[str] = Field(
        default_factory=list, description="how the numbers were obtained (methods, caveats)"
    )


class ModelSpec(_Strict):
    """How to rebuild the model: a factory reference and its keyword arguments."""

    spec: str = Field(description="'path/to/file.py:factory' or 'package.module:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="factory keyword arguments")
    split_at: list[str] = Field(
        default_factory=list,
        description="submodule names a layer starts at (a bare nn.Module's --split-at)",
    )
    blocks: list[str] = Field(
        default_factory=list,
        description="ModuleLists whose every child is a layer (a bare nn.Module's --blocks)",
    )

    @model_serializer(mode="wrap")
    def _omit_empty_cuts(self, handler: Any) -> Any:
        # A model without cut points writes what it wrote before they existed: artifacts of
        # ModelDef factories stay byte for byte the same.
        data = handler(self)
        if isinstance(data, dict):
            for key in ("split_at", "blocks"):
                if not data.get(key):
                    data.pop(key, None)
        return data


# --------------------------------------------------------------------------- model profile


class TimeFit(_Strict):
    """Least-squares fit time = a_s + b_s * micro_batch_size, and how good it is."""

    a_s: float = Field(description="fixed cost per call, seconds")
    b_s: float = Field(description="cost per sample of the micro-batch, seconds")
    r2: float = Field(description="coefficient of determination of the fit (1 = perfect)")
    max_rel_error: float = Field(description="largest |fit - measured| / measured over samples")


class LayerSample(_Strict):
    """One layer measured at one micro-batch size and TP degree (local shard shapes)."""

    micro_batch_size: int = Field(ge=1)
    tp_degree: int = Field(ge=1)
    fwd_s: float = Field(ge=0, description="median forward time, seconds")
    bwd_s: float = Field(ge=0, description="median backward time, seconds")
    fwd_spread_s: float = Field(ge=0, description="interquartile range of forward time")
    bwd_spread_s: float = Field(ge=0, description="interquartile range of backward time")
    param_bytes: int = Field(ge=0, description="parameter bytes of this rank's shard")
    activation_bytes: int = Field(
        ge=0, description="bytes saved for backward, per micro-batch of this size"
    )
    output_bytes: int = Field(ge=0, description="bytes of the output, per micro-batch")
    backward_bytes: int = Field(
        0, ge=0, description="the backward's peak above what the forward left alive (its "
        "gradients' temporaries), per micro-batch of this size; 0 in profiles before it was "
        "measured",
    )


class LayerProfile(_Strict):
    """One pipeline unit (layer) of the model, in execution order."""

    name: str
    fwd_s: float = Field(ge=0, description="forward time at the reference point, seconds")
    bwd_s: float = Field(ge=0, description="backward time at the reference point, seconds")
    param_bytes: int = Field(ge=0, description="parameter bytes, unsharded")
    grad_bytes: int = Field(ge=0, description="gradient bytes, unsharded")
    optimizer_bytes: int = Field(ge=0, description="optimizer-state bytes, unsharded")
    activation_bytes: int = Field(
        ge=0, description="bytes saved for backward per micro-batch, at the reference point"
    )
    output_bytes: int = Field(
        ge=0, description="bytes sent to the next stage per micro-batch, at the reference point"
    )
    backward_bytes: int = Field(
        0, ge=0, description="the backward's peak above what the forward left alive, per "
        "micro-batch at the reference point; 0 in profiles before it was measured",
    )
    output_tensors: int = Field(
        1, ge=1, description="tensors the layer hands on: one message each to the next stage"
    )
    output_grad_tensors: int = Field(
        1, ge=0, description="of those, the ones a gradient flows back through: one message "
        "each back from the next stage",
    )
    flops_fwd: float | None = Field(
        None, description="forward FLOPs per sample, where counted (FlopCounterMode)"
    )
    optimizer_s: float | None = Field(
        None, ge=0,
        description="one optimizer step over this layer's unsharded parameters on one rank, "
        "seconds (median); a shard's step scales with its share of the parameters",
    )
    sparse_grads: bool = Field(
        False, description="an embedding with sparse=True: its gradients are sparse, which "
        "FSDP does not shard (plans keep this layer's stage unsharded)",
    )
    samples: list[LayerSample] = Field(
        default_factory=list, description="every (micro-batch size, TP degree) point measured"
    )
    fwd_fit: dict[str, TimeFit] = Field(
        default_factory=dict, description="TP degree (as a string) -> forward-time fit"
    )
    bwd_fit: dict[str, TimeFit] = Field(
        default_factory=dict, description="TP degree (as a string) -> backward-time fit"
    )

    @model_serializer(mode="wrap")
    def _omit_single_messages(self, handler: Any) -> Any:
        # A layer handing on one tensor writes what it wrote before the counts existed: its
        # profile keeps its bytes and digest (plans name their profiles by digest).
        data = handler(self)
        if isinstance(data, dict) and data.get("output_tensors") == 1 == data.get(
                "output_grad_tensors"):
            data.pop("output_tensors", None)
            data.pop("output_grad_tensors", None)
        if isinstance(data, dict) and data.get("sparse_grads") is False:
            data.pop("sparse_grads")  # likewise: profiles of dense layers keep their digest
        return data


class WholeModelTiming(_Strict):
    """The whole model's forward+backward (all layers and the loss), timed like the layers."""

    micro_batch_size: int = Field(ge=1)
    tp_degree: int = Field(1, ge=1)
    fwd_s: float = Field(ge=0, description="median forward time (layers + loss), seconds")
    bwd_s: float = Field(ge=0, description="median backward time, seconds")
    fwd_bwd_s: float = Field(ge=0, description="median forward+backward time, seconds")
    fwd_bwd_spread_s: float = Field(ge=0, description="interquartile range of fwd+bwd time")


class DeviceInfo(_Strict):
    """The device a profile was taken on."""

    kind: str = Field(description="device kind, matched against the cluster's device kinds")
    name: str = Field(description="human name, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model")
    matmul_flops: float | None = Field(None, description="measured dense matmul throughput, FLOP/s")
    small_op_step_s: float | None = Field(
        None, gt=0, description="seconds of one forward and backward of pdv's small-op "
        "reference net, the median of readings over the profile (absent: not measured)")

    @model_serializer(mode="wrap")
    def _omit_unmeasured(self, handler: Any) -> Any:
        return _drop_none(handler(self), ("small_op_step_s",))


class SharedParams(_Strict):
    """Parameters several layers use: a tied embedding and LM head, one module at several
    places. Each layer's own bytes count them; a stage holding several of the places holds one
    copy, and a plan that splits the places syncs the copies' gradients once per step."""

    layers: list[int] = Field(min_length=2, description="the layers that use them, ascending")
    param_bytes: int = Field(ge=0, description="bytes of one copy of the shared parameters")
    grad_bytes: int = Field(ge=0, description="their gradient bytes (trainable ones)")
    optimizer_bytes: int = Field(ge=0, description="their optimizer-state bytes")
    tensors: int = Field(1, ge=1, description="how many parameter tensors they are (each is "
                         "its own all-reduce where stages split the places)")


class ModelProfile(_Strict):
    """Per-layer compute time and memory of one model on one device kind."""

    schema_: Literal["pdv.model-profile/v1"] = Field("pdv.model-profile/v1", alias="schema")
    provenance: Provenance = Field(default_factory=Provenance)
    model: ModelSpec
    device: DeviceInfo
    dtype: str = Field("float32", description="parameter and activation dtype")
    optimizer: str = Field("adam", description="optimizer whose state bytes are counted")
    reference_micro_batch_size: int = Field(
        1, ge=1, description="micro-batch size of the per-layer top-level numbers (TP degree 1)"
    )
    micro_batch_sizes: list[int] = Field(default_factory=lambda: [1])
    tp_degrees: list[int] = Field(default_factory=lambda: [1])
    overhead_bytes: int = Field(
        0, ge=0, description="per-device constant memory (runtime, allocator, buffers)"
    )
    layers: list[LayerProfile] = Field(min_length=1)
    whole_model: WholeModelTiming | None = Field(
        None, description="timed whole-model fwd+bwd at the reference point, to check layer sums"
    )
    shared: list[SharedParams] = Field(
        default_factory=list, description="parameters several layers use, one entry per set "
        "of layers; empty in profiles before it was recorded (each place then counts a copy)"
    )

    model_config = ConfigDict(populate_by_name=True)

    def model_param_bytes(self) -> int:
        """The model's parameter bytes: the layers' own, each shared parameter counted once."""
        repeated = sum(s.param_bytes * (len(s.layers) - 1) for s in self.shared)
        return sum(x.param_bytes for x in self.layers) - repeated

    def model_state_bytes(self) -> int:
        """Parameters, gradients and optimizer state of the model, shared ones counted once."""
        repeated = sum((s.grad_bytes + s.optimizer_bytes) * (len(s.layers) - 1)
                       for s in self.shared)
        return (self.model_param_bytes() - repeated
                + sum(x.grad_bytes + x.optimizer_bytes for x in self.layers))

    @model_validator(mode="after")
    def _shared_layers_exist(self) -> ModelProfile:
        n = len(self.layers)
        for group in self.shared:
            if group.layers != sorted(set(group.layers)) or group.layers[-1] >= n or \
                    group.layers[0] < 0:
                raise ValueError(f"shared parameters' layers {group.layers}: need distinct "
                                 f"ascending layer indices below {n}")
        return self


# --------------------------------------------------------------------------- cluster


class MessageCost(_Strict):
    """CPU time one point-to-point message costs a rank: a_s + b_s_per_byte * S; messages
    posted together (a boundary's tensors) pay a_s once and batched_a_s for each after it."""

    a_s: float = Field(ge=0, description="per message, seconds")
    b_s_per_byte: float = Field(ge=0, description="per byte, seconds")
    batched_a_s: float | None = Field(
        None, ge=0, description="per message after the first of several posted together to one "
        "peer (batch_isend_irecv), seconds; None (files before it): a_s")

    @model_serializer(mode="wrap")
    def _omit_unmeasured(self, handler: Any) -> Any:
        # files without the batch probe keep their bytes and digest (plans name them by digest)
        data = handler(self)
        if isinstance(data, dict) and data.get("batched_a_s") is None:
            data.pop("batched_a_s", None)
        return data


class FsdpUnitCost(_Strict):
    """FSDP2's own work per unit and op besides the collective: a_s + b_s_per_byte * S, S the
    unit's unsharded parameter bytes."""

    a_s: float = Field(ge=0, description="per unit and op, seconds")
    b_s_per_byte: float = Field(ge=0, description="per byte of the unit, seconds")


class SyncAfterLongCompute(_Strict):
    """The gradient sync's excess after a longer burst of compute than the one
    ``sync_after_compute_s`` was measured after: a stage's excess is priced between the two
    by its compute per step (pdv.cost.terms.sync_after_compute)."""

    burst_s: float = Field(gt=0, description="the compute before each round that "
                           "sync_after_compute_s prices, mean seconds")
    long_burst_s: float = Field(gt=0, description="the longer compute before each round, mean "
                                "seconds")
    long_excess_s: float = Field(ge=0, description="the pair's first all-reduce after the "
                                 "longer compute, each round's later end, beyond the sweep's "
                                 "price (mean, seconds)")


class RankOverheads(_Strict):
    """What a rank pays in a pipeline besides its layers and the wire, measured on the rank.

    ``pdv profile cluster`` times torch.distributed.pipelining on a one-rank stage with a
    one-parameter layer, the rank probing alone (the bookkeeping: recv buffers, autograd
    calls, output checks, loss call), the CPU each p2p message costs its sender and its
    receiver on the real backend, and a collective's excess right after compute.
    """

    fwd_s: float = Field(ge=0, description="per stage and micro-batch: forward_one_chunk and "
                         "the loss call around a layer that costs nothing")
    bwd_s: float = Field(ge=0, description="per stage and micro-batch: backward_one_chunk")
    step_s: float = Field(ge=0, description="per step: zero_grad and the schedule's own work "
                          "(split, merge, state reset) besides its micro-batches")
    send_cpu: MessageCost | None = Field(
        None, description="process CPU per message sent (CPU ranks: it competes with compute)")
    recv_cpu: MessageCost | None = Field(
        None, description="process CPU per message received")
    sync_after_compute_s: float | None = Field(
        None, ge=0, description="per step of a stage with replicas: what the gradient sync's "
        "first collective pays beyond the back-to-back sweeps, coming to it from compute (the "
        "backend's threads waking, a partner finishing its equal work later); CPU ranks")
    sync_after_long_compute: SyncAfterLongCompute | None = Field(
        None, description="the same excess after a burst about ten times as long; without it "
        "the excess does not grow with a stage's compute")
    grad_passes_s_per_byte: float | None = Field(
        None, ge=0, description="per step of a stage with plain replicas, per byte of the "
        "gradients they all-reduce: zeroing the flat gradient buffer before the first backward "
        "and dividing it by the replica count after the all-reduce (two in-place passes, "
        "timed on the rank alone)")
    fsdp_gather: FsdpUnitCost | None = Field(
        None, description="per FSDP unit and gathering op (every backward, and one more per "
        "step): hooks, copies in and out of the all-gather, resharding, beyond what the "
        "pair's all-gather α/β price")
    fsdp_reduce_scatter: FsdpUnitCost | None = Field(
        None, description="per FSDP unit and step: the gradients' reduce-scatter side, beyond "
        "what the pair's reduce-scatter α/β price")


class ClusterDevice(_Strict):
    """One rank's device."""

    rank: int = Field(ge=0)
    host: str
    kind: str = Field(description="device kind; a model profile of this kind prices it")
    memory_bytes: int = Field(gt=0, description="memory available to the rank")
    name: str | None = Field(None, description="human name of the device")
    matmul_flops: float | None = Field(None, description="measured matmul throughput, FLOP/s")
    matmul_flops_alone: float | None = Field(
        None,
        description="matmul FLOP/s with this rank probing alone (matmul_flops: all ranks at "
        "once); each is the best of windows spread over the cluster probe; where they differ, "
        "the host's ranks share its cores",
    )
    small_op_step_s: float | None = Field(
        None, gt=0, description="seconds of one forward and backward of pdv's small-op "
        "reference net with this rank probing alone, the fastest of windows spread over the "
        "cluster probe (absent: not measured)")
    runtime_bytes: int | None = Field(
        None, ge=0,
        description="memory the rank holds before any model is built: its process under "
        "torchrun with the process group up, as its memory cap counts it (cgroup charge where "
        "capped, else resident set; CUDA: device memory in use)",
    )
    runtime_own_bytes: int | None = Field(
        None, ge=0,
        description="of runtime_bytes, the rank's own process (its resident set, read at the "
        "same moment); the rest is what its cap also counts: the launcher in its cgroup, page "
        "cache",
    )
    overheads: RankOverheads | None = Field(
        None, description="pipeline bookkeeping and per-message CPU, measured on the rank "
        "(absent: not measured, priced as zero)")
    details: dict[str, Any] = Field(
        default_factory=dict, description="what the probe reported (NVML, psutil)"
    )

    @model_serializer(mode="wrap")
    def _omit_unmeasured(self, handler: Any) -> Any:
        # Devices measured before the overhead probe (and every plan that copies them) keep
        # their bytes.
        return _drop_none(handler(self), ("overheads", "small_op_step_s"))


class HostRing(_Strict):
    """An all-reduce over every rank of one host, measured as one group."""

    ranks: list[int] = Field(min_length=3, description="the host's ranks, ascending")
    alpha_s: float = Field(ge=0, description="α per ring step: the group's all-reduce of S "
                           "bytes took 2(n−1)α + 2(n−1)/n·S/β")
    bandwidth_Bps: float = Field(gt=0, description="β of that ring, bytes per second")


class Links(_Strict):
    """Point-to-point α/β between every ordered pair; row = sender, column = receiver."""

    latency_s: list[list[float]] = Field(description="α: fixed cost of one message, seconds")
    bandwidth_Bps: list[list[float]] = Field(description="β: bytes per second")
    collective_latency_s: list[list[float]] | None = Field(
        None,
        description="α of an all-reduce over the pair (symmetric): a 2-rank all-reduce of S "
        "bytes took 2α + S/β; absent where not measured (rings then use latency_s)",
    )
    collective_bandwidth_Bps: list[list[float]] | None = Field(
        None,
        description="β of an all-reduce over the pair (symmetric), bytes per second; includes "
        "the backend's copies and reductions that point-to-point transfers do not pay",
    )
    gather_latency_s: list[list[float]] | None = Field(
        None, description="α of an all-gather over the pair (FSDP's parameter gather): "
        "gathering S bytes on 2 ranks took α + S/(2β); absent: rings use the all-reduce's")
    gather_bandwidth_Bps: list[list[float]] | None = Field(
        None, description="β of an all-gather over the pair, bytes per second")
    scatter_latency_s: list[list[float]] | None = Field(
        None, description="α of a reduce-scatter over the pair (FSDP's gradient sync): an "
        "input of S bytes on 2 ranks took α + S/(2β); absent: rings use the all-reduce's")
    scatter_bandwidth_Bps: list[list[float]] | None = Field(
        None, description="β of a reduce-scatter over the pair, bytes per second")
    exchange_latency_s: list[list[float]] | None = Field(
        None, description="what a pipeline message pays beyond α + S/β when its ends come to "
        "it from compute, as a step's do (measured on CPU ranks: gloo's loop threads waking "
        "and waiting out scheduler slices); paid once per exchange (a boundary's messages "
        "between two ranks), besides their α + S/β; absent: nothing")
    exchange_latency_alone_s: list[list[float]] | None = Field(
        None, description="the same excess measured while the receiver's host has no other "
        "rank busy (its pairs take turns; hosts with more ranks than one pair): on "
        "oversubscribed cores the slow landings come from waiting for a core, so a simulated "
        "transfer pays between this and exchange_latency_s by how many of the host's other "
        "ranks compute or exchange at the time; absent: exchange_latency_s")
    host_rings: list[HostRing] | None = Field(
        None, description="all-reduces over each host's whole set of ranks (hosts with 3 or "
        "more): where ranks outnumber cores, a ring step waits for the scheduler, which no pair "
        "measures; a ring with 3 or more ranks on such a host is priced no faster than it")

    @model_serializer(mode="wrap")
    def _omit_unmeasured(self, handler: Any) -> Any:
        # Links measured before the FSDP sweep (and every plan that copies them) keep their bytes.
        return _drop_none(handler(self), ("gather_latency_s", "gather_bandwidth_Bps",
                                          "scatter_latency_s", "scatter_bandwidth_Bps",
                                          "exchange_latency_s", "exchange_latency_alone_s",
                                          "host_rings"))


class ClusterArtifact(_Strict):
    """Devices and the measured (or declared) network between them."""

    schema_: Literal["pdv.cluster/v1"] = Field("pdv.cluster/v1", alias="schema")
    provenance: Provenance = Field(default_factory=Provenance)
    devices: list[ClusterDevice] = Field(min_length=1)
    links: Links
    measurement: dict[str, Any] = Field(
        default_factory=dict, description="how links were measured: sizes, rounds, fit quality"
    )

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _check_shape(self) -> ClusterArtifact:
        n = len(self.devices)
        ranks = [d.rank for d in self.devices]
        if ranks != list(range(n)):
            raise ValueError(f"devices must be listed by rank 0..{n - 1}, got ranks {ranks}")
        for name, m in (
            ("latency_s", self.links.latency_s),
            ("bandwidth_Bps", self.links.bandwidth_Bps),
            ("collective_latency_s", self.links.collective_latency_s),
            ("collective_bandwidth_Bps", self.links.collective_bandwidth_Bps),
            ("gather_latency_s", self.links.gather_latency_s),
            ("gather_bandwidth_Bps", self.links.gather_bandwidth_Bps),
            ("scatter_latency_s", self.links.scatter_latency_s),
            ("scatter_bandwidth_Bps", self.links.scatter_bandwidth_Bps),
            ("exchange_latency_s", self.links.exchange_latency_s),
            ("exchange_latency_alone_s", self.links.exchange_latency_alone_s),
        ):
            if m is None:
                continue
            if len(m) != n or any(len(row) != n for row in m):
                raise ValueError(f"links.{name} must be a {n}x{n} matrix (one row per device)")
        for ring in self.links.host_rings or ():
            if ring.ranks != sorted(set(ring.ranks)) or ring.ranks[-1] >= n:
                raise ValueError(f"links.host_rings: ranks {ring.ranks} must be distinct, "
                                 f"ascending ranks below {n}")
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                if self.links.bandwidth_Bps[i][j] <= 0:
                    raise ValueError(f"links.bandwidth_Bps[{i}][{j}] must be > 0")
                if self.links.latency_s[i][j] < 0:
                    raise ValueError(f"links.latency_s[{i}][{j}] must be >= 0")
                coll_bw = self.links.collective_bandwidth_Bps
                if coll_bw is not None and coll_bw[i][j] <= 0:
                    raise ValueError(f"links.collective_bandwidth_Bps[{i}][{j}] must be > 0")
                coll_lat = self.links.collective_latency_s
                if coll_lat is not None and coll_lat[i][j] < 0:
                    raise ValueError(f"links.collective_latency_s[{i}][{j}] must be >= 0")
                for kind in ("gather", "scatter"):
                    kb = getattr(self.links, f"{kind}_bandwidth_Bps")
                    if kb is not None and kb[i][j] <= 0:
                        raise ValueError(f"links.{kind}_bandwidth_Bps[{i}][{j}] must be > 0")
                    kl = getattr(self.links, f"{kind}_latency_s")
                    if kl is not None and kl[i][j] < 0:
                        raise ValueError(f"links.{kind}_latency_s[{i}][{j}] must be >= 0")
        return self


# --------------------------------------------------------------------------- plan


Schedule = Literal[
    "GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble"
]
"""The pipeline schedules a plan may name: torch.distributed.pipelining's, canonically spelt."""
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)


def _schedule_key(name: str) -> str:
    return name.lower().removeprefix("schedule").replace("_", "").replace("-", "")


def canonical_schedule(name: str) -> Schedule:
    """The canonical spelling of a schedule name ('interleaved1f1b', 'ScheduleGPipe', ...)."""
    for canon in SCHEDULES:
        if _schedule_key(canon) == _schedule_key(name):
            return canon
    raise PdvError(
        f"schedule {name!r} is not one pdv models; use one of {', '.join(SCHEDULES)} "
        f"(DualPipeV is not modelled yet)"
    )


class LayerChoice(_Strict):
    """How one layer of a stage runs: its TP degree, FSDP, recompute."""

    tp: int = Field(1, ge=1, description="1 (replicated inside the TP group) or the stage's tp")
    fsdp: bool = Field(False, description="the layer is its own FSDP2 unit over the replicas")
    recompute: bool = Field(False, description="activation checkpointing for the layer")


class PlanStage(_Strict):
    """One pipeline stage: a range of layers on a group of ranks."""

    layers: tuple[int, int] = Field(description="[start, end) into the profile's layers")
    ranks: list[int] = Field(min_length=1, description="global ranks, dp-major: replica r, shard t")
    dp: int = Field(1, ge=1, description="data-parallel replicas of this stage")
    tp: int = Field(1, ge=1, description="tensor-parallel degree inside each replica")
    fsdp: bool = Field(False, description="shard params/grads/optimizer over the replicas (FSDP2)")
    recompute: bool = Field(False, description="activation checkpointing for the stage's layers")
    layer_sharding: list[LayerChoice] | None = Field(
        None,
        description="one entry per layer where choices differ inside the stage; a key an entry "
        "leaves out takes the stage's value",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_layer_defaults(cls, data: Any) -> Any:
        # A hand-written entry may name only what differs ({"tp": 1}): the rest is the stage's.
        if not isinstance(data, dict) or not isinstance(data.get("layer_sharding"), list):
            return data
        fields = LayerChoice.model_fields
        base = {k: data.get(k, fields[k].default) for k in fields}
        entries = [{**base, **e} if isinstance(e, dict) else e for e in data["layer_sharding"]]
        return {**data, "layer_sharding": entries}

    @model_validator(mode="after")
    def _check(self) -> PlanStage:
        if self.layers[0] >= self.layers[1]:
            raise ValueError(f"stage layers {list(self.layers)} must be a non-empty [start, end)")
        if self.dp * self.tp != len(self.ranks):
            raise ValueError(f"stage has {len(self.ranks)} ranks but dp*tp = {self.dp}*{self.tp}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"stage lists a rank twice: {self.ranks}")
        n = self.layers[1] - self.layers[0]
        if self.layer_sharding is not None:
            if len(self.layer_sharding) != n:
                raise ValueError(
                    f"stage with layers {list(self.layers)} has {len(self.layer_sharding)} "
                    f"layer_sharding entries; it needs one per layer ({n})"
                )
            for i, c in enumerate(self.layer_sharding):
                if c.tp not in (1, self.tp):
                    raise ValueError(
                        f"layer {self.layers[0] + i}: layer_sharding tp {c.tp} must be 1 "
                        f"(replicated) or the stage's tp {self.tp}"
                    )
        return self

    @property
    def choice(self) -> LayerChoice:
        """The stage's own (tp, fsdp, recompute), which its layers take unless they differ."""
        return LayerChoice(tp=self.tp, fsdp=self.fsdp, recompute=self.recompute)

    def layer_choices(self) -> list[LayerChoice]:
        """Each layer's choice, in layer order."""
        if self.layer_sharding is None:
            return [self.choice] * (self.layers[1] - self.layers[0])
        return list(self.layer_sharding)


class StagePrediction(_Strict):
    """Predicted per-stage breakdown for one training step."""

    compute_s: float = Field(
        description="forward+backward compute over all micro-batches, plus the optimizer step"
    )
    p2p_s: float = Field(description="activation/gradient transfers to the next stage")
    collective_s: float = Field(description="TP collectives and DP/FSDP gradient sync")
    peak_memory_bytes: int = Field(description="peak memory per rank of this stage")


class Predicted(_Strict):
    """What the cost model/simulator predicts for one step."""

    step_time_s: float
    peak_memory_bytes: dict[str, int] = Field(description="global rank (string) -> bytes")
    bubble_fraction: float | None = None
    stages: list[StagePrediction] = Field(default_factory=list)


class Planner(_Strict):
    """How the plan was found. Wall-clock search time is printed, not stored (determinism)."""

    name: str = Field("manual", description="pdv | hierarchy | uniform | pipedream | manual")
    status: str = Field("n/a", description="solver status, e.g. OPTIMAL or FEASIBLE")
    optimality_gap: float | None = Field(None, description="relative gap reported by the solver")
    candidates: int | None = Field(None, description="candidates evaluated (deterministic)")
    notes: list[str] = Field(
        default_factory=list,
        description="what the search decided and why: which generator's layout won, and by "
        "how much the search's objective and the simulator disagree on it",
    )


PLAN_SCHEMA = "pdv.plan/v2"
_DEVICE_RUN_KEYS = ("host", "kind", "memory_bytes", "name", "matmul_flops", "matmul_flops_alone",
                    "runtime_bytes", "runtime_own_bytes")  # fmt: skip


def _device_runs(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Consecutive ranks with the same fields become one entry {"ranks": [first, last], ...};
    # what the probe reported (`details`) stays in the cluster file.
    runs: list[dict[str, Any]] = []
    for d in sorted(devices, key=lambda d: d["rank"]):
        fields = {k: d[k] for k in _DEVICE_RUN_KEYS if d.get(k) is not None}
        last = runs[-1] if runs else None
        if last is not None and last["ranks"][1] + 1 == d["rank"] and \
                {k: v for k, v in last.items() if k != "ranks"} == fields:  # fmt: skip
            last["ranks"][1] = d["rank"]
        else:
            runs.append({"ranks": [d["rank"], d["rank"]], **fields})
    return runs


def _expand_runs(entries: list[Any]) -> list[Any]:
    out: list[Any] = []
    for e in entries:
        if isinstance(e, dict) and "ranks" in e and "rank" not in e:
            ranks = e["ranks"]
            if not (isinstance(ranks, list) and len(ranks) == 2 and
                    all(isinstance(r, int) for r in ranks) and ranks[0] <= ranks[1]):  # fmt: skip
                raise ValueError(f"devices: ranks {ranks!r} must be [first, last] rank numbers")
            rest = {k: v for k, v in e.items() if k != "ranks"}
            out.extend({"rank": r, **rest} for r in range(ranks[0], ranks[1] + 1))
        else:
            out.append(e)
    return out


class Plan(_Strict):
    """A training plan: stages, micro-batching, schedule, and its prediction.

    Schema v2 writes the cluster's devices as runs of consecutive alike ranks, without what
    the probe reported about each (v1 listed every device with its probe details: 382 KB for
    a 1024-rank cluster); the cluster's digest is in the provenance and `pdv simulate` takes
    the cluster file for the links. Every rank stays listed: launching, `pdv replan` (devices
    matched by host and position) and elastic runs count the cluster's ranks from it. A v1
    plan is read as v2.
    """

    schema_: Literal["pdv.plan/v2"] = Field("pdv.plan/v2", alias="schema")
    provenance: Provenance = Field(default_factory=Provenance)
    model: ModelSpec | None = Field(None, description="model to build at run time")
    stages: list[PlanStage] = Field(min_length=1)
    micro_batch_size: int = Field(ge=1)
    num_micro_batches: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    schedule: Schedule = Field("1F1B", description="GPipe | 1F1B | Interleaved1F1B | ...")
    dtype: str = Field(
        "float32",
        description="parameter and activation dtype: the one the plan's profiles were taken in "
        "(what its prediction prices) and the one pdv run trains in; float32 when absent (a "
        "float32 plan's file leaves it out, as files did before it was recorded)",
    )
    predicted: Predicted | None = None
    planner: Planner = Field(default_factory=Planner)
    devices: list[ClusterDevice] | None = Field(
        None,
        description="the cluster's devices (host, kind, memory, speed of each rank), for "
        "launching and reading; written as runs {ranks: [first, last], host, kind, ...} of "
        "consecutive ranks that are alike",
    )

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("schema") == "pdv.plan/v1":  # the same fields, devices one by one
            data["schema"] = PLAN_SCHEMA
        if isinstance(data.get("devices"), list):
            data["devices"] = _expand_runs(data["devices"])
        return data

    @field_validator("schedule", mode="before")
    @classmethod
    def _canonical_schedule(cls, value: Any) -> Any:
        # One spelling from here on: every reader compares canonical names.
        if not isinstance(value, str):
            return value
        try:
            return canonical_schedule(value)
        except PdvError as exc:
            raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------- run report


class RunMeasured(_Strict):
    """What a run measured."""

    step_time_s: float = Field(description="median step time after warm-up")
    step_time_spread_s: float = Field(description="interquartile range of step time")
    step_times_s: list[float] = Field(default_factory=list, description="every step timed")
    peak_memory_bytes: dict[str, int] = Field(description="global rank (string) -> bytes")
    memory_method: str = Field(description="how peak memory was measured on this device")
    compute_s: dict[str, float] | None = Field(
        None,
        description="global rank (string) -> median seconds per step the rank computed: its "
        "stages' forward and backward spans and its optimizer step (pdv.run.clock)",
    )
    cpu_s: dict[str, float] | None = Field(
        None,
        description="global rank (string) -> median process CPU seconds per step, all the "
        "rank's threads (its ops, the backend's own threads, Python around them); on CPU ranks "
        "what it spends beyond compute_s is CPU off the ops, which ranks sharing cores pay "
        "for in time",
    )


class SlowRank(_Strict):
    """A rank whose measured compute exceeded its calibrated prediction, steps in a row."""

    rank: int = Field(description="global rank of the plan that ran")
    stages: list[int] = Field(description="the stages the rank runs")
    step: int = Field(description="the step (0-based) that completed the run of slow steps")
    consecutive_steps: int
    measured_compute_s: float = Field(description="the rank's compute in that step")
    predicted_compute_s: float = Field(description="its stages' predicted compute_s")
    normal_ratio: float = Field(
        description="measured / predicted over all ranks in the run's first timed steps: the "
        "calibration the margin applies to"
    )
    reason: str


class Replan(_Strict):
    """One switch of an elastic run to a new plan."""

    kind: Literal["lost", "slow"] = Field(description="a rank vanished, or a rank was slow")
    reason: str
    detected_at_s: float = Field(description="seconds after the run started")
    last_step: int = Field(description="steps the furthest rank had finished when detected")
    resumed_from_step: int = Field(description="the checkpoint's step the new plan started at")
    old_plan_digest: str
    new_plan_digest: str
    devices_before: list[int] = Field(
        description="devices (ranks of the first plan's cluster) of the old plan's ranks"
    )
    devices_after: list[int] = Field(description="devices of the new plan's ranks")
    cluster_digest: str = Field(description="the survivors' re-measured cluster")
    old_predicted_step_s: float | None
    new_predicted_step_s: float | None
    old_measured_step_s: float | None = Field(
        description="median step time of the old plan's steps since it started"
    )
    new_measured_step_s: float | None = Field(
        description="median step time of the new plan's steps (after its warm-up)"
    )
    state_moved_bytes: int = Field(
        description="model and optimizer state the new plan's ranks held nowhere before "
        "(pdv.plan.replan.switch_cost)"
    )
    state_only_in_checkpoint_bytes: int = Field(
        description="of that, state whose holders are all gone: the checkpoint has it"
    )
    switch_estimate_s: float = Field(
        description="estimated time to move the rest between ranks on the re-measured links"
    )
    remeasure_s: float = Field(description="wall time of the survivors' link measurement")
    replan_s: float = Field(description="wall time of the search")


class RunReport(_Strict):
    """Measured against predicted for one run of a plan."""

    schema_: Literal["pdv.run-report/v1"] = Field("pdv.run-report/v1", alias="schema")
    provenance: Provenance = Field(default_factory=lambda: Provenance(method="measured"))
    plan_digest: str
    measured: RunMeasured
    predicted: Predicted | None
    loss: list[float]
    dtype: str = Field(
        "float32",
        description="parameter and activation dtype the run trained in (its plan's); float32 "
        "when absent, as every run before it was recorded",
    )
    slow_ranks: list[SlowRank] = Field(
        default_factory=list, description="ranks flagged slow (pdv.run.slow), in step order"
    )
    replans: list[Replan] = Field(
        default_factory=list, description="each switch to a new plan of an elastic run"
    )

    model_config = ConfigDict(populate_by_name=True)


Artifact = ModelProfile | ClusterArtifact | Plan | RunReport

KINDS: dict[str, type[BaseModel]] = {
    "model-profile": ModelProfile,
    "cluster": ClusterArtifact,
    "plan": Plan,
    "run-report": RunReport,
}
_VERSIONS = {f"pdv.{k}/v1": k for k in KINDS if k != "plan"} | {PLAN_SCHEMA: "plan"}
_READ_AS = {"pdv.plan/v1": "plan"}
"""older schemas still read (upgraded when validated)"""


# --------------------------------------------------------------------------- (de)serialization


def dumps(artifact: BaseModel, compact: bool = False) -> str:
    """Deterministic JSON text of an artifact: sorted keys, two-space indent, newline at end.

    `compact` drops the indentation (one line): a 1024-rank cluster's two N×N matrices take
    half the bytes that way. The digest always uses the indented form.
    """
    data = artifact.model_dump(mode="json", by_alias=True)
    if isinstance(artifact, Plan) and data.get("devices") is not None:
        data["devices"] = _device_runs(data["devices"])  # the file's form; Plan reads both
    if isinstance(artifact, Plan | RunReport) and data.get("dtype") == "float32":
        # Left out, as before the field existed: a float32 plan keeps its bytes and digest
        # (checkpoints and reports name plans by digest), and older pdv still reads it.
        del data["dtype"]
    if isinstance(artifact, ModelProfile):
        # Left out where not measured, as before the field existed: an older profile keeps
        # its bytes and digest (plans name their profiles by digest).
        for layer in data.get("layers", []):
            for entry in (layer, *layer.get("samples", [])):
                if entry.get("backward_bytes") == 0:
                    del entry["backward_bytes"]
        if not data.get("shared"):
            data.pop("shared", None)
    if compact:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"


def digest(artifact: BaseModel) -> str:
    """sha256 of the artifact's canonical JSON, for provenance inputs and plan digests."""
    return "sha256:" + hashlib.sha256(dumps(artifact).encode()).hexdigest()


def write(path: str | os.PathLike[str], artifact: BaseModel, compact: bool = False) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(artifact, compact)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; an artifact is meant to be shared, so honour the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def schema_of(data: Any) -> str:
    """The schema string of a parsed JSON object, or a PdvError saying why there is none."""
    if not isinstance(data, dict):
        raise PdvError("not a pdv artifact: the top level must be a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, str):
        raise PdvError('not a pdv artifact: no "schema" field (expected e.g. "pdv.plan/v2")')
    return schema


def parse(data: Any, source: str = "<input>", expect: str | None = None) -> Any:
    """Validate a parsed JSON object into its artifact type (optionally of one expected kind)."""
    schema = schema_of(data)
    kind = _VERSIONS.get(schema) or _READ_AS.get(schema)
    if kind is None:
        base = schema.rsplit("/", 1)[0]
        known = sorted(s for s in [*_VERSIONS, *_READ_AS] if s.rsplit("/", 1)[0] == base)
        if known:
            raise PdvError(f"{source}: schema {schema} is not supported; this pdv reads "
                           f"{' and '.join(known)}")
        raise PdvError(
            f"{source}: unknown schema {schema!r}; known: {', '.join(sorted(_VERSIONS))}"
        )
    if expect is not None and kind != expect:
        want = next(s for s, k in _VERSIONS.items() if k == expect)
        raise PdvError(f"{source}: expected a {want} artifact, got {schema}")
    try:
        return KINDS[kind].model_validate(data)
    except ValidationError as exc:
        raise PdvError(f"{source}: invalid {schema}: {_first_error(exc)}") from None


def load(path: str | os.PathLike[str], expect: str | None = None) -> Any:
    """Read and validate an artifact file; every failure is a one-line PdvError."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise PdvError(f"{p}: no such file") from None
    except OSError as exc:
        raise PdvError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PdvError(
            f"{p}: not valid JSON (truncated or corrupt?) at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse(data, str(p), expect)


def load_as(path: str | os.PathLike[str], kind: str) -> Any:
    """Load an artifact that must be of one kind ('model-profile', 'cluster', 'plan', ...)."""
    return load(path, expect=kind)


def load_profiles(paths: Sequence[str | os.PathLike[str]]) -> dict[str, ModelProfile]:
    """Model profiles by device kind; two profiles of one kind are a PdvError."""
    out: dict[str, ModelProfile] = {}
    for p in paths:
        prof = load_as(p, "model-profile")
        if prof.device.kind in out:
            raise PdvError(f"two profiles for device kind {prof.device.kind!r} ({p}); one per kind")
        out[prof.device.kind] = prof
    return out
