"""`pdv profile model --estimate`: a layer profile without running the layers on real data.

The model is built on the meta device (no memory), and each layer's forward and backward run on
meta tensors -- shapes only -- under ``FlopCounterMode`` and an op counter. Time is

    t = FLOPs / matmul_throughput + ops · op_overhead

with the throughput of a dense matmul measured on this device (or given as --device-flops for a
device not at hand) and the per-op dispatch/launch cost measured here. Memory-bound work
(norms, softmax, GELU) is priced only through the op floor, so the estimate is a lower bound on
big layers and rough on tiny ones. Activation and output bytes come from the meta tensors that
backward saves (attention on meta decomposes to its math form, which saves the attention
matrix that a fused kernel would not). Layers with the same structure and input shape (a GPT's
blocks) are traced once and reused, so a 96-block GPT-3 costs one block per point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pdv.artifacts import Provenance
from pdv.errors import PdvError
from pdv.models import build_model
from pdv.profile.compute import (
    device_info,
    matmul_throughput,
    op_overhead,
    resolve_device,
    resolve_dtype,
)
from pdv.profile.layers import Point, ProfileRequest, Progress, _check, assemble
from pdv.profile.memory import OPTIMIZERS, SavedTensors, overhead_bytes, tensor_bytes

__all__ = ["estimate_profile"]


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch work (views and metadata ops cost nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func not in (torch.ops.aten.detach.default,):
            self.ops += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class _Trace:
    """What one layer's forward and backward on meta tensors cost."""

    fwd_flops: float
    fwd_ops: int
    bwd_flops: float
    bwd_ops: int
    saved_bytes: int
    output_bytes: int
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype


def _trace(layer: nn.Module, x: torch.Tensor, first: bool, last: bool,
           loss_fn: Callable[..., Any], targets: torch.Tensor) -> _Trace:
    """Run the layer's forward (and the loss if last) and backward on meta tensors."""
    x = x.detach().requires_grad_(not first and x.is_floating_point())
    saved = SavedTensors(exclude=list(layer.parameters()))
    with saved.active(), FlopCounterMode(display=False) as fc, _OpCounter() as oc:
        out = layer(x)
        result = loss_fn(out, targets) if last else out
    fwd_flops, fwd_ops = float(fc.get_total_flops()), oc.ops
    grad = None if last else torch.ones_like(result)
    with FlopCounterMode(display=False) as fc, _OpCounter() as oc:
        result.backward(grad)
    for p in layer.parameters():
        p.grad = None
    return _Trace(fwd_flops, fwd_ops, float(fc.get_total_flops()), oc.ops, saved.bytes(),
                  tensor_bytes(out), tuple(out.shape), out.dtype)


def _signature(layer: nn.Module, x: torch.Tensor, first: bool, last: bool) -> tuple[Any, ...]:
    # repr() spells out every submodule's sizes; with the input shape it fixes the trace.
    return (repr(layer), tuple(x.shape), x.dtype, first, last)


def estimate_profile(req: ProfileRequest, progress: Progress | None = None) -> Any:
    """Estimate a ModelProfile from FLOPs and bytes on the meta device (method "estimated")."""
    dtype = resolve_dtype(req.dtype)
    here = torch.device("cpu") if req.device_flops is not None else resolve_device(req.device)
    if req.device_flops is not None:
        if req.device_flops <= 0:
            raise PdvError(f"--device-flops {req.device_flops}: must be > 0 FLOP/s")
        flops_rate = req.device_flops
        flops_note = f"time = FLOPs / {flops_rate:.3g} FLOP/s given by --device-flops"
    else:
        flops_rate = matmul_throughput(here, dtype)
        flops_note = (f"time = FLOPs / {flops_rate:.3g} FLOP/s, a dense matmul measured on "
                      f"this {here.type} device for ~0.5 s")
    per_op = op_overhead(here)
    overhead, overhead_note = (0, "overhead_bytes: not measured (device not at hand)")
    if req.device_flops is None:
        overhead, overhead_note = overhead_bytes(here)

    with torch.device("meta"):
        model = build_model(req.spec, req.kwargs, req.seed)
    tps = _check(req, model)
    mbss = tuple(sorted(set(req.micro_batch_sizes)))
    meta = torch.device("meta")
    layers = [layer.to(dtype=dtype) for _, layer in model.layers]
    gen = torch.Generator().manual_seed(req.seed)

    cache: dict[tuple[Any, ...], _Trace] = {}
    points: dict[tuple[int, int], list[Point]] = {}
    total, done = len(tps) * len(mbss) * len(layers), 0
    n = len(layers)
    for tp in tps:
        if tp == 1:
            shards = layers
        else:
            assert model.tp_shard is not None
            with torch.device("meta"):
                shards = [model.tp_shard(i, layer, tp).to(dtype=dtype)
                          for i, layer in enumerate(layers)]
        for m in mbss:
            x, y = model.make_batch(m, gen)
            h = x.to(device=meta, dtype=dtype) if x.is_floating_point() else x.to(meta)
            targets = y.to(meta)
            pts = []
            for i, layer in enumerate(shards):
                key = _signature(layer, h, i == 0, i == n - 1)
                tr = cache.get(key)
                if tr is None:
                    tr = cache[key] = _trace(layer, h, i == 0, i == n - 1, model.loss_fn,
                                             targets)
                pts.append(Point(fwd=[tr.fwd_flops / flops_rate + tr.fwd_ops * per_op],
                                 bwd=[tr.bwd_flops / flops_rate + tr.bwd_ops * per_op],
                                 param_bytes=sum(p.numel() * p.element_size()
                                                 for p in layer.parameters()),
                                 activation_bytes=tr.saved_bytes,
                                 output_bytes=tr.output_bytes, flops_fwd=tr.fwd_flops))
                h = torch.empty(tr.output_shape, dtype=tr.output_dtype, device=meta)
                done += 1
                if progress:
                    progress(f"estimate TP {tp}, micro-batch {m}", done, total)
            points[(tp, m)] = pts

    notes = [
        "estimated on the meta device: FlopCounterMode counts forward and backward FLOPs per "
        "layer; an op counter counts launched aten ops",
        flops_note,
        f"plus {per_op * 1e6:.3g} µs per op (a 1-element add timed on this {here.type} device)",
        "activation_bytes: distinct non-parameter tensors saved for backward on meta "
        "(attention in its math form); output_bytes from the output's shape",
        f"optimizer_bytes: {req.optimizer} at {OPTIMIZERS[req.optimizer]} bytes per parameter",
        overhead_note,
        f"{len(cache)} layer traces for {total} (layer, point) pairs: layers with the same "
        "structure and input shape reuse one trace",
        "the last layer's fwd/bwd include the loss; spreads are 0 (nothing was timed)",
    ]
    kind = req.device_kind
    if kind is None and req.device_flops is not None:
        kind = req.device
    info = device_info(here, flops_rate, kind)
    if req.device_flops is not None:
        info = info.model_copy(update={"name": f"{kind} (declared {flops_rate:.3g} FLOP/s)"})
    return assemble(req, model, info, points, tps, mbss, dtype, overhead,
                    Provenance(method="estimated", notes=notes), None)

