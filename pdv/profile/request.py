"""What `pdv profile model` is asked for, its checks, and the assembly of a profile.

Measuring (pdv.profile.layers) and estimating (pdv.profile.estimate) both take a
:class:`ProfileRequest`, produce one :class:`Point` per layer at each (TP degree, micro-batch
size), and hand them to :func:`assemble`, which fits time = a + b·micro_batch per layer and TP
degree and writes the model-profile artifact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pdv.artifacts import (
    LayerProfile,
    LayerSample,
    ModelProfile,
    ModelSpec,
    Provenance,
    SharedParams,
    WholeModelTiming,
)
from pdv.boundaries import Boundary
from pdv.errors import PdvError
from pdv.model_def import has_sparse_grads
from pdv.models import ModelDef, check_dtype
from pdv.profile.compute import fit_time, median_iqr, resolve_dtype
from pdv.profile.memory import OPTIMIZERS, grad_bytes, optimizer_state_bytes, param_bytes

__all__ = [
    "ProfileRequest",
    "Progress",
    "Point",
    "parse_sizes",
    "check_request",
    "check_model",
    "assemble",
]

Progress = Callable[[str, int, int], None]
"""(what is being done, steps done, steps in all) -> None; the CLI draws it as a progress bar."""


@dataclass(frozen=True)
class ProfileRequest:
    """What to profile and how; validated by :func:`profile_model`."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    split_at: tuple[str, ...] = ()
    """a bare nn.Module's cut points (--split-at)"""
    blocks: tuple[str, ...] = ()
    """a bare nn.Module's ModuleLists whose children are layers (--blocks)"""
    device: str = "cpu"
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4)
    tp_degrees: tuple[int, ...] = (1,)
    warmup: int = 3
    repeat: int = 10
    dtype: str = "float32"
    optimizer: str = "adam"
    estimate: bool = False
    device_flops: float | None = None
    """--estimate only: scale FLOPs by this throughput instead of measuring this device's."""
    device_bandwidth: float | None = None
    """--estimate only: memory bandwidth (bytes/s) of a device not at hand."""
    device_spec: str | None = None
    """--estimate only: a declared device's achievable rates, with sources (pdv.device_spec)."""
    device_kind: str | None = None
    """Override the device kind recorded (to match a cluster's kind for a device not at hand)."""
    seed: int = 0


@dataclass
class Point:
    """One layer at one (micro-batch size, TP degree): what goes into a LayerSample."""

    fwd: list[float]
    bwd: list[float]
    param_bytes: int
    activation_bytes: int
    output_bytes: int
    flops_fwd: float | None = None
    backward_bytes: int = 0

    def sample(self, mbs: int, tp: int) -> LayerSample:
        """Medians and spreads of the kept rounds as a LayerSample."""
        f, fs = median_iqr(self.fwd)
        b, bs = median_iqr(self.bwd)
        return LayerSample(micro_batch_size=mbs, tp_degree=tp, fwd_s=f, bwd_s=b,
                           fwd_spread_s=fs, bwd_spread_s=bs, param_bytes=self.param_bytes,
                           activation_bytes=self.activation_bytes,
                           output_bytes=self.output_bytes, backward_bytes=self.backward_bytes)


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): positive, distinct, sorted; anything else is a PdvError."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise PdvError(f"{option} {text!r}: expected comma-separated positive integers, "
                       "e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise PdvError(f"{option} {text!r}: expected comma-separated positive integers, "
                       "e.g. 1,2,4")
    return tuple(sorted(set(values)))


def check_request(req: ProfileRequest) -> None:
    """Checks that need no model, done before any work."""
    resolve_dtype(req.dtype)
    if not req.micro_batch_sizes or min(req.micro_batch_sizes) < 1:
        raise PdvError(f"micro-batch sizes {list(req.micro_batch_sizes)}: need positive integers")
    if req.warmup < 0 or req.repeat < 1:
        raise PdvError(f"--warmup {req.warmup} --repeat {req.repeat}: need warmup >= 0, "
                       "repeat >= 1")
    if req.optimizer not in OPTIMIZERS:
        raise PdvError(f"--optimizer {req.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if not req.tp_degrees or min(req.tp_degrees) < 1:
        raise PdvError(f"TP degrees {list(req.tp_degrees)}: need positive integers")


def check_model(req: ProfileRequest, model: ModelDef) -> tuple[int, ...]:
    """Validate the request against the model; returns the TP degrees to profile (1 first)."""
    check_dtype(model, resolve_dtype(req.dtype))
    tps = tuple(sorted(set(req.tp_degrees) | {1}))
    wanted = [k for k in tps if k > 1]
    if wanted and (model.tp_plan is None or model.tp_shard is None):
        raise PdvError(f"model {req.spec} declares no tensor-parallel plan, so TP degree "
                       f"{wanted[0]} cannot be profiled; use --tp-degrees 1")
    bad = [k for k in wanted if k not in model.tp_degrees]
    if bad:
        raise PdvError(f"model {req.spec} supports TP degrees {list(model.tp_degrees)}, "
                       f"not {bad}")
    return tps


def assemble(req: ProfileRequest, model: ModelDef, device: Any,
             points: dict[tuple[int, int], list[Point]], tps: tuple[int, ...],
             mbss: tuple[int, ...], dtype: torch.dtype, overhead: int,
             provenance: Provenance, whole: WholeModelTiming | None,
             optimizer_s: Sequence[float] | None = None,
             boundaries: Sequence[Boundary] | None = None) -> ModelProfile:
    """Turn per-point measurements into the model-profile artifact (fits, reference numbers);
    `boundaries` (the shape probe's) give the tensors each layer hands on, else one each."""
    assert optimizer_s is None or len(optimizer_s) == len(model.layers)
    assert boundaries is None or len(boundaries) == len(model.layers)
    ref = mbss[0]
    layers = []
    for i, (name, layer) in enumerate(model.layers):
        samples = [points[(tp, m)][i].sample(m, tp) for tp in tps for m in mbss]
        by = {(s.tp_degree, s.micro_batch_size): s for s in samples}
        fwd_fit = {str(tp): fit_time(mbss, [by[(tp, m)].fwd_s for m in mbss]) for tp in tps}
        bwd_fit = {str(tp): fit_time(mbss, [by[(tp, m)].bwd_s for m in mbss]) for tp in tps}
        top = by[(1, ref)]
        flops = points[(1, ref)][i].flops_fwd
        values = boundaries[i].values if boundaries is not None else None
        layers.append(LayerProfile(
            name=name, fwd_s=top.fwd_s, bwd_s=top.bwd_s,
            param_bytes=param_bytes(layer), grad_bytes=grad_bytes(layer),
            optimizer_bytes=optimizer_state_bytes(layer, req.optimizer),
            activation_bytes=top.activation_bytes, output_bytes=top.output_bytes,
            backward_bytes=top.backward_bytes,
            output_tensors=len(values) if values else 1,
            output_grad_tensors=sum(v.requires_grad for v in values) if values else 1,
            flops_fwd=None if flops is None else flops / ref,
            optimizer_s=None if optimizer_s is None else optimizer_s[i],
            sparse_grads=has_sparse_grads(layer),
            samples=samples, fwd_fit=fwd_fit, bwd_fit=bwd_fit,
        ))
    return ModelProfile(
        provenance=provenance,
        model=ModelSpec(spec=req.spec, kwargs=dict(req.kwargs), split_at=list(req.split_at),
                        blocks=list(req.blocks)),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        optimizer=req.optimizer,
        reference_micro_batch_size=ref,
        micro_batch_sizes=list(mbss),
        tp_degrees=list(tps),
        overhead_bytes=overhead,
        layers=layers,
        whole_model=whole,
        shared=shared_params(model, req.optimizer),
    )


def shared_params(model: ModelDef, optimizer: str) -> list[SharedParams]:
    """The model's parameters that several layers use, one entry per set of layers (a tied
    embedding and head; every parameter of a module at several places)."""
    by_places: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
    for group in model.tied_groups():
        places = tuple(sorted({i for i, _ in group}))
        index, name = group[0]
        by_places.setdefault(places, []).append(model.layers[index][1].get_parameter(name))
    out = []
    for places, params in sorted(by_places.items()):
        held = torch.nn.ParameterList(params)  # the same parameters, counted as a module's
        out.append(SharedParams(
            layers=list(places), param_bytes=param_bytes(held), grad_bytes=grad_bytes(held),
            optimizer_bytes=optimizer_state_bytes(held, optimizer), tensors=len(params),
        ))
    return out
