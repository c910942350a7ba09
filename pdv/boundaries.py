"""What each layer hands on, found by a shape probe before anything is sent.

Every layer boundary is a possible stage boundary, and between stages only tensors travel, in
buffers sized in advance. The probe runs the whole model on small real batches (three of them:
two sizes, two draws of data) and records, per layer, what it hands on: a tensor or a tuple of
tensors (a nested output -- ``(out, (h, c))``, a dict, a None beside the tensors -- is handed
on as the flat tuple of its tensors, pdv.nesting), each with its dtype, the dim that holds the
micro-batch (dim 0, or dim 1 in torch's sequence-first layout) and its shape without it (or
its whole shape when it has none: a table every sample shares), and whether a gradient flows
back through it. A dim that is a fixed multiple of the rows (logits flattened to (rows ×
tokens, vocab) for the loss, tokens flattened for an MLP) is batched too. Where each sample's
entries sit -- together, as a flatten of (rows, tokens, ...) lays them, or strided, as a
flatten of (tokens, rows, ...) does -- is read off one more run: a few samples alone must give
what the layout says. Anything the wire cannot carry is a PdvError naming the layer (and, at
run time, the stage): a non-tensor that changes between micro-batches, a shape that changes
between micro-batches, a layer that fails on what the one before it hands on, a last layer
that returns more than the loss reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from pdv.errors import PdvError
from pdv.model_def import kept_buffers, put_back
from pdv.models import ModelDef, as_args
from pdv.nesting import either_way, hand_on

__all__ = ["Value", "Boundary", "BoundaryError", "probe", "probe_for_stages", "WIRE_DTYPES",
           "input_values", "in_place_writers", "check_targets"]

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
"""dtypes a boundary may carry (gloo and NCCL both send them)."""

_ROWS = (2, 2, 3)
_SEEDS = (0, 1, 2)


class BoundaryError(PdvError):
    """What a layer hands on cannot cross a stage boundary (or the layer fails on its input)."""

    def __init__(self, layer: int, message: str) -> None:
        super().__init__(message)
        self.layer = layer


@dataclass(frozen=True)
class Value:
    """One tensor a layer hands on."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    """without the micro-batch dim when `batched`, else the whole shape"""
    batched: bool
    """one dim holds the micro-batch: split by samples between replicas, joined when merged"""
    requires_grad: bool
    """a gradient flows back through it"""
    row_factor: int = 1
    """entries of the batch dim per sample (tokens flattened into it)"""
    batch_dim: int = 0
    """the dim that holds the micro-batch: 1 for (tokens, batch, width), torch's default for
    nn.Transformer, nn.LSTM and nn.MultiheadAttention, and for an LSTM's (layers, batch, h)"""
    interleaved: bool = False
    """a sample's `row_factor` entries are strided (rows minor: a flatten of (tokens, batch))
    rather than consecutive (a flatten of (batch, tokens))"""
    separable: bool = True
    """the probe found each sample's entries where this layout says (run alone, a sample gives
    them); False where the model mixes samples or lays them out otherwise, so stages of
    different widths cannot split or join this value"""

    def full_shape(self, rows: int) -> tuple[int, ...]:
        """The shape of this value for a micro-batch of `rows` samples."""
        if not self.batched:
            return self.shape
        d = self.batch_dim
        return (*self.shape[:d], rows * self.row_factor, *self.shape[d:])

    def take(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Samples [lo, hi) of a batched value, in its layout."""
        d, f = self.batch_dim, self.row_factor
        if not self.interleaved:
            return t.narrow(d, lo * f, (hi - lo) * f)
        rows = t.shape[d] // f
        grid = t.unflatten(d, (f, rows)).narrow(d + 1, lo, hi - lo)
        return grid.flatten(d, d + 1)

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Consecutive samples' pieces of a batched value, as one (the inverse of `take`)."""
        d, f = self.batch_dim, self.row_factor
        if not self.interleaved:
            return torch.cat(list(parts), dim=d)
        grids = [p.unflatten(d, (f, p.shape[d] // f)) for p in parts]
        return torch.cat(grids, dim=d + 1).flatten(d, d + 1)


@dataclass(frozen=True)
class Boundary:
    """What layer `layer` hands on to the next (or, for the last layer, to the loss)."""

    layer: int
    name: str
    values: tuple[Value, ...]
    overwritten: bool = False
    """the next layer writes into one of these tensors in place (``ReLU(inplace=True)``): a
    stage that starts there, whose input is a received leaf, must hand it a copy"""


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_describe(o) for o in out) + ")"
    return type(out).__name__


def _values(out: Any, where: str, index: int) -> tuple[torch.Tensor, ...]:
    items = as_args(out)
    for k, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            at = f" (element {k} of its tuple)" if len(items) > 1 else ""
            raise BoundaryError(
                index,
                f"{where} hands on a {type(item).__name__}{at}: {_describe(out)}; it is the "
                "last layer, and the loss reads one tensor: return the tensor loss_fn takes"
            )
        if item.dtype not in WIRE_DTYPES:
            raise BoundaryError(index, f"{where} hands on a {item.dtype} tensor, which pdv "
                                "does not send; cast it to one of "
                                + ", ".join(str(d) for d in WIRE_DTYPES))
    if not items:
        raise BoundaryError(index, f"{where} hands on an empty tuple; return at least one tensor")
    return items


def check_targets(targets: Any, rows: int) -> None:
    """make_batch's targets must be one tensor whose dim 0 holds the rows (or a fixed multiple
    of them: flattened tokens); they are split with the inputs, and the loss reads them."""
    if isinstance(targets, torch.Tensor) and targets.dim() > 0 and targets.shape[0] % rows == 0:
        return
    raise BoundaryError(-1, f"make_batch({rows}, ...) gives targets {_describe(targets)}; "
                        "targets are one tensor with the micro-batch's rows in dim 0 (stack "
                        "several into one tensor and take them apart in loss_fn)")


def _run(model: ModelDef, rows: int, seed: int) -> tuple[list[tuple[torch.Tensor, ...]], set[int]]:
    """Each layer's output, and the layers that wrote into their input in place."""
    gen = torch.Generator().manual_seed(seed)
    x, y = model.make_batch(rows, gen)
    values: tuple[Any, ...] = as_args(x)
    for t in values:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
            raise BoundaryError(0, f"make_batch({rows}, ...) gives inputs {_describe(x)}; "
                                "inputs are a tensor or a tuple of tensors, each with the "
                                "micro-batch's rows in dim 0")
    check_targets(y, rows)
    outs: list[tuple[torch.Tensor, ...]] = []
    writers: set[int] = set()
    layers = [layer for _, layer in model.layers]
    for index, (name, layer) in enumerate(model.layers):
        where = f"layer {index} {name!r}"
        versions = [t._version for t in values]
        out = _call(layer, index, values, where)
        if any(t._version != v for t, v in zip(values, versions, strict=True)):
            writers.add(index)
        try:
            out = hand_on(layers, index, out, where)
        except PdvError as exc:
            raise BoundaryError(index, str(exc)) from None
        outs.append(_values(out, where, index))
        values = outs[-1]
    return outs, writers


def _call(layer: nn.Module, index: int, values: tuple[torch.Tensor, ...], where: str) -> Any:
    """The layer on what the one before it handed on: as separate arguments (pdv's way, and
    the way a batch's tuple reaches the first layer), else as one, as torch's nn.Sequential
    passes a child's tuple on; the first way that runs stays the layer's."""
    try:
        return either_way(layer, index == 0, values, lambda: layer(*values))
    except BoundaryError:
        raise
    except PdvError as exc:  # a nesting hook's check: name the layer for the stage
        raise BoundaryError(index, str(exc)) from None
    except Exception as exc:
        got = _describe(values if len(values) > 1 else values[0])
        raise BoundaryError(
            index,
            f"{where} fails on what {'the batch' if index == 0 else 'the layer before'} "
            f"hands on ({got}): {type(exc).__name__}: {str(exc).strip()[:200]}; a layer "
            "gets the previous layer's output (a tuple's elements as separate arguments, or "
            "the tuple as one, as nn.Sequential passes it): hand on what the next layer "
            "needs, or recompute it there"
        ) from None


def probe(model: ModelDef) -> list[Boundary]:
    """Run the model on three small batches; what every layer hands on, checked for the wire.

    The model is the one that trains next, and a forward in training mode may update buffers
    (BatchNorm's running statistics, spectral norm's power iteration): every buffer gets its
    value back, so the probe's batches leave no trace in training or in a checkpoint."""
    kept = kept_buffers([layer for _, layer in model.layers])
    try:
        return _probe(model)
    finally:
        put_back(kept)


def _probe(model: ModelDef) -> list[Boundary]:
    runs = []
    writers: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        for rows, seed in zip(_ROWS, _SEEDS, strict=True):
            outs, wrote = _run(model, rows, seed)
            runs.append((rows, outs))
            writers |= wrote
    last = len(model.layers) - 1
    boundaries = []
    for index, (name, _) in enumerate(model.layers):
        where = f"layer {index} {name!r}"
        seen = [(rows, outs[index]) for rows, outs in runs]
        counts = {len(v) for _, v in seen}
        if len(counts) > 1:
            raise BoundaryError(index, f"{where} hands on a different number of tensors for "
                                "different batches; pdv needs the same structure every micro-batch")
        values = []
        for k in range(counts.pop()):
            values.append(_value([(rows, v[k]) for rows, v in seen], where, k, index))
        if index == last and len(values) != 1:
            raise BoundaryError(index, f"{where} is the last layer and returns {len(values)} "
                                "tensors; it must return the one tensor the loss reads")
        boundaries.append(Boundary(index, name, tuple(values), index + 1 in writers))
    # the probe's last batch (3 samples) again: seeded, so the same tensors
    x, targets = model.make_batch(3, torch.Generator().manual_seed(_SEEDS[-1]))
    boundaries = _sample_layouts(model, boundaries, as_args(x))
    end = boundaries[-1].values[0]
    if end.interleaved and targets.shape[0] != 3:
        raise BoundaryError(last, f"layer {last} {boundaries[-1].name!r} hands the loss "
                            f"{end.row_factor} rows per sample, strided across the micro-batch "
                            "(a flatten of (tokens, batch, ...)), and flattened targets; pdv "
                            "cuts a batch into micro-batches and replicas by samples in order, "
                            "so rows would meet other samples' targets: flatten batch-first "
                            "(x.transpose(0, 1).reshape(-1, ...)), with targets in that order")
    return boundaries


def _value(seen: Sequence[tuple[int, torch.Tensor]], where: str, k: int, index: int) -> Value:
    shapes = {tuple(t.shape) for _, t in seen}
    dtypes = {t.dtype for _, t in seen}
    grads = {t.requires_grad for _, t in seen}
    what = f"{where} (tensor {k})" if k else where
    if len(dtypes) > 1 or len(grads) > 1:
        raise BoundaryError(index, f"{what}: its dtype or gradient changes between micro-batches "
                       f"({sorted(map(str, dtypes))}); pdv sends a fixed kind of tensor")
    # The probe's batches have two sizes, so a fixed table never passes for a multiple of them,
    # and at most one dim can scale with them while every other dim stays put.
    for dim, factor, rest in _batch_dims(seen):
        return Value(dtypes.pop(), rest, True, grads.pop(), factor, dim)
    if len(shapes) == 1:
        return Value(dtypes.pop(), shapes.pop(), False, grads.pop())
    listed = ", ".join(f"{tuple(t.shape)} at {rows} samples" for rows, t in seen)
    raise BoundaryError(
        index,
        f"{what}: its shape changes between micro-batches ({listed}); pdv sends fixed-size "
        "buffers between stages: pad to a fixed shape, or keep the micro-batch as dim 0"
    )


def _batch_dims(seen: Sequence[tuple[int, torch.Tensor]]
                ) -> list[tuple[int, int, tuple[int, ...]]]:
    """Each dim whose size is one multiple of the rows in every run while the other dims stay
    fixed: (dim, that multiple, the shape without it)."""
    ranks = {t.dim() for _, t in seen}
    if len(ranks) != 1:
        return []
    found = []
    for d in range(ranks.pop()):
        factors = {t.shape[d] // rows if t.shape[d] % rows == 0 else 0 for rows, t in seen}
        rest = {tuple(t.shape[:d]) + tuple(t.shape[d + 1:]) for _, t in seen}
        if len(factors) == 1 and min(factors) > 0 and len(rest) == 1:
            found.append((d, factors.pop(), rest.pop()))
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    return torch.equal(a, b)


def _outputs(model: ModelDef, inputs: tuple[torch.Tensor, ...]) -> list[tuple[Any, ...]]:
    outs, values = [], inputs
    for _, layer in model.layers:
        values = as_args(layer(*values))
        # copies: a layer that writes into its input in place would change what is kept
        outs.append(tuple(t.clone() for t in values))
    return outs


def _sample_layouts(model: ModelDef, boundaries: list[Boundary],
                    inputs: tuple[torch.Tensor, ...]) -> list[Boundary]:
    """Where each batched value keeps a sample's entries: consecutive, strided, or neither.

    The shape of a value says which dim scales with the micro-batch, not how samples sit in
    it: (B·T, d) flattened from (B, T, d) holds a sample's T rows together, flattened from
    (T, B, d) strided. So the model runs once on 3 samples and once on the first 2 alone (eval
    mode, no gradient: no dropout draws, no batch statistics), and each value must give the 2
    samples' entries where its layout says (`inputs`: a batch of 3). A model that fails in
    eval mode keeps the shapes' reading."""
    modes = [layer.training for _, layer in model.layers]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for _, layer in model.layers:
                layer.eval()
            whole = _outputs(model, tuple(t.clone() for t in inputs))
            part = _outputs(model, tuple(t[:2].clone() for t in inputs))
    except Exception:
        return boundaries
    finally:
        for (_, layer), mode in zip(model.layers, modes, strict=True):
            layer.train(mode)
    checked = []
    for b, got_whole, got_part in zip(boundaries, whole, part, strict=True):
        if not len(b.values) == len(got_whole) == len(got_part):
            checked.append(b)  # eval mode hands on something else: keep the shapes' reading
            continue
        values = []
        for v, a, p in zip(b.values, got_whole, got_part, strict=True):
            if (v.batched and tuple(a.shape) == v.full_shape(3)
                    and tuple(p.shape) == v.full_shape(2) and not _same(v.take(a, 0, 2), p)):
                strided = replace(v, interleaved=True)
                ok = v.row_factor > 1 and _same(strided.take(a, 0, 2), p)
                v = strided if ok else replace(v, separable=False)
            values.append(v)
        checked.append(replace(b, values=tuple(values)))
    return checked


def in_place_writers(boundaries: Sequence[Boundary]) -> frozenset[int]:
    """The layers (past the first) that write into what they receive."""
    return frozenset(b.layer + 1 for b in boundaries if b.overwritten)


def input_values(x: Any) -> tuple[Value, ...]:
    """What the first stage receives: each of make_batch's inputs, batched, no gradient."""
    return tuple(Value(t.dtype, tuple(t.shape[1:]), True, False) for t in as_args(x))


def probe_for_stages(model: ModelDef, stage_layers: Sequence[tuple[int, int]]) -> list[Boundary]:
    """probe(), with an error naming the plan's stage that holds the layer."""
    try:
        return probe(model)
    except BoundaryError as exc:
        for s, (start, end) in enumerate(stage_layers):
            if start <= exc.layer < end:
                raise PdvError(f"stage {s} (layers [{start}, {end})): {exc}") from None
        raise
