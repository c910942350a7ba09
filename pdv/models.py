"""Load a model factory and the contract a model offers pdv.

A factory is named as ``path/to/file.py:factory``, ``package.module:factory`` or, for the models
shipped in ``pdv.sample_models``, by its short name (``gpt_tiny``), and called with
keyword arguments (``--model-arg key=value``). It returns a :class:`ModelDef` (pdv.model_def,
re-exported here): the ordered layers that pipeline stages are cut from, a batch maker, a loss,
and optionally a tensor-parallel plan; or a plain module that an adapter (pdv.adapters) cuts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pdv.adapters.hf import FAMILIES
from pdv.adapters.module import from_module
from pdv.errors import PdvError
from pdv.model_def import Chain, Inputs, ModelDef, as_args
from pdv.nesting import install_inputs, nesting_of
from pdv.sample_models import SAMPLES, sample_spec

__all__ = ["Chain", "Inputs", "ModelDef", "as_args", "load_factory", "build_model",
           "cast_batch", "cast_model", "check_dtype", "parse_model_args"]


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
        family = spec[len(HF_PREFIX):]
        if family in FAMILIES:
            spec = f"pdv.adapters.hf:{family}"
        elif family.replace("_", "").replace("-", "").isalnum():  # bert-generation
            from pdv.adapters.hf import decoder

            return functools.partial(decoder, family)
        else:
            raise PdvError(f"model {spec!r}: hf: takes a transformers model_type "
                           f"({', '.join(HF_PREFIX + f for f in FAMILIES)}, hf:mistral, ...)")
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
    return _flat_inputs(model, spec)


def _flat_inputs(model: ModelDef, spec: str) -> ModelDef:
    """make_batch's inputs as flat tensors, where they are a dict or nested (ids and a mask
    in a dict): what the batch splits into micro-batches and replicas and what a first stage
    receives; the first layer gets the structure back (pdv.nesting)."""
    # on CPU whatever device the model is built on (--estimate builds on meta): the batch is
    # data, and only its structure is read here
    with torch.device("cpu"):
        x, _ = model.make_batch(2, torch.Generator().manual_seed(0))
    nesting = nesting_of(x)  # None where make_batch is already flat
    if nesting is None:
        return model
    if nesting.tensors == 0:
        raise PdvError(f"model {spec!r}: make_batch's inputs hold no tensor ({nesting})")
    install_inputs(model.layers[0][1], nesting)
    make_batch = model.make_batch

    def flat(rows: int, gen: torch.Generator) -> tuple[Inputs, torch.Tensor]:
        x, y = make_batch(rows, gen)
        return nesting.flatten(x, f"model {spec!r}: make_batch"), y

    model.make_batch = flat
    model.inputs = nesting
    return model


def cast_batch(batch: tuple[Inputs, torch.Tensor],
               dtype: torch.dtype) -> tuple[Inputs, torch.Tensor]:
    """(inputs, targets) with the floating ones in `dtype`; token ids and labels stay integers."""
    x, y = batch

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return (tuple(cast(t) for t in x) if isinstance(x, (tuple, list)) else cast(x)), cast(y)


def check_dtype(model: ModelDef, dtype: torch.dtype) -> None:
    """Refuse a dtype the model cannot run in (profile and run alike)."""
    if dtype != torch.float32 and model.prepare is not None:
        # Graphs traced at build time hold float32 constants (an arange of the input's dtype).
        raise PdvError(f"a model split by tracing (--split-at/--blocks) runs in float32 only, "
                       f"not {str(dtype).removeprefix('torch.')}: its graphs were traced in "
                       "float32; profile and plan it in float32")


def cast_model(model: ModelDef, dtype: torch.dtype) -> ModelDef:
    """The model in `dtype`, as `pdv profile model --dtype` timed it: every layer's floating
    parameters and buffers cast in place (a tied parameter stays one), and make_batch's
    floating inputs and targets cast too, so the boundary probe and the run's batches see
    what the layers take. float32 leaves the model as built: nothing copied or wrapped."""
    if dtype == torch.float32:
        return model
    check_dtype(model, dtype)
    for _, layer in model.layers:
        layer.to(dtype)
    make_batch = model.make_batch

    def cast(rows: int, gen: torch.Generator) -> tuple[Inputs, torch.Tensor]:
        return cast_batch(make_batch(rows, gen), dtype)

    model.make_batch = cast
    model.dtype = dtype  # what a data hook's batches are cast to (pdv.run.data)
    return model
