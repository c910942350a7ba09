"""`pdv profile model`: every layer's forward and backward time and memory, measured or estimated.

Measuring (the default) runs the layers on this device. For each TP degree (at the local shard
shapes the model's ``tp_shard`` gives) and each micro-batch size:

1. the micro-batch is pushed through the layers once without grad, so each layer is fed the
   real activations of the layers before it;
2. one untimed forward per layer counts its saved activations, output bytes and FLOPs;
3. then ``warmup + repeat`` rounds (at least one warm-up), the timed ones split over three
   visits that take every micro-batch size in turn, each visit after the first starting with
   one untimed round; a round times every layer's forward in order (the last layer includes the
   loss, as the last pipeline stage computes it), then
   every layer's backward in reverse order, each from a fixed upstream gradient on that
   layer's output -- and, at the reference point, the whole model's forward+backward. Gradients
   are kept from round to round, so a backward adds into the ones the warm-up left, as every
   micro-batch of a step but its first does;
   Interleaving rounds spreads any noise from the rest of the machine evenly over the layers,
   the micro-batch sizes and the whole model, so their medians can be compared;
4. last, one optimizer step per layer (pdv.profile.optimizer): the run's optimizer over the
   layer's parameters, rounds over every layer in order after a warm-up step that allocates state.

Times are medians over the kept rounds, with the interquartile range as the spread; the points
go to pdv.profile.request.assemble, which fits time = a + b·micro_batch per layer and TP degree.
With ``--estimate``, :func:`profile_model` hands the request to pdv.profile.estimate instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pdv.artifacts import (
    ModelProfile,
    Provenance,
    WholeModelTiming,
)
from pdv.boundaries import in_place_writers, probe
from pdv.errors import PdvError
from pdv.model_def import as_args, grad_copies
from pdv.models import build_model
from pdv.profile.allocator import keep_freed_memory
from pdv.profile.compute import (
    Clock,
    device_info,
    median_iqr,
    resolve_device,
    resolve_dtype,
)
from pdv.profile.estimate import estimate_profile
from pdv.profile.hardware import SmallOpNet
from pdv.profile.hardware import matmul_flops as matmul_flops_probe
from pdv.profile.memory import (
    OPTIMIZERS,
    LiveBytes,
    SavedTensors,
    backward_peak,
    cuda_saved_bytes,
    overhead_bytes,
    param_bytes,
    tensor_bytes,
)
from pdv.profile.optimizer import optimizer_note, time_optimizer_steps
from pdv.profile.request import (
    Point,
    ProfileRequest,
    Progress,
    assemble,
    check_model,
    check_request,
)
from pdv.profile.source_memory import model_source_bytes

__all__ = ["profile_model"]

def profile_model(req: ProfileRequest, progress: Progress | None = None) -> ModelProfile:
    """Measure (or with req.estimate, estimate) the per-layer profile of a model."""
    check_request(req)
    if req.estimate:
        return estimate_profile(req, progress)
    if (req.device_flops is not None or req.device_bandwidth is not None
            or req.device_spec is not None):
        raise PdvError("--device-spec/--device-flops/--device-bandwidth only apply with "
                       "--estimate "
                       "(measured times need no scaling)")
    return _measure_profile(req, progress)


def _leaf(x: torch.Tensor, grad: bool) -> torch.Tensor:
    x = x.detach()
    return x.requires_grad_(grad and x.is_floating_point())


Values = tuple[torch.Tensor, ...]
"""What a layer receives: the previous layer's output (a tuple's elements as arguments)."""


def _leaves(xs: Values, grad: bool) -> Values:
    return tuple(_leaf(x, grad) for x in xs)


def _backward(out: Any, grads: Sequence[torch.Tensor | None] | None) -> bool:
    """Backward from a layer's output (a loss, a tensor or a tuple); False if nothing to do."""
    outs = as_args(out)
    pairs = [(o, None if grads is None else grads[k]) for k, o in enumerate(outs)
             if o.requires_grad]
    if not pairs:
        return False  # no parameters and no gradient input: nothing to do in backward
    torch.autograd.backward([o for o, _ in pairs],
                            None if grads is None else [g for _, g in pairs])
    return True


def _clear_grads(layer: nn.Module) -> None:
    for p in layer.parameters():
        p.grad = None


def _forward(layer: nn.Module, xs: Values, last: bool, loss_fn: Callable[..., Any],
             targets: torch.Tensor) -> Any:
    out = layer(*xs)
    return loss_fn(out, targets) if last else out


def _layer_memory(layer: nn.Module, xs: Values, first: bool, last: bool,
                  loss_fn: Callable[..., Any], targets: torch.Tensor,
                  device: torch.device, writes: bool = False,
                  upstream: Sequence[torch.Tensor | None] | None = None,
                  ) -> tuple[int, int, float, int]:
    """(saved activation bytes, output bytes, forward FLOPs, backward bytes) of one untimed
    forward and backward; backward bytes are its peak above what the forward left alive."""
    xs = _leaves(xs, not first)
    if writes:
        xs = grad_copies(xs)
    saved = SavedTensors(exclude=list(layer.parameters()))
    live = LiveBytes()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    with live, saved.active(), FlopCounterMode(display=False) as counter:
        out = layer(*xs)
        loss = loss_fn(out, targets) if last else None
    out_bytes = tensor_bytes(out)
    act = saved.bytes()
    if cuda:
        torch.cuda.synchronize(device)
        after = torch.cuda.memory_allocated(device)
        act = cuda_saved_bytes(before, after, out_bytes,
                               all(saved.holds(o) for o in as_args(out)),
                               tensor_bytes(xs), all(saved.holds(x) for x in xs))
    flops = float(counter.get_total_flops())
    del saved  # it holds what it counted: backward must be free to release it
    root, grads = (loss, None) if last else (out, upstream)
    return act, out_bytes, flops, backward_peak(layer, live, lambda: _backward(root, grads))


def _time_layers(layers: Sequence[nn.Module], acts: Sequence[Values],
                 grads: Sequence[tuple[torch.Tensor | None, ...]], loss_fn: Callable[..., Any],
                 targets: torch.Tensor, clock: Clock,
                 writers: frozenset[int] = frozenset()) -> tuple[list[float], list[float]]:
    """One round: every layer's forward in order, then every backward in reverse order.

    The order and the data flow are the whole model's: a layer takes the output its
    predecessor has just written and, in backward, the input gradient its successor has just
    written, so each layer meets the caches and allocator state it meets in training (a
    forward right after another layer's backward measured 30% slower on CPU for gpt_tiny
    blocks; with precomputed, cache-cold inputs a model handing on 2 MB views summed 21% over
    its whole-model time in one CI run). `acts` and `grads` stand in where the live tensor
    cannot.
    """
    n = len(layers)
    fwd, bwd = [0.0] * n, [0.0] * n
    outs: list[Any] = []
    ins: list[Values] = []
    for i, layer in enumerate(layers):
        xs = _leaves(acts[i] if i == 0 else _hand_on(outs[i - 1], acts[i]), i > 0)
        ins.append(xs)
        if i in writers:
            xs = grad_copies(xs)
        t0 = clock.now()
        outs.append(_forward(layer, xs, i == n - 1, loss_fn, targets))
        fwd[i] = clock.now() - t0
    for i in reversed(range(n)):
        out = outs[i]
        outs[i] = None
        upstream = None if i == n - 1 else _grads_back(ins[i + 1], grads[i])
        t0 = clock.now()
        if _backward(out, upstream):
            bwd[i] = clock.now() - t0
    return fwd, bwd


def _hand_on(out: Any, expected: Values) -> Values:
    """The live output as the next layer's input, or the precomputed one where they differ
    in kind or shape (a TP layer's timed output may be a DTensor)."""
    values = as_args(out)
    same = len(values) == len(expected) and all(
        type(v) is torch.Tensor and v.shape == e.shape and v.dtype == e.dtype
        for v, e in zip(values, expected, strict=False))
    return values if same else expected


def _grads_back(successor_inputs: Values,
                fixed: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """The gradients the successor's backward just left on its inputs, else the fixed ones."""
    live = tuple(x.grad for x in successor_inputs)
    same = len(live) == len(fixed) and all(
        (g is None) == (f is None) and (g is None or f is None or g.shape == f.shape)
        for g, f in zip(live, fixed, strict=False))
    return live if same else fixed


def _time_whole(layers: Sequence[nn.Module], x: Any, loss_fn: Callable[..., Any],
                targets: torch.Tensor, clock: Clock) -> tuple[float, float]:
    t0 = clock.now()
    h: Any = x
    for layer in layers:
        h = layer(*as_args(h))
    loss = loss_fn(h, targets)
    t1 = clock.now()
    loss.backward()
    t2 = clock.now()
    return t1 - t0, t2 - t1


def _measure_points(layers: Sequence[nn.Module], loss_fn: Callable[..., Any],
                    batches: dict[int, tuple[Any, torch.Tensor]],
                    device: torch.device, warmup: int, repeat: int, whole_at: int | None,
                    ticks: dict[int, Callable[[], None]], between: Callable[[], None],
                    timed: Sequence[nn.Module] | None = None,
                    writers: frozenset[int] = frozenset(),
                    each_round: Callable[[], None] | None = None,
                    ) -> tuple[dict[int, list[Point]], list[tuple[float, float]]]:
    """Every layer at each micro-batch size of one TP degree; the whole model at `whole_at`.

    The timed rounds of each size are split over VISITS visits, the sizes taken in turn on each,
    so a spell of machine noise (a shared VM's ran for tens of seconds, 1.5x) reaches every
    size alike instead of all rounds of one: timed one size after another, one size of convnet
    read 52% slow against the others' 7-14%. `between` runs after each visit to every size.
    `timed` (same shapes in and out) replaces `layers` in the timing rounds: TP layers are
    timed as the run executes them (DTensor) and counted in memory as plain shards.
    """
    n = len(layers)
    timed = layers if timed is None else timed
    clock = Clock(device)
    # `writers` write into their input in place: the untimed passes below hand them copies
    # so that every layer's stored input stays what its predecessor handed on.
    setup = {}
    for m, (inputs, targets) in batches.items():
        acts: list[Values] = [as_args(inputs)]
        with torch.no_grad():
            for i, layer in enumerate(layers[:-1]):
                xs = tuple(x.clone() for x in acts[-1]) if i in writers else acts[-1]
                acts.append(as_args(layer(*xs)))
        # A fixed upstream gradient per layer output stands in for what the next stage sends
        # back.
        gen = torch.Generator(device=device).manual_seed(1)
        grads = [tuple(torch.randn(a.shape, generator=gen, device=device, dtype=a.dtype)
                       if a.is_floating_point() else None for a in values)
                 for values in acts[1:]]  # fmt: skip
        points = []
        for i, layer in enumerate(layers):
            act, out, flops, back = _layer_memory(
                layer, acts[i], i == 0, i == n - 1, loss_fn, targets, device, i in writers,
                None if i == n - 1 else grads[i])
            points.append(Point([], [], param_bytes(layer), act, out, flops, back))
        setup[m] = (acts, grads, points)
    whole_times: list[tuple[float, float]] = []
    for v, timed_rounds in enumerate(_visits(repeat, len(batches))):
        for m, (inputs, targets) in batches.items():
            acts, grads, points = setup[m]
            # Every visit to a size starts untimed, so its first timed round meets the caches
            # its own previous round left, as a stage running one size does (after another
            # size's larger backward, tuples_tied's layers at micro-batch 4 summed 1.29-1.36x
            # its whole-model time against 1.16 timed size after size).
            untimed = warmup if v == 0 else 1
            for r in range(untimed + timed_rounds):
                fwd, bwd = _time_layers(timed, acts, grads, loss_fn, targets, clock, writers)
                if r >= untimed:
                    for i in range(n):
                        points[i].fwd.append(fwd[i])
                        points[i].bwd.append(bwd[i])
                if m == whole_at:
                    tw = _time_whole(layers, inputs, loss_fn, targets, clock)
                    if r >= untimed:
                        whole_times.append(tw)
                if r >= untimed and each_round is not None:
                    each_round()
                ticks[m]()
        between()
    for layer in (*layers, *timed):
        _clear_grads(layer)
    return {m: points for m, (_, _, points) in setup.items()}, whole_times


SMALL_OP_AROUND_S, SMALL_OP_ROUND_S = 0.1, 0.005
"""seconds of the small-op reference read before and after the layer points, and after each
timed round (about 8 of its 0.65 ms steps here)"""
VISITS = 3
"""times the profiler comes back to each micro-batch size, its timed rounds split among them"""


def _visits(repeat: int, sizes: int) -> list[int]:
    """Timed rounds per visit: `repeat` split as evenly as it goes over at most VISITS (one
    visit when there is one size: nothing to take turns with)."""
    k = max(1, min(VISITS if sizes > 1 else 1, repeat))
    return [repeat // k + (i < repeat % k) for i in range(k)]


def rounds_per_size(warmup: int, repeat: int, sizes: int) -> int:
    """Rounds a micro-batch size takes in all: the warm-up, one untimed round on each later
    visit, and the timed ones."""
    return warmup + len(_visits(repeat, sizes)) - 1 + repeat


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def _measure_profile(req: ProfileRequest, progress: Progress | None) -> ModelProfile:
    device = resolve_device(req.device)
    dtype = resolve_dtype(req.dtype)
    # Check the model first on the meta device (no memory, no time), so a bad model or TP
    # degree fails before any measuring.
    with torch.device("meta"):
        check_model(req, build_model(req.spec, req.kwargs, req.seed, split_at=req.split_at,
                                blocks=req.blocks))
    # The matmul probe doubles as the warm-up that loads kernels and libraries, so the overhead
    # read right after it (before any model tensor exists) is the runtime's constant cost.
    info = device_info(device, kind=req.device_kind)
    overhead, overhead_note = overhead_bytes(device)
    if device.type == "cpu":
        # Host memory only: a CUDA rank's imports do not take device memory.
        extra, source_note = model_source_bytes(req.spec, req.kwargs, req.split_at, req.blocks)
        overhead += extra
        overhead_note += "; " + source_note
    # After the runtime's own bytes are read (so the probe's freed buffers are not counted as
    # runtime), before anything is timed: a run's ranks allocate the same way.
    malloc_note = keep_freed_memory() if device.type == "cpu" else None
    model = build_model(req.spec, req.kwargs, req.seed, split_at=req.split_at,
                        blocks=req.blocks)
    tps = check_model(req, model)
    # Every layer boundary is a possible stage boundary: check now what each hands on.
    boundaries = probe(model)
    writers = in_place_writers(boundaries)
    mbss = tuple(sorted(set(req.micro_batch_sizes)))
    ref = mbss[0]
    base = [layer.to(device=device, dtype=dtype) for _, layer in model.layers]
    gen = torch.Generator().manual_seed(req.seed)
    batches = {}
    for m in mbss:
        x, y = model.make_batch(m, gen)
        batches[m] = (tuple(_to_device(t, device, dtype) for t in as_args(x)), y.to(device))

    # The optimizer rounds come last; its first step is always a warm-up (it allocates state).
    # At least one warm-up: it leaves the gradients each timed backward adds into.
    warmup = max(1, req.warmup)
    opt_rounds = warmup + req.repeat
    total = len(tps) * len(mbss) * rounds_per_size(warmup, req.repeat, len(mbss)) + opt_rounds
    done = 0

    def ticker(what: str) -> Callable[[], None]:
        if progress:
            progress(what, done, total)

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(what, done, total)

        return tick

    points: dict[tuple[int, int], list[Point]] = {}
    whole: list[tuple[float, float]] = []
    tp_runtime = _TPRuntime(max(tps), device) if len(tps) > 1 else None
    probes = [info.matmul_flops] if info.matmul_flops else []
    # The small-op reference after every timed round as well as around them: read between
    # the visits only, five readings missed a spell that held most of gpt_tiny's rounds
    # (1.6x its layers' usual times; readings 642 .. 1034 µs, median 650).
    small_net = SmallOpNet(device)
    small = [small_net(SMALL_OP_AROUND_S)]

    def between() -> None:
        probes.append(matmul_flops_probe(device))
    try:
        for tp in tps:
            timed = None
            if tp == 1:
                layers = base
            else:
                assert model.tp_shard is not None and model.tp_plan is not None
                with torch.device(device):
                    layers = [model.tp_shard(i, layer, tp).to(device=device, dtype=dtype)
                              for i, layer in enumerate(base)]
                if tp_runtime is not None and tp_runtime.ready:
                    timed = tp_runtime.parallelize(base, model.tp_plan, tp)
            ticks = {m: ticker(f"TP {tp}, micro-batch {m}") for m in mbss}
            # The machine's speed drifts (±10% over minutes on a shared VM): probing between
            # the rounds makes the profile's rate the one its layer times were taken at.
            pts, w = _measure_points(layers, model.loss_fn, batches,
                                     device, warmup, req.repeat, ref if tp == 1 else None,
                                     ticks,
                                     between,
                                     timed=timed, writers=writers,
                                     each_round=lambda: small.append(small_net(SMALL_OP_ROUND_S)),
                                     )  # fmt: skip
            for m in mbss:
                points[(tp, m)] = pts[m]
            whole = whole or w
    finally:
        if tp_runtime is not None:
            tp_runtime.close()
    optimizer_s = time_optimizer_steps(base, req.optimizer, device, req.warmup, req.repeat,
                                       ticker(f"optimizer step ({req.optimizer})"))
    if probes:
        info = info.model_copy(update={"matmul_flops": statistics.median(probes)})
    small.append(small_net(SMALL_OP_AROUND_S))
    info = info.model_copy(update={"small_op_step_s": statistics.median(small)})

    wf = [f for f, _ in whole]
    wb = [b for _, b in whole]
    wfb_med, wfb_iqr = median_iqr([f + b for f, b in whole])
    whole_timing = WholeModelTiming(micro_batch_size=ref, fwd_s=median_iqr(wf)[0],
                                    bwd_s=median_iqr(wb)[0], fwd_bwd_s=wfb_med,
                                    fwd_bwd_spread_s=wfb_iqr)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    notes = [
        f"per layer: {warmup} warm-up + {req.repeat} timed rounds; median and IQR; the timed "
        f"rounds in {len(_visits(req.repeat, len(mbss)))} visits that take the micro-batch "
        "sizes in turn "
        "(each later visit after one untimed round), and each round times all layers and the "
        "whole model, so machine noise hits each alike",
        "each layer is fed the real activations of the layers before it; backward is timed "
        "from a fixed upstream gradient and includes the input gradient (not for layer 0)",
        "backward adds into the gradients the warm-up left, as each micro-batch of a step but "
        "the first does (a step zeroes them with set_to_none); an mlp block of 8 MiB of "
        "weights took 25-30% longer adding than writing them afresh",
        "the last layer's fwd/bwd include the loss, as the last pipeline stage computes it",
        "activation_bytes: distinct non-parameter storages saved for backward "
        + ("(caching-allocator delta across the forward, adjusted for input/output)"
           if device.type == "cuda" else "(saved_tensors_hooks)")
        + ", per micro-batch, including the layer's input where backward keeps it",
        "backward_bytes: the peak of the storages alive during one backward (gradients "
        "already held) above what its forward left alive, counted per storage by a dispatch "
        "mode, per micro-batch",
        f"optimizer_bytes: {req.optimizer} at {OPTIMIZERS[req.optimizer]} bytes per parameter",
        f"optimizer_s: {optimizer_note(req.optimizer)} over each layer's own trainable "
        f"parameters (TP 1, {req.dtype}) with random gradients of their shapes; "
        f"{opt_rounds - req.repeat} warm-up step(s) (the first allocates the state), then "
        f"{req.repeat} timed rounds, each stepping every layer in order; median"
        + ("; the device synchronized around each step" if device.type == "cuda" else ""),
        overhead_note,
        "matmul_flops: the probe pdv profile cluster runs on every rank "
        "(pdv.profile.hardware.matmul_flops), so profile and cluster speeds compare; the "
        f"median of {len(probes)} probes taken before and between the layer points "
        + (f"({min(probes) / 1e9:.1f} .. {max(probes) / 1e9:.1f} GFLOP/s)" if probes else ""),
        "small_op_step_s: the small-op reference net's forward and backward "
        "(pdv.profile.hardware.small_op_step_s, as pdv profile cluster times it on each rank "
        f"alone), the median of {len(small)} readings: one before and one after the layer "
        f"points ({SMALL_OP_AROUND_S} s each) and one after every timed round "
        f"({SMALL_OP_ROUND_S} s each); {min(small) * 1e6:.0f} .. {max(small) * 1e6:.0f} µs",
        "time fits: least squares over the micro-batch sizes, per TP degree",
    ]
    if threads is not None:
        notes.append(f"CPU threads: {threads} (torch.get_num_threads())")
    if malloc_note:
        notes.append(malloc_note)
    if len(tps) > 1:
        if tp_runtime is not None and tp_runtime.ready:
            notes.append(
                "TP > 1: layers timed as pdv run executes them, parallelize_module with the "
                "model's TP plan (DTensor dispatch included) on a single-process fake process "
                "group whose collectives do nothing; memory counted on model.tp_shard's plain "
                "shards; TP collectives are priced on the measured links")
        else:
            notes.append(
                "TP > 1: layers timed at the local shard shapes of model.tp_shard on one "
                f"device ({tp_runtime.why if tp_runtime else 'no TP runtime'}); DTensor "
                "dispatch and TP collectives are not included")
    return assemble(req, model, info, points, tps, mbss, dtype, overhead,
                    Provenance(method="measured", notes=notes), whole_timing, optimizer_s,
                    boundaries)


class _TPRuntime:
    """A one-process stand-in for a TP group: torch's fake backend, DTensor meshes on it.

    It lets the profiler time a TP shard the way the run executes it (parallelize_module,
    DTensor dispatch: about 20% over a plain shard for a gpt_small block on CPU) with the
    collectives left out; they are priced on measured links. Not available inside an already
    initialised process group (e.g. under torchrun).
    """

    def __init__(self, world: int, device: torch.device) -> None:
        import torch.distributed as dist

        self.device, self.ready, self.why = device, False, ""
        if dist.is_initialized():
            self.why = "a process group is already up"
            return
        try:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        except Exception as exc:  # a torch without the fake backend: plain shards then
            self.why = f"no fake process group: {type(exc).__name__}"
            return
        self.ready = True

    def parallelize(self, layers: Sequence[nn.Module], plan: Callable[[int, nn.Module], Any],
                    tp: int) -> list[nn.Module]:
        """Copies of the layers, each parallelized over a mesh of `tp` (fake) ranks."""
        import copy

        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = DeviceMesh(self.device.type, list(range(tp)))
        out = []
        for i, layer in enumerate(layers):
            layer_plan = plan(i, layer)
            out.append(parallelize_module(copy.deepcopy(layer), mesh, layer_plan)
                       if layer_plan else layer)
        return out

    def close(self) -> None:
        """Tear the fake group down."""
        import torch.distributed as dist

        if self.ready and dist.is_initialized():
            dist.destroy_process_group()
