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

__all__ = ["ModelDef", "load_factory", "build_model", "parse_model_args"]


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

    def sequential(self, start: int = 0, end: int | None = None) -> nn.Sequential:
        """The layers [start, end) as one nn.Sequential (shares the modules, no copy)."""
        chosen = self.layers[start:end]
        return nn.Sequential(OrderedDict(chosen))


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


def load_factory(spec: str) -> Callable[..., ModelDef]:
    """Resolve 'path/file.py:fn', 'pkg.mod:fn' or a sample's short name to the factory callable."""
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


def build_model(spec: str, kwargs: dict[str, Any] | None = None, seed: int = 0) -> ModelDef:
    """Build the model with a fixed seed so every rank and every run gets the same weights."""
    factory = load_factory(spec)
    torch.manual_seed(seed)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise PdvError(f"model {spec!r}: bad arguments {kwargs}: {exc}") from None
    if not isinstance(model, ModelDef):
        raise PdvError(f"model {spec!r}: factory returned {type(model).__name__}, not ModelDef")
    if not model.layers:
        raise PdvError(f"model {spec!r}: no layers")
    return model
