"""`pdv profile model --estimate`: a layer profile without running the layers on real data.

The model is built on the meta device (no memory), and each layer's forward and backward run on
meta tensors -- shapes only -- under ``FlopCounterMode`` and an op log. Each launched op is
priced by the roofline (Williams, Waterman and Patterson, CACM 2009) at the rates the device
*achieves*, not at its datasheet peak:

- a GEMM (mm, addmm, bmm, baddbmm, and the fused attention's two) at the rate of its own shape:
  on the device at hand each distinct shape is timed once (pdv.profile.compute.gemm_throughput);
  for a device declared by ``--device-spec`` the spec's achievable rate times the shape's tile
  and wave quantization (pdv.device_spec); a small or ragged GEMM is far from a large one;
- every other op at the memory bandwidth: measured here by a large copy, or the spec's
  sustained fraction of the datasheet bandwidth (memory-bound kernels at their own rate);
- plus a per-op floor: the dispatch cost of a 1-element op measured here. On the device at
  hand (the CPU) dispatch and work add up; a declared accelerator runs kernels asynchronously,
  so an op costs the larger of its kernel time and the host's dispatch.

``--device-flops`` (with ``--device-bandwidth``) is the flat form: every op's FLOPs at one
declared rate. Attention is priced as one fused kernel (the math form that meta would run
materializes the T x T matrix, which flash kernels never do); for a declared accelerator, so
is dropout (meta decomposes it into three passes and a mask in the input's dtype; a GPU runs
one kernel writing a bool mask). Activation and output bytes come
from the meta tensors that backward saves. Layers with the same structure and input shape (a
GPT's blocks) are traced once and reused, so a 96-block GPT-3 costs one block per point.

The optimizer step is traced the same way: the run's optimizer (pdv.optim.make_optimizer) steps
meta copies of each layer's parameters, and every op it launches is priced by the same rates --
elementwise ops count no FLOPs, so the step is its bytes (parameter, gradient and state tensors,
read and written) over the bandwidth, plus the per-op floor.
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
from pdv.boundaries import Boundary, Value, check_targets
from pdv.device_spec import DeviceSpec, Gemm, load_device_spec
from pdv.errors import PdvError, first_line
from pdv.model_def import grad_copies
from pdv.models import as_args, build_model
from pdv.nesting import Nesting, either_way, flat_output, install
from pdv.optim import PROFILE_OPTIMIZERS, make_optimizer
from pdv.profile.compute import (
    device_info,
    gemm_efficiency,
    matmul_throughput,
    memory_bandwidth,
    op_overhead,
    resolve_device,
    resolve_dtype,
)
from pdv.profile.memory import (
    OPTIMIZERS,
    LiveBytes,
    SavedTensors,
    backward_peak,
    overhead_bytes,
    param_bytes,
    tensor_bytes,
)
from pdv.profile.optimizer import LR, optimizer_note, trainable
from pdv.profile.request import Point, ProfileRequest, Progress, assemble, check_model

__all__ = ["estimate_profile"]


# Ops that launch no work over memory: views, detach, allocation without a fill.
# _unsafe_view is a reshape that autograd does not track as a view (a bmm's or a
# clone's result reshaped): metadata only, though its schema does not say is_view.
_FREE = frozenset({
    torch.ops.aten.detach.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
})


# GEMMs: priced at the rate of their own shape. (op, index of A, index of B) in the args.
_GEMMS = {
    torch.ops.aten.mm.default: (0, 1),
    torch.ops.aten.addmm.default: (1, 2),
    torch.ops.aten.bmm.default: (0, 1),
    torch.ops.aten.baddbmm.default: (1, 2),
}

Op = tuple[float, int, Gemm | None]
"""one launched op: (FLOPs, bytes in + out, GEMM shape or None)"""


def _gemm_shape(func: Any, args: Any) -> Gemm | None:
    where = _GEMMS.get(func)
    if where is None:
        return None
    a, b = args[where[0]], args[where[1]]
    if a.dim() == 2:
        return (1, int(a.shape[0]), int(b.shape[1]), int(a.shape[1]))
    return (int(a.shape[0]), int(a.shape[1]), int(b.shape[2]), int(a.shape[2]))


# Gathers read only the rows they return, not the whole table they index into.
_GATHER = frozenset({
    torch.ops.aten.embedding.default,
    torch.ops.aten.index_select.default,
})


class _OpLog(TorchDispatchMode):
    """Records each launched aten op's FLOPs (read off an enclosing FlopCounterMode), the
    bytes of its tensor inputs and outputs, and a GEMM's shape -- what the roofline prices."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self._counter = counter
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = self._counter.get_total_flops()
        out = func(*args, **kwargs)
        if not func.is_view and func not in _FREE:
            flops = float(self._counter.get_total_flops() - before)
            if func in _GATHER:
                moved = 2 * tensor_bytes(out) + tensor_bytes(args[1])
            else:
                moved = tensor_bytes(args) + tensor_bytes(kwargs) + tensor_bytes(out)
            self.ops.append((flops, moved, _gemm_shape(func, args)))
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
        # Its GEMMs: (batch x heads) x Tq x Tk, D deep (q @ k^T; p @ v has the same volume).
        gemm = (q.shape[:-2].numel(), q.shape[-2], k.shape[-2], q.shape[-1])
        ctx.flops, ctx.phase, ctx.gemm = flops, phase, gemm
        if phase.log is not None:
            phase.log.ops.append((flops, tensor_bytes((q, k, v, out)), gemm))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        q, k, v, out = ctx.saved_tensors
        if ctx.phase.log is not None:
            ctx.phase.log.ops.append((2.5 * ctx.flops, 2 * tensor_bytes((q, k, v, out)), ctx.gemm))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), None, None


class _DeviceKernels(TorchFunctionMode):
    """Routes maskless scaled_dot_product_attention to :class:`_FusedAttention` and, for an
    accelerator, dropout to the one kernel it runs there."""

    def __init__(self, phase: _Phase, fused_dropout: bool = False) -> None:
        super().__init__()
        self._phase = phase
        self._fused_dropout = fused_dropout

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # Flash kernels drop out inside the kernel: dropout changes nothing priced here.
        if func is F.scaled_dot_product_attention and len(args) == 3 and set(kwargs) <= {
                "is_causal", "dropout_p"} and args[0].device.type == "meta":
            return _FusedAttention.apply(*args, bool(kwargs.get("is_causal", False)),
                                         self._phase)
        if self._fused_dropout and func is F.dropout:
            x, p, training = _dropout_args(args, kwargs)
            if training and 0.0 < p < 1.0 and x.device.type == "meta":
                # On meta (as on CPU) dropout decomposes into bernoulli_, div_ and mul: three
                # passes over the input and a mask in its dtype. A GPU runs native_dropout,
                # one pass writing the output and a bool mask (and one kernel backward).
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)


def _dropout_args(args: Any, kwargs: Any) -> tuple[torch.Tensor, float, bool]:
    """F.dropout's (input, p, training) however they were passed."""
    names = ("input", "p", "training")
    given = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items()
                                                   if k in names}
    return given["input"], float(given.get("p", 0.5)), bool(given.get("training", True))


@dataclass(frozen=True)
class _Trace:
    """What one layer's forward and backward launch on meta tensors: (FLOPs, bytes) per op."""

    fwd_ops: tuple[Op, ...]
    bwd_ops: tuple[Op, ...]
    saved_bytes: int
    output_bytes: int
    backward_bytes: int
    """the backward's peak above what the forward left alive"""
    outputs: tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]
    """(shape, dtype, whether a gradient flows back) of each tensor the layer hands on"""
    nesting: Nesting | None = None
    """how the layer's output nests those tensors (pdv.nesting), where it does"""


class _Pricing:
    """Seconds of a sequence of ops on the device the profile is for."""

    def seconds(self, ops: tuple[Op, ...]) -> float:
        """Total time of the ops, one after another."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Flat(_Pricing):
    """--device-flops: t = max(FLOPs / flops, bytes / bandwidth) + per_op for every op."""

    flops: float
    bandwidth: float
    per_op: float

    def seconds(self, ops: tuple[Op, ...]) -> float:
        """Roofline time of a sequence of ops (Williams et al., 2009), plus a per-op floor."""
        return sum(max(f / self.flops, b / self.bandwidth) + self.per_op for f, b, _ in ops)


@dataclass(frozen=True)
class _Declared(_Pricing):
    """--device-spec: achievable GEMM rate by shape, memory-bound ops at the sustained
    bandwidth; each kernel at least the host's dispatch cost (launches are asynchronous)."""

    spec: DeviceSpec
    dtype: str
    dispatch: float

    def seconds(self, ops: tuple[Op, ...]) -> float:
        """Each op's kernel time, floored by the dispatch that launches it."""
        return sum(max(self.spec.op_seconds(self.dtype, f, b, g), self.dispatch)
                   for f, b, g in ops)


class _Measured(_Pricing):
    """The device at hand: each GEMM shape at the measured matmul rate times its efficiency
    timed here once; other ops at the measured copy bandwidth plus the per-op dispatch (which
    the GEMM timings already include)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, flops: float,
                 bandwidth: float, per_op: float) -> None:
        self.device, self.dtype = device, dtype
        self.flops, self.bandwidth, self.per_op = flops, bandwidth, per_op
        self._rates: dict[Gemm, float] = {}

    def rate(self, gemm: Gemm) -> float:
        """FLOP/s of this GEMM shape here (timed on first use)."""
        if gemm not in self._rates:
            self._rates[gemm] = self.flops * gemm_efficiency(self.device, self.dtype, *gemm)
        return self._rates[gemm]

    @property
    def shapes(self) -> int:
        """Distinct GEMM shapes timed so far."""
        return len(self._rates)

    def seconds(self, ops: tuple[Op, ...]) -> float:
        """GEMMs at their shape's timed rate; the rest by the roofline plus the floor."""
        total = 0.0
        for f, b, g in ops:
            if g is not None and f > 0:
                total += f / self.rate(g)
            else:
                total += max(f / self.flops, b / self.bandwidth) + self.per_op
        return total


def _trace(layer: nn.Module, xs: tuple[torch.Tensor, ...], first: bool, last: bool,
           loss_fn: Callable[..., Any], targets: torch.Tensor,
           fused_dropout: bool = False, where: str = "the layer") -> _Trace:
    """Run the layer's forward (and the loss if last) and backward on meta tensors;
    `xs` are its arguments (the previous layer's outputs, or the batch's inputs);
    `fused_dropout` prices dropout as an accelerator's single kernel."""
    given = xs
    # An input carries a gradient where the previous layer's output did (the batch's none).
    xs = tuple(x.detach().requires_grad_(not first and x.requires_grad) for x in xs)
    # Non-leaf copies, made before the op log opens (meta tensors: no data, no cost), so a
    # layer that writes into its input in place (ReLU(inplace=True)) traces as in a stage.
    xs = grad_copies(xs)
    saved = SavedTensors(exclude=list(layer.parameters()))
    phase = _Phase()
    with saved.active(), _DeviceKernels(phase, fused_dropout), \
            FlopCounterMode(display=False) as fc, \
            _OpLog(fc) as fwd:
        phase.log = fwd
        out = layer(*xs)
        flat, nesting = (out, None) if last else flat_output(layer, out, where)
        outs = as_args(flat)
        roots = [loss_fn(out, targets)] if last else [o for o in outs if o.requires_grad]
    # The upstream gradients are the next stage's to make: made before the backward's log.
    grads = None if last else [torch.ones_like(r) for r in roots]
    with FlopCounterMode(display=False) as fc, _OpLog(fc) as bwd:
        phase.log = bwd
        if roots and roots[0].requires_grad:
            torch.autograd.backward(roots, grads)
    for p in layer.parameters():
        p.grad = None
    peak = _backward_peak(layer, given, first, last, loss_fn, targets, fused_dropout, where)
    return _Trace(tuple(fwd.ops), tuple(bwd.ops), saved.bytes(), tensor_bytes(outs), peak,
                  tuple((tuple(o.shape), o.dtype, o.requires_grad) for o in outs), nesting)


def _backward_peak(layer: nn.Module, xs: tuple[torch.Tensor, ...], first: bool, last: bool,
                   loss_fn: Callable[..., Any], targets: torch.Tensor, fused_dropout: bool,
                   where: str) -> int:
    """The backward's peak of live storages above what the forward left alive, with the
    gradients already held, as the measured profile takes it (pdv.profile.layers): a pass of
    its own, so that the priced op log stays the traced step's."""
    xs = grad_copies(tuple(x.detach().requires_grad_(not first and x.requires_grad)
                           for x in xs))
    live = LiveBytes()
    with live, _DeviceKernels(_Phase(), fused_dropout):
        out = layer(*xs)
        flat = out if last else flat_output(layer, out, where)[0]
        roots = [loss_fn(out, targets)] if last else [o for o in as_args(flat)
                                                      if o.requires_grad]
    grads = None if last else [torch.ones_like(r) for r in roots]
    if not (roots and roots[0].requires_grad):
        return 0
    return backward_peak(layer, live, lambda: torch.autograd.backward(roots, grads))


def _traced(index: int, name: str, layer: nn.Module, xs: tuple[torch.Tensor, ...], last: bool,
            loss_fn: Callable[..., Any], targets: torch.Tensor, fused_dropout: bool) -> _Trace:
    """_trace, with a layer that cannot run on meta tensors named in one line."""
    where = f"layer {index} {name!r}"
    try:
        # as the shape probe does: a tuple as separate arguments, else whole (nn.Sequential's)
        return either_way(layer, index == 0, xs, lambda: _trace(
            layer, xs, index == 0, last, loss_fn, targets, fused_dropout, where))
    except PdvError:
        raise
    except Exception as exc:
        first = first_line(exc, 240)
        raise PdvError(
            f"layer {index} {name!r} cannot be estimated: --estimate runs each layer on meta "
            f"tensors, which hold shapes but no data, and it failed there ({type(exc).__name__}:"
            f" {first}); an op whose output's shape depends on the data (torch.nonzero, "
            "torch.where with one argument, a mixture of experts' routing) cannot run so: "
            "profile the model measured, on a device at hand (without --estimate)") from None


def _optimizer_ops(layer: nn.Module, optimizer: str) -> tuple[Op, ...]:
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
    return tuple(op for op in log.ops if op[:2] != (0.0, 0))


def _signature(layer: nn.Module, xs: tuple[torch.Tensor, ...], first: bool,
               last: bool) -> tuple[Any, ...]:
    # repr() spells out every submodule's sizes; with the inputs' shapes it fixes the trace.
    # A layer that takes a nested structure back (pdv.nesting) traces what it rebuilds.
    nesting = getattr(layer, "_pdv_nesting_in", None)
    return (repr(layer), tuple((tuple(x.shape), x.dtype, x.requires_grad) for x in xs), first,
            last, None if nesting is None else (nesting.spec, repr(nesting.constants)))


@dataclass(frozen=True)
class _Target:
    """The device the estimate prices: how, where its probes ran, its speed, its notes."""

    pricing: _Pricing
    here: torch.device
    """where the per-op probes ran (this host)"""
    matmul_flops: float | None
    """the device speed to record; None = the cluster probe of `here`"""
    declared: bool
    notes: list[str]


def _flat(req: ProfileRequest) -> _Target:
    """--device-flops (and --device-bandwidth): one rate for all FLOPs."""
    assert req.device_flops is not None
    if req.device_flops <= 0:
        raise PdvError(f"--device-flops {req.device_flops}: must be > 0 FLOP/s")
    here = torch.device("cpu")
    notes = [f"FLOP rate {req.device_flops:.3g} FLOP/s given by --device-flops, for every "
             "GEMM whatever its shape"]
    if req.device_bandwidth is not None:
        if req.device_bandwidth <= 0:
            raise PdvError(f"--device-bandwidth {req.device_bandwidth}: must be > 0 bytes/s")
        bandwidth = req.device_bandwidth
        notes.append(f"memory bandwidth {bandwidth:.3g} B/s given by --device-bandwidth")
    else:
        bandwidth = float("inf")
        notes.append("memory traffic not priced: --device-flops was given without "
                     "--device-bandwidth")
    per_op = op_overhead(here)
    notes.append(f"per-op floor {per_op * 1e6:.3g} µs: a 1-element add timed on this host")
    if bandwidth == float("inf"):
        notes.append("optimizer step: memory traffic unpriced, so only the per-op floor")
    return _Target(_Flat(req.device_flops, bandwidth, per_op), here, req.device_flops, True,
                   notes)


def _declared(req: ProfileRequest) -> _Target:
    """--device-spec: a device not at hand, at the achievable rates its spec cites."""
    assert req.device_spec is not None
    if req.device_flops is not None or req.device_bandwidth is not None:
        raise PdvError("--device-spec declares the device's rates; drop --device-flops and "
                       "--device-bandwidth")
    spec = load_device_spec(req.device_spec)
    spec.peak(req.dtype)  # a PdvError now if the spec has no rate for this dtype
    here = torch.device("cpu")
    dispatch = op_overhead(here)
    notes = [*spec.notes(req.dtype),
             f"each kernel at least {dispatch * 1e6:.3g} µs, the dispatch of a 1-element op "
             "timed on this host (launches overlap kernels, so the larger counts)"]
    return _Target(_Declared(spec, req.dtype, dispatch), here, spec.peak(req.dtype), True,
                   notes)


def _at_hand(req: ProfileRequest, dtype: torch.dtype) -> _Target:
    """The device at hand: GEMMs timed by shape here, the rest at measured bandwidth."""
    here = resolve_device(req.device)
    flops = matmul_throughput(here, dtype)
    bandwidth = req.device_bandwidth or memory_bandwidth(here)
    if req.device_bandwidth is not None and req.device_bandwidth <= 0:
        raise PdvError(f"--device-bandwidth {req.device_bandwidth}: must be > 0 bytes/s")
    per_op = op_overhead(here)
    notes = [
        f"GEMMs: {flops:.3g} FLOP/s, a dense {req.dtype} square matmul measured on this "
        f"{here.type} device for ~0.5 s, times each distinct shape's efficiency against that "
        "matmul, timed here in alternate runs (pdv.profile.compute.gemm_efficiency; a shape "
        "larger than the square one is timed with its largest dimension halved until it is "
        "not)",
        f"other FLOPs (convolutions) at {flops:.3g} FLOP/s",
        f"memory bandwidth {bandwidth:.3g} B/s: "
        + ("given by --device-bandwidth" if req.device_bandwidth is not None
           else f"a large copy measured on this {here.type} device"),
        f"per-op floor {per_op * 1e6:.3g} µs: a 1-element add timed on this {here.type} device",
    ]
    return _Target(_Measured(here, dtype, flops, bandwidth, per_op), here, None, False, notes)


def _target(req: ProfileRequest, dtype: torch.dtype) -> _Target:
    if req.device_spec is not None:
        return _declared(req)
    if req.device_flops is not None:
        return _flat(req)
    return _at_hand(req, dtype)


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
    target = _target(req, dtype)
    rate, here = target.pricing, target.here
    overhead, overhead_note = (0, "overhead_bytes: not measured (device not at hand)")
    if not target.declared:
        overhead, overhead_note = overhead_bytes(here)
    mbss = tuple(sorted(set(req.micro_batch_sizes)))
    meta = torch.device("meta")
    layers = [layer.to(dtype=dtype) for _, layer in model.layers]
    gen = torch.Generator().manual_seed(req.seed)

    cache: dict[tuple[Any, ...], _Trace] = {}
    first_outputs: list[tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]] = []
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
            check_targets(y, m)
            h = tuple(t.to(device=meta, dtype=dtype) if t.is_floating_point() else t.to(meta)
                      for t in as_args(x))
            targets = y.to(meta)
            pts = []
            for i, layer in enumerate(shards):
                key = _signature(layer, h, i == 0, i == n - 1)
                tr = cache.get(key)
                if tr is None:
                    tr = cache[key] = _traced(i, model.layers[i][0], layer, h, i == n - 1,
                                              model.loss_fn, targets,
                                              isinstance(rate, _Declared))
                if tr.nesting is not None:  # the next layer takes the flat tensors back
                    install(shards, i, tr.nesting, f"layer {i} {model.layers[i][0]!r}")
                pts.append(Point(fwd=[rate.seconds(tr.fwd_ops)], bwd=[rate.seconds(tr.bwd_ops)],
                                 param_bytes=param_bytes(layer),
                                 activation_bytes=tr.saved_bytes,
                                 output_bytes=tr.output_bytes,
                                 flops_fwd=sum(op[0] for op in tr.fwd_ops),
                                 backward_bytes=tr.backward_bytes))
                h = tuple(torch.empty(shape, dtype=dt, device=meta).requires_grad_(grad)
                          for shape, dt, grad in tr.outputs)
                if len(first_outputs) < n:
                    first_outputs.append(tr.outputs)
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
        "layer's forward and backward is priced by the roofline, max(FLOPs / achieved FLOP "
        "rate, bytes in+out / achieved bandwidth), plus a per-op floor; FLOPs from "
        "FlopCounterMode",
        *target.notes,
        "scaled_dot_product_attention is priced as one fused (flash-style) kernel each way: "
        "4·B·H·T²·D FLOPs forward (half when causal), 2.5x that backward, q/k/v/out traffic",
        *(["dropout is priced as the device's one kernel each way (native_dropout: input in, "
           "output and a bool mask out), not the three-op form the meta device decomposes it "
           "into"] if isinstance(rate, _Declared) else []),
        "activation_bytes: distinct non-parameter tensors saved for backward on meta; "
        "output_bytes from the output's shape; backward_bytes: the backward's peak of live "
        "storages on meta above what the forward left alive",
        f"optimizer_bytes: {req.optimizer} at {OPTIMIZERS[req.optimizer]} bytes per parameter",
        f"optimizer_s: ESTIMATED, not timed: {optimizer_note(req.optimizer)} traced on meta "
        "copies of each layer's parameters (the steady-state step, after the one that "
        "allocates state); each op priced as bytes in+out / memory bandwidth plus the per-op "
        "floor (elementwise ops count no FLOPs)",
        overhead_note,
        f"{len(cache)} layer traces for {total} (layer, point) pairs: layers with the same "
        "structure and input shape reuse one trace",
        "the last layer's fwd/bwd include the loss; spreads are 0 (nothing was timed)",
    ]
    if isinstance(rate, _Measured):
        notes.append(f"{rate.shapes} distinct GEMM shapes timed")
    kind = req.device_kind
    if kind is None and isinstance(rate, _Declared):
        kind = rate.spec.kind
    if kind is None and target.declared:
        kind = req.device
    # A declared device's speed is its declared peak (the cluster spec declares the same peak,
    # so the planner's speed ratio is 1); a device at hand gets the cluster probe, like a
    # measured profile, so the planner's speed ratios compare like with like.
    info = device_info(here, target.matmul_flops, kind)
    if isinstance(rate, _Declared):
        info = info.model_copy(update={"name": f"{rate.spec.name} (declared spec)"})
    elif target.declared:
        info = info.model_copy(update={
            "name": f"{kind} (declared {target.matmul_flops:.3g} FLOP/s)"})
    # How many tensors each layer hands on, and how many carry a gradient back: the messages
    # a boundary costs (shapes as traced at the first micro-batch size; only counts are read).
    handed = [Boundary(i, name, tuple(Value(dt, shape, True, grad) for shape, dt, grad in outs))
              for i, ((name, _), outs) in enumerate(zip(model.layers, first_outputs, strict=True))]
    return assemble(req, model, info, points, tps, mbss, dtype, overhead,
                    Provenance(method="estimated", notes=notes), None, optimizer_s, handed)
