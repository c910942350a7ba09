"""Load a model factory and the contract a model offers pdv.

A factory is named as ``path/to/file.py:factory``, ``package.module:factory`` or, for the models
shipped in ``pdv.sample_models``, by its short name (``gpt_tiny``), and called with
keyword arguments (``--model-arg key=value``). It returns a :class:`ModelDef`: the ordered layers
that pipeline stages are cut from, a batch maker, a loss, and optionally a tensor-parallel plan.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pdv.errors import PdvError
from pdv.sample_models import SAMPLES, sample_spec

__all__ = ["Chain", "ModelDef", "load_factory", "build_model", "parse_model_args"]


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (what the wire accepts)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _wire_input(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _GradContiguous.apply(x)
    return x


def _wire_output(x: Any) -> Any:
    return x.contiguous() if isinstance(x, torch.Tensor) else x


class Chain(nn.Sequential):
    """Layers run in order. A layer that returns a tuple hands its elements on as the next
    layer's positional arguments; a layer that returns one tensor hands on that tensor.

    What leaves the chain is made contiguous, and so is the gradient that flows back into its
    inputs: a stage is a Chain, and gloo (like NCCL) sends only contiguous tensors, whatever
    views the model's own layers hand on (a transpose, a slice).
    """

    def forward(self, *args: Any) -> Any:
        values = tuple(_wire_input(a) for a in args)
        for layer in self:
            out = layer(*values)
            values = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        outs = tuple(_wire_output(v) for v in values)
        return outs[0] if len(outs) == 1 else outs


@dataclass
class ModelDef:
    """What pdv needs of a model. Layers run in order: layer i's output is layer i+1's input."""

    layers: list[tuple[str, nn.Module]]
    """Ordered (name, module) pipeline units; a stage is a contiguous range of them."""
    make_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    """(micro_batch_size, generator) -> (inputs, targets), seeded and synthetic."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(last layer's output, targets) -> scalar loss (mean over the micro-batch)."""
    tp_plan: Callable[[int, nn.Module], dict[str, Any]] | None = None
    """Layer index, layer -> parallelize_module plan {module path: ParallelStyle}; {} replicates."""
    tp_shard: Callable[[int, nn.Module, int], nn.Module] | None = None
    """Layer index, layer, k -> a module with the local shard shapes of TP degree k (profiling)."""
    tp_degrees: Sequence[int] = field(default_factory=lambda: (1,))
    """TP degrees the model supports (divisors of its head count and hidden sizes)."""
    dtype: torch.dtype = torch.float32
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


def parse_model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ['n_layer=4', 'name=x'] into kwargs; values are read as JSON when they parse as JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise PdvError(f"--model-arg {pair!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


HF_PREFIX = "hf:"
"""`hf:llama`, `hf:gpt2`: HuggingFace decoder models built from a config (pdv.adapters.hf)."""


def load_factory(spec: str) -> Callable[..., Any]:
    """Resolve 'path/file.py:fn', 'pkg.mod:fn', 'hf:family' or a sample's short name to the
    factory callable."""
    if spec.startswith(HF_PREFIX):
        from pdv.adapters.hf import FAMILIES

        family = spec[len(HF_PREFIX):]
        if family not in FAMILIES:
            raise PdvError(f"model {spec!r}: pdv builds the HuggingFace families "
                           f"{', '.join(HF_PREFIX + f for f in FAMILIES)}")
        spec = f"pdv.adapters.hf:{family}"
    target, sep, name = spec.rpartition(":")
    packaged = sample_spec(spec)
    if packaged is not None and (not sep or not Path(target).is_file()):
        target, sep, name = packaged.rpartition(":")
    if not sep or not target or not name:
        raise PdvError(
            f"model {spec!r}: expected 'path/to/file.py:factory', 'pkg.mod:factory' or a sample "
            f"model's name ({', '.join(sorted(SAMPLES))})"
        )
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise PdvError(f"model {spec!r}: no such file {path}")
        mod_name = f"_pdv_model_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise PdvError(f"model {spec!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise PdvError(f"model {spec!r}: {target} has no callable {name!r}")
    return fn


def build_model(spec: str, kwargs: dict[str, Any] | None = None, seed: int = 0, *,
                split_at: Sequence[str] = (), blocks: Sequence[str] = ()) -> ModelDef:
    """Build the model with a fixed seed so every rank and every run gets the same weights.

    The factory returns a ModelDef, an nn.Sequential (a layer per child) or any nn.Module cut
    at `split_at` / `blocks` (pdv.adapters.module).
    """
    factory = load_factory(spec)
    torch.manual_seed(seed)
    try:
        made = factory(**(kwargs or {}))
    except TypeError as exc:
        raise PdvError(f"model {spec!r}: bad arguments {kwargs}: {exc}") from None
    if isinstance(made, nn.Module):
        from pdv.adapters.module import from_module

        model = from_module(made, factory, spec, split_at, blocks)
    elif isinstance(made, ModelDef):
        if split_at or blocks:
            raise PdvError(f"model {spec!r} returns a ModelDef, whose layers are already cut; "
                           "drop --split-at/--blocks")
        model = made
    else:
        raise PdvError(
            f"model {spec!r}: the factory returned {type(made).__name__}; return a "
            "pdv.models.ModelDef, an nn.Sequential, or an nn.Module (cut with --split-at or "
            "--blocks)"
        )
    if not model.layers:
        raise PdvError(f"model {spec!r}: no layers")
    for name, layer in model.layers:
        if not isinstance(layer, nn.Module):
            raise PdvError(f"model {spec!r}: layer {name!r} is a {type(layer).__name__}, "
                           "not an nn.Module")
    return model
