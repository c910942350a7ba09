"""`pdv profile model --estimate`: a layer profile without running the layers on real data.

The model is built on the meta device (no memory), and each layer's forward and backward run on
meta tensors -- shapes only -- under ``FlopCounterMode`` and an op log. Each launched op is
priced by the roofline (Williams, Waterman and Patterson, CACM 2009) plus a launch floor:

    t_op = max(FLOPs / matmul_throughput, bytes_in_out / memory_bandwidth) + op_overhead

with a dense matmul's throughput and a large copy's bandwidth measured on this device (or given
as --device-flops / --device-bandwidth for a device not at hand) and the dispatch cost of a
1-element op measured here. Real kernels reach neither roof, so big layers come out fast and
tiny ones rough. Attention is priced as one fused kernel (the math form that meta would run
materializes the T x T matrix, which flash kernels never do). Activation and output bytes come
from the meta tensors that backward saves. Layers with the same structure and input shape (a GPT's
blocks) are traced once and reused, so a 96-block GPT-3 costs one block per point.

The optimizer step is traced the same way: the run's optimizer (pdv.optim.make_optimizer) steps
meta copies of each layer's parameters, and every op it launches is priced by the same roofline --
elementwise ops count no FLOPs, so the step is its bytes (parameter, gradient and state tensors,
read and written) over the copy bandwidth, plus the per-op floor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pdv.artifacts import Provenance
from pdv.errors import PdvError
from pdv.models import build_model
from pdv.optim import PROFILE_OPTIMIZERS, make_optimizer
from pdv.profile.compute import (
    device_info,
    matmul_throughput,
    memory_bandwidth,
    op_overhead,
    resolve_device,
    resolve_dtype,
)
from pdv.profile.memory import (
    OPTIMIZERS,
    SavedTensors,
    overhead_bytes,
    param_bytes,
    tensor_bytes,
)
from pdv.profile.optimizer import LR, optimizer_note, trainable
from pdv.profile.request import Point, ProfileRequest, Progress, assemble, check_model

__all__ = ["estimate_profile"]


# Ops that launch no work over memory: views, detach, allocation without a fill.
_FREE = frozenset({
    torch.ops.aten.detach.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
})


# Gathers read only the rows they return, not the whole table they index into.
_GATHER = frozenset({
    torch.ops.aten.embedding.default,
    torch.ops.aten.index_select.default,
})


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class _OpLog(TorchDispatchMode):
    """Records each launched aten op's FLOPs (read off an enclosing FlopCounterMode) and the
    bytes of its tensor inputs and outputs -- what the roofline prices."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self._counter = counter
        self.ops: list[tuple[float, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = self._counter.get_total_flops()
        out = func(*args, **kwargs)
        if not func.is_view and func not in _FREE:
            flops = float(self._counter.get_total_flops() - before)
            if func in _GATHER:
                moved = 2 * _nbytes(out) + _nbytes(args[1])
            else:
                moved = _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
            self.ops.append((flops, moved))
        return out


class _Phase:
    """Which op log is collecting: the forward's, then the backward's."""

    log: _OpLog | None = None


class _FusedAttention(torch.autograd.Function):
    """A fused (flash-style) attention for meta tensors: the shapes, FLOPs and bytes of one
    kernel each way, instead of the math form that materializes the T x T matrix.

    FLOPs follow FlashAttention-2 (Dao, 2023): forward 4·B·H·Tq·Tk·D, halved when causal;
    backward 2.5x the forward. It saves q, k, v and the output, as the fused kernels do.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                phase: _Phase) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        flops = 4.0 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1] * (0.5 if causal else 1)
        ctx.save_for_backward(q, k, v, out)
        ctx.flops, ctx.phase = flops, phase
        if phase.log is not None:
            phase.log.ops.append((flops, _nbytes((q, k, v, out))))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        q, k, v, out = ctx.saved_tensors
        if ctx.phase.log is not None:
            ctx.phase.log.ops.append((2.5 * ctx.flops, 2 * _nbytes((q, k, v, out))))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), None, None


class _FuseAttention(TorchFunctionMode):
    """Routes maskless, dropout-free scaled_dot_product_attention to :class:`_FusedAttention`."""

    def __init__(self, phase: _Phase) -> None:
        super().__init__()
        self._phase = phase

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and set(kwargs) <= {
                "is_causal"} and args[0].device.type == "meta":
            return _FusedAttention.apply(*args, bool(kwargs.get("is_causal", False)),
                                         self._phase)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class _Trace:
    """What one layer's forward and backward launch on meta tensors: (FLOPs, bytes) per op."""

    fwd_ops: tuple[tuple[float, int], ...]
    bwd_ops: tuple[tuple[float, int], ...]
    saved_bytes: int
    output_bytes: int
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype


@dataclass(frozen=True)
class _Device:
    """The throughputs that price an op: t = max(FLOPs / flops, bytes / bandwidth) + per_op."""

    flops: float
    bandwidth: float
    per_op: float

    def seconds(self, ops: tuple[tuple[float, int], ...]) -> float:
        """Roofline time of a sequence of ops (Williams et al., 2009), plus a per-op floor."""
        return sum(max(f / self.flops, b / self.bandwidth) + self.per_op for f, b in ops)


def _trace(layer: nn.Module, x: torch.Tensor, first: bool, last: bool,
           loss_fn: Callable[..., Any], targets: torch.Tensor) -> _Trace:
    """Run the layer's forward (and the loss if last) and backward on meta tensors."""
    x = x.detach().requires_grad_(not first and x.is_floating_point())
    saved = SavedTensors(exclude=list(layer.parameters()))
    phase = _Phase()
    with saved.active(), _FuseAttention(phase), FlopCounterMode(display=False) as fc, \
            _OpLog(fc) as fwd:
        phase.log = fwd
        out = layer(x)
        result = loss_fn(out, targets) if last else out
    grad = None if last else torch.ones_like(result)
    with FlopCounterMode(display=False) as fc, _OpLog(fc) as bwd:
        phase.log = bwd
        if result.requires_grad:
            result.backward(grad)
    for p in layer.parameters():
        p.grad = None
    return _Trace(tuple(fwd.ops), tuple(bwd.ops), saved.bytes(), tensor_bytes(out),
                  tuple(out.shape), out.dtype)


def _optimizer_ops(layer: nn.Module, optimizer: str) -> tuple[tuple[float, int], ...]:
    """What one steady-state optimizer step over the layer's parameters launches (meta)."""
    params = [nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"))
              for p in trainable(layer)]
    if not params:
        return ()
    for p in params:
        p.grad = torch.empty_like(p)
    opt = make_optimizer(params, PROFILE_OPTIMIZERS[optimizer], LR)
    opt.step()  # allocates the state; the steps that follow are the ones training repeats
    with FlopCounterMode(display=False) as fc, _OpLog(fc) as log:
        opt.step()
    # The step's record_function markers pass through dispatch but launch nothing.
    return tuple(op for op in log.ops if op != (0.0, 0))


def _signature(layer: nn.Module, x: torch.Tensor, first: bool, last: bool) -> tuple[Any, ...]:
    # repr() spells out every submodule's sizes; with the input shape it fixes the trace.
    return (repr(layer), tuple(x.shape), x.dtype, first, last)


def _device(req: ProfileRequest, dtype: torch.dtype) -> tuple[_Device, torch.device, list[str]]:
    """The roofline's throughputs: measured on this device, or given for one not at hand."""
    declared = req.device_flops is not None
    here = torch.device("cpu") if declared else resolve_device(req.device)
    notes = []
    if req.device_flops is not None:
        if req.device_flops <= 0:
            raise PdvError(f"--device-flops {req.device_flops}: must be > 0 FLOP/s")
        flops = req.device_flops
        notes.append(f"FLOP rate {flops:.3g} FLOP/s given by --device-flops")
    else:
        flops = matmul_throughput(here, dtype)
        notes.append(f"FLOP rate {flops:.3g} FLOP/s: a dense {req.dtype} matmul measured on "
                     f"this {here.type} device for ~0.5 s")
    if req.device_bandwidth is not None:
        if req.device_bandwidth <= 0:
            raise PdvError(f"--device-bandwidth {req.device_bandwidth}: must be > 0 bytes/s")
        bandwidth = req.device_bandwidth
        notes.append(f"memory bandwidth {bandwidth:.3g} B/s given by --device-bandwidth")
    elif declared:
        bandwidth = float("inf")
        notes.append("memory traffic not priced: --device-flops was given without "
                     "--device-bandwidth")
    else:
        bandwidth = memory_bandwidth(here)
        notes.append(f"memory bandwidth {bandwidth:.3g} B/s: a large copy measured on this "
                     f"{here.type} device")
    per_op = op_overhead(here)
    notes.append(f"per-op floor {per_op * 1e6:.3g} µs: a 1-element add timed on this "
                 f"{here.type} device")
    return _Device(flops, bandwidth, per_op), here, notes


def estimate_profile(req: ProfileRequest, progress: Progress | None = None) -> Any:
    """Estimate a ModelProfile from FLOPs and bytes on the meta device (method "estimated")."""
    dtype = resolve_dtype(req.dtype)
    with torch.device("meta"):
        model = build_model(req.spec, req.kwargs, req.seed, split_at=req.split_at,
                            blocks=req.blocks)
    if model.prepare is not None:
        raise PdvError(f"model {req.spec!r} is split by tracing, which needs real tensors; "
                       "profile it by measuring (drop --estimate)")
    tps = check_model(req, model)
    rate, here, device_notes = _device(req, dtype)
    overhead, overhead_note = (0, "overhead_bytes: not measured (device not at hand)")
    if req.device_flops is None:
        overhead, overhead_note = overhead_bytes(here)
    mbss = tuple(sorted(set(req.micro_batch_sizes)))
    meta = torch.device("meta")
    layers = [layer.to(dtype=dtype) for _, layer in model.layers]
    gen = torch.Generator().manual_seed(req.seed)

    cache: dict[tuple[Any, ...], _Trace] = {}
    points: dict[tuple[int, int], list[Point]] = {}
    n = len(layers)
    total, done = len(tps) * len(mbss) * n + n, 0
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
                pts.append(Point(fwd=[rate.seconds(tr.fwd_ops)], bwd=[rate.seconds(tr.bwd_ops)],
                                 param_bytes=param_bytes(layer),
                                 activation_bytes=tr.saved_bytes,
                                 output_bytes=tr.output_bytes,
                                 flops_fwd=sum(f for f, _ in tr.fwd_ops)))
                h = torch.empty(tr.output_shape, dtype=tr.output_dtype, device=meta)
                done += 1
                if progress:
                    progress(f"estimate TP {tp}, micro-batch {m}", done, total)
            points[(tp, m)] = pts

    step_cache: dict[tuple[Any, ...], float] = {}
    optimizer_s = []
    for layer in layers:
        key = tuple((tuple(p.shape), p.dtype) for p in trainable(layer))
        if key not in step_cache:
            step_cache[key] = rate.seconds(_optimizer_ops(layer, req.optimizer))
        optimizer_s.append(step_cache[key])
        done += 1
        if progress:
            progress(f"estimate optimizer step ({req.optimizer})", done, total)

    notes = [
        "estimated on the meta device, nothing run on data: every launched aten op of each "
        "layer's forward and backward is priced by the roofline, max(FLOPs / FLOP rate, "
        "bytes in+out / bandwidth), plus a per-op floor; FLOPs from FlopCounterMode",
        *device_notes,
        "scaled_dot_product_attention is priced as one fused (flash-style) kernel each way: "
        "4·B·H·T²·D FLOPs forward (half when causal), 2.5x that backward, q/k/v/out traffic",
        "activation_bytes: distinct non-parameter tensors saved for backward on meta; "
        "output_bytes from the output's shape",
        f"optimizer_bytes: {req.optimizer} at {OPTIMIZERS[req.optimizer]} bytes per parameter",
        f"optimizer_s: ESTIMATED, not timed: {optimizer_note(req.optimizer)} traced on meta "
        "copies of each layer's parameters (the steady-state step, after the one that "
        "allocates state); each op priced as bytes in+out / memory bandwidth plus the per-op "
        "floor (elementwise ops count no FLOPs)"
        + ("; memory traffic unpriced, so only the per-op floor"
           if rate.bandwidth == float("inf") else ""),
        overhead_note,
        f"{len(cache)} layer traces for {total} (layer, point) pairs: layers with the same "
        "structure and input shape reuse one trace",
        "the last layer's fwd/bwd include the loss; spreads are 0 (nothing was timed)",
    ]
    kind = req.device_kind
    if kind is None and req.device_flops is not None:
        kind = req.device
    # A declared device's speed is the declared rate; a device at hand gets the cluster probe,
    # like a measured profile, so the planner's speed ratios compare like with like.
    info = device_info(here, rate.flops if req.device_flops is not None else None, kind)
    if req.device_flops is not None:
        info = info.model_copy(update={"name": f"{kind} (declared {rate.flops:.3g} FLOP/s)"})
    return assemble(req, model, info, points, tps, mbss, dtype, overhead,
                    Provenance(method="estimated", notes=notes), None, optimizer_s)
