"""Layers that hand on more than a flat tuple: ``(out, (h, c))``, a dict, a None or a setting.

Only tensors cross a stage boundary, in a fixed order. A layer whose output nests its tensors
(an LSTM's state pair, a dict of hidden states and masks) or carries non-tensors beside them
(``None`` for an absent mask, a float scale) is made to hand on the flat tuple of its tensors,
and the layer after it gets the structure back before its own forward: a forward hook on the
one, a forward pre-hook on the other. Hooks, not a wrapper module, so that parameter names,
checkpoints and TP plans (module paths inside a layer) stay the model's own.

The structure is found the first time the layer runs (the shape probe, or ``--estimate``'s
meta trace), and every later call must match it: the same nesting, and the same non-tensor
values, which are kept with the structure and never sent (a value that changes between
micro-batches would have to travel, and only tensors do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import nn

from pdv.errors import PdvError

__all__ = ["Nesting", "nesting_of", "install", "install_inputs", "flat_output", "hand_on",
           "either_way", "take_whole"]


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


@dataclass(frozen=True)
class Nesting:
    """How one layer's output holds its tensors, and the non-tensors kept beside them."""

    spec: pytree.TreeSpec
    constants: tuple[tuple[int, Any], ...]
    """(position among the leaves, value) of every leaf that is not a tensor"""
    tensors: int
    """how many tensors travel"""

    def flatten(self, out: Any, where: str) -> tuple[torch.Tensor, ...]:
        """The output's tensors in leaf order, checked against this structure."""
        leaves, spec = _flatten(out)
        if spec != self.spec:
            raise PdvError(f"{where} hands on a different structure than before ({spec} "
                           f"against {self.spec}); pdv needs the same one every micro-batch")
        for k, value in self.constants:
            if not _same(leaves[k], value):
                raise PdvError(f"{where} hands on {leaves[k]!r} where it handed on {value!r}; "
                               "only tensors cross stage boundaries, so a non-tensor it hands "
                               "on must be the same every micro-batch (hand on a tensor)")
        kept = {k for k, _ in self.constants}
        return tuple(leaf for k, leaf in enumerate(leaves) if k not in kept)

    def unflatten(self, tensors: Sequence[Any]) -> Any:
        """The layer's output again, from the tensors that travelled."""
        constants = dict(self.constants)
        it = iter(tensors)
        leaves = [constants[k] if k in constants else next(it)
                  for k in range(self.spec.num_leaves)]
        return pytree.tree_unflatten(leaves, self.spec)

    def same_as(self, other: Nesting) -> bool:
        """The same structure holding the same non-tensors."""
        return (self.spec == other.spec and len(self.constants) == len(other.constants)
                and all(a == b and _same(x, y) for (a, x), (b, y)
                        in zip(self.constants, other.constants, strict=True)))

    def __str__(self) -> str:
        return str(self.spec).replace("\n", " ")


def _flatten(out: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """pytree's flatten, which also looks inside the layer's own dataclasses: each is made a
    pytree node the first time it shows (torch's pytree leaves an unregistered one whole)."""
    while True:
        leaves, spec = pytree.tree_flatten(out)
        unknown = {type(leaf) for leaf in leaves
                   if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type)}
        if not unknown:
            return leaves, spec
        for cls in unknown:
            pytree.register_dataclass(cls)


def nesting_of(out: Any) -> Nesting | None:
    """The structure of a layer's output; None for a tensor or a flat tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return None
    # exactly a tuple or list: a NamedTuple's fields are read by name, so it is rebuilt
    if type(out) in (tuple, list) and out and all(isinstance(o, torch.Tensor) for o in out):
        return None
    leaves, spec = _flatten(out)
    constants = tuple((k, leaf) for k, leaf in enumerate(leaves)
                      if not isinstance(leaf, torch.Tensor))
    return Nesting(spec, constants, len(leaves) - len(constants))


def _as_args(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _rebuild(module: nn.Module, args: tuple[Any, ...]) -> Any:
    """Forward pre-hook: the flat tensors that crossed the boundary, as the layer takes them."""
    nesting: Nesting | None = getattr(module, "_pdv_nesting_in", None)
    whole = getattr(module, "_pdv_takes_whole", False)
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None  # called with the structure itself (not through a boundary)
    if nesting is not None:
        if len(args) != nesting.tensors:
            return None
        value = nesting.unflatten(args)
    elif whole and len(args) > 1:
        value = tuple(args)
    else:
        return None
    return (value,) if whole else _as_args(value)


def _rebuilds(module: nn.Module) -> None:
    if not getattr(module, "_pdv_rebuilds", False):
        module._pdv_rebuilds = True  # type: ignore[assignment]
        module.register_forward_pre_hook(_rebuild)


def install(layers: Sequence[nn.Module], index: int, nesting: Nesting, where: str) -> None:
    """Make layer `index` hand on its tensors flat and layer `index + 1` take them back as
    `nesting` (a tuple's elements as separate arguments, as between any two layers).

    Idempotent; a module that sits at two places must meet one structure at both."""
    out, nxt = layers[index], layers[index + 1]
    for module, attr in ((out, "_pdv_nesting_out"), (nxt, "_pdv_nesting_in")):
        held = getattr(module, attr, None)
        if held is not None and not held.same_as(nesting):
            raise PdvError(f"{where}: this module sits at two places in the model and meets "
                           f"two structures ({held} and {nesting}); use one structure")
    if getattr(out, "_pdv_nesting_out", None) is None:
        out._pdv_nesting_out = nesting  # type: ignore[assignment]

        def flat(module: nn.Module, args: Any, output: Any) -> Any:
            return nesting.flatten(output, where)

        out.register_forward_hook(flat)
    if getattr(nxt, "_pdv_nesting_in", None) is None:
        nxt._pdv_nesting_in = nesting  # type: ignore[assignment]
        _rebuilds(nxt)


def install_inputs(first: nn.Module, nesting: Nesting) -> None:
    """Make the first layer take make_batch's structured inputs (a dict of ids and a mask)
    back from the flat tensors that the batch is split and sent as."""
    if getattr(first, "_pdv_nesting_in", None) is None:
        first._pdv_nesting_in = nesting  # type: ignore[assignment]
        _rebuilds(first)


def _may_take_whole(layer: nn.Module, args: Sequence[Any]) -> bool:
    """Whether the layer, having failed on its predecessor's output as separate arguments,
    could take it as one (it receives several tensors or a structure, and does not yet)."""
    if getattr(layer, "_pdv_takes_whole", False):
        return False
    return len(args) > 1 or getattr(layer, "_pdv_nesting_in", None) is not None


T = TypeVar("T")


def either_way(layer: nn.Module, first: bool, args: Sequence[Any], call: Callable[[], T]) -> T:
    """`call()`, which runs the layer on its predecessor's output as separate arguments (pdv's
    way, and how a batch's tuple reaches the `first` layer); if that fails, once more with the
    output whole, as torch's nn.Sequential passes a child's tuple on. The way that runs stays
    the layer's; if neither does, the first error is raised."""
    try:
        return call()
    except PdvError:
        raise
    except Exception as exc:
        if first or not _may_take_whole(layer, args):
            raise
        take_whole(layer)
        try:
            return call()
        except Exception:
            take_whole(layer, False)
            raise exc from None


def take_whole(layer: nn.Module, whole: bool = True) -> None:
    """Hand the layer its predecessor's tuple or structure as one argument, as torch's
    nn.Sequential does (an nn.LSTM's ``(out, (h, c))`` to a module that picks ``out``);
    ``whole=False`` takes that back."""
    layer._pdv_takes_whole = whole  # type: ignore[assignment]
    _rebuilds(layer)


def flat_output(layer: nn.Module, out: Any, where: str) -> tuple[Any, Nesting | None]:
    """The layer's output with its tensors flat, and its nesting: found in this output, or
    held by the layer's own hook, which has flattened it already (a module at two places)."""
    found = nesting_of(out)
    if found is not None:
        return found.flatten(out, where), found
    return out, getattr(layer, "_pdv_nesting_out", None)


def hand_on(layers: Sequence[nn.Module], index: int, out: Any, where: str) -> Any:
    """Layer `index`'s output as it crosses a boundary: flat, with the hooks that make it so
    installed the first time a nesting shows. The last layer's output is the loss's: left as
    is."""
    if index + 1 >= len(layers):
        return out
    flat, nesting = flat_output(layers[index], out, where)
    if nesting is None:
        return out
    if nesting.tensors == 0:
        raise PdvError(f"{where} hands on no tensor ({nesting}); a layer hands the next one "
                       "at least one tensor")
    install(layers, index, nesting, where)
    return flat
