"""The contract a model offers pdv: :class:`ModelDef` (ordered layers, data, loss, TP plan) and
:class:`Chain` (how a run of layers hands values on).

Its own module so that loading factories (pdv.models) and the adapters that turn plain modules
into a ModelDef (pdv.adapters) both build on it without importing each other. Model files
import it as ``pdv.models.ModelDef``, which re-exports it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Chain", "ModelDef", "Inputs", "as_args", "grad_copies", "has_sparse_grads",
           "KeptBuffer", "kept_buffers", "put_back"]

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
"""What make_batch gives the first layer: one tensor, or a tuple of them (token ids and a mask),
each with the batch in dim 0; a tuple's elements are the first layer's arguments."""


def as_args(x: Any) -> tuple[Any, ...]:
    """make_batch's inputs, or a layer's output, as the next layer's positional arguments."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def grad_copies(values: Sequence[Any]) -> tuple[Any, ...]:
    """Copies of the tensors that carry a gradient, for a layer that writes into its input in
    place: autograd forbids that on a leaf (a received or profiled input) and on the input a
    recompute keeps."""
    return tuple(v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v
                 for v in values)


def has_sparse_grads(layer: nn.Module) -> bool:
    """Whether the layer holds an embedding with sparse=True (its gradients are sparse)."""
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
               for m in layer.modules())


KeptBuffer = tuple[nn.Module, str, torch.Tensor, torch.Tensor]
"""(module, buffer name, the buffer tensor, a copy of its value)"""


def kept_buffers(layers: Sequence[nn.Module]) -> list[KeptBuffer]:
    """Every buffer of the layers' modules (a module shared by several, once), with a copy of
    its value: what a training-mode forward may move (BatchNorm's running statistics)."""
    kept, seen = [], set()
    for layer in layers:
        for module in layer.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, buf in module._buffers.items():
                if buf is not None:
                    kept.append((module, name, buf, buf.detach().clone()))
    return kept


def put_back(kept: Sequence[KeptBuffer]) -> None:
    """Each kept buffer back in its module (the same tensor), holding its kept value."""
    with torch.no_grad():
        for module, name, buf, value in kept:
            module._buffers[name] = buf
            buf.copy_(value)


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (what the wire accepts); with
    `copy`, a fresh tensor that the stage's first layer may write into in place (a received
    tensor is a leaf, and autograd forbids in-place writes to a leaf or to a view of one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, copy: bool) -> torch.Tensor:
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(), None


def _wire_input(x: Any, copy: bool) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _GradContiguous.apply(x, copy)
    return x


def _wire_output(x: Any) -> Any:
    return x.contiguous() if isinstance(x, torch.Tensor) else x


class Chain(nn.Sequential):
    """Layers run in order. A layer that returns a tuple hands its elements on as the next
    layer's positional arguments; a layer that returns one tensor hands on that tensor.

    What leaves the chain is made contiguous, and so is the gradient that flows back into its
    inputs: a stage is a Chain, and gloo (like NCCL) sends only contiguous tensors, whatever
    views the model's own layers hand on (a transpose, a slice). With `copy_inputs` the inputs
    that carry a gradient are copied first: the chain's first layer writes into its input in
    place (the shape probe's ``Boundary.overwritten``).
    """

    copy_inputs: bool = False

    def forward(self, *args: Any) -> Any:
        values = tuple(_wire_input(a, self.copy_inputs) for a in args)
        for layer in self:
            out = layer(*values)
            values = as_args(out)
        outs = tuple(_wire_output(v) for v in values)
        return outs[0] if len(outs) == 1 else outs


@dataclass
class ModelDef:
    """What pdv needs of a model. Layers run in order: layer i's output is layer i+1's input."""

    layers: list[tuple[str, nn.Module]]
    """Ordered (name, module) pipeline units; a stage is a contiguous range of them."""
    make_batch: Callable[[int, torch.Generator], tuple[Inputs, torch.Tensor]]
    """(micro_batch_size, generator) -> (inputs, targets), seeded and synthetic; inputs is a
    tensor or a tuple of tensors (the first layer's arguments), each with the batch in dim 0."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(last layer's output, targets) -> scalar loss (mean over the micro-batch)."""
    tp_plan: Callable[[int, nn.Module], dict[str, Any]] | None = None
    """Layer index, layer -> parallelize_module plan {module path: ParallelStyle}; {} replicates."""
    tp_shard: Callable[[int, nn.Module, int], nn.Module] | None = None
    """Layer index, layer, k -> a module with the local shard shapes of TP degree k (profiling)."""
    tp_degrees: Sequence[int] = field(default_factory=lambda: (1,))
    """TP degrees the model supports (divisors of its head count and hidden sizes)."""
    dtype: torch.dtype = torch.float32
    """The layers' dtype, and make_batch's floating tensors' (pdv.models.cast_model sets it)."""
    inputs: Any = None
    """How make_batch's inputs nest their tensors (a pdv.nesting.Nesting) where they are more
    than a tensor or a flat tuple: set by pdv.models.build_model, which then hands every
    consumer the flat tensors and the first layer the structure"""
    prepare: Callable[[Sequence[int]], None] | None = None
    """Micro-batch sizes -> None: readies layers specialised to shapes (a traced split) for
    every size that will run; called before any layer is parallelized."""

    def sequential(self, start: int = 0, end: int | None = None) -> Chain:
        """The layers [start, end) as one Chain (shares the modules, no copy)."""
        chosen = self.layers[start:end]
        # Module names cannot hold dots; layer names may ("layers.4", as the model names them).
        return Chain(OrderedDict((name.replace(".", "_"), layer) for name, layer in chosen))

    def tied_groups(self) -> list[list[tuple[int, str]]]:
        """Parameters shared by several layers (an embedding tied to the LM head): per shared
        parameter, the (layer index, parameter name) of every layer that uses it."""
        users: dict[int, list[tuple[int, str]]] = {}
        for index, (_, layer) in enumerate(self.layers):
            for name, p in layer.named_parameters(remove_duplicate=True):
                users.setdefault(id(p), []).append((index, name))
        return [group for group in users.values() if len({i for i, _ in group}) > 1]
