"""Plain PyTorch modules as pdv models: an ``nn.Sequential``, or any ``nn.Module`` cut by name.

A factory may return a bare module instead of a :class:`pdv.models.ModelDef`. Its file (or
package module) then also defines the data and the loss, next to the factory::

    def net(): return nn.Sequential(...)                 # or any nn.Module
    def make_batch(mbs, generator): return inputs, targets
    def loss_fn(output, targets): return F.mse_loss(output, targets)

An ``nn.Sequential`` becomes one layer per child. Any other module is cut at split points named
like torch.distributed.pipelining's split specs: ``--split-at layers.4`` starts a layer at that
submodule, and ``--blocks model.layers`` makes every child of that ModuleList a layer of its own
(with what runs before the first and after the last as layers too). The module's forward is
traced with torch.export and split there (``torch.distributed.pipelining``'s tracer), so
whatever the forward does between its children (residuals, masks, rotary tables, reshapes) is
kept: each layer hands on every value a later layer still needs (carried across stage
boundaries). A traced graph is specialised to the shapes it saw, so the layers trace once per
micro-batch size (:meth:`ModelDef.prepare` before any parallelization).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from pdv.errors import PdvError
from pdv.model_def import ModelDef, as_args

__all__ = ["from_module", "split_points"]


def _hooks(factory: Callable[..., Any], spec: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    home = sys.modules.get(getattr(factory, "__module__", "") or "")
    make_batch = getattr(home, "make_batch", None)
    loss_fn = getattr(home, "loss_fn", None)
    if not callable(make_batch) or not callable(loss_fn):
        missing = [n for n, f in (("make_batch", make_batch), ("loss_fn", loss_fn))
                   if not callable(f)]
        raise PdvError(
            f"model {spec!r} returns a bare nn.Module, so pdv needs its data and loss: define "
            f"{' and '.join(missing)} next to the factory (make_batch(micro_batch_size, "
            "generator) -> (inputs, targets); loss_fn(output, targets) -> scalar), or return a "
            "pdv.models.ModelDef"
        )
    return make_batch, loss_fn


def from_module(module: nn.Module, factory: Callable[..., Any], spec: str,
                split_at: Sequence[str] = (), blocks: Sequence[str] = ()) -> ModelDef:
    """A ModelDef of a bare module: children of an nn.Sequential, or a traced split."""
    make_batch, loss_fn = _hooks(factory, spec)
    if not split_at and not blocks:
        if not isinstance(module, nn.Sequential):
            raise PdvError(
                f"model {spec!r} returns a {type(module).__name__}, not an nn.Sequential: name "
                "where to cut it with --split-at MODULE (repeatable) or --blocks MODULELIST; "
                f"its submodules: {_names(module)}"
            )
        # Not named_children(): it yields a module once, and a Sequential may hold one module
        # at several places (weights shared across depths), each place a layer.
        layers = [(name, child) for name, child in module._modules.items() if child is not None]
        if not layers:
            raise PdvError(f"model {spec!r}: the nn.Sequential has no children")
        return ModelDef(layers=layers, make_batch=make_batch, loss_fn=loss_fn)
    points = split_points(module, split_at, blocks, spec)
    traces = _Traces(module, points, make_batch, spec)
    if not traces.layer_names:  # built on the meta device: nothing traced, names as given
        traces.layer_names = ["prologue"] + [n if k == "begin" else f"after_{n}"
                                             for n, k in points]
    layers = [(name, _SplitLayer(traces, i)) for i, name in enumerate(traces.layer_names)]
    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=loss_fn,
                    prepare=traces.prepare)


def _names(module: nn.Module, depth: int = 2) -> str:
    names = [n for n, _ in module.named_modules() if n and n.count(".") < depth]
    shown = ", ".join(names[:12])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def split_points(module: nn.Module, split_at: Sequence[str], blocks: Sequence[str],
                 spec: str) -> list[tuple[str, str]]:
    """(submodule name, 'begin' | 'end') cut points, checked to exist, in the given order."""
    points: list[tuple[str, str]] = []
    for name in split_at:
        _submodule(module, name, spec, "--split-at")
        points.append((name, "begin"))
    for name in blocks:
        parent = _submodule(module, name, spec, "--blocks")
        children = [n for n, _ in parent.named_children()]
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or not children:
            raise PdvError(
                f"--blocks {name}: {type(parent).__name__} is not a non-empty ModuleList or "
                "Sequential; name the list that holds the model's blocks (e.g. model.layers)"
            )
        slots = [n for n, m in parent._modules.items() if m is not None]
        if len(slots) > len(children):
            raise PdvError(
                f"--blocks {name}: the list holds one module at several places ({len(slots)} "
                f"places, {len(children)} distinct: weights shared across depths); "
                "torch.export cannot cut a module shared across cut points: return an "
                "nn.Sequential (a module may fill several of its places) or a "
                "pdv.models.ModelDef whose layers are the places"
            )
        points += [(f"{name}.{c}", "begin") for c in children]
        points.append((f"{name}.{children[-1]}", "end"))
    seen: set[tuple[str, str]] = set()
    return [p for p in points if not (p in seen or seen.add(p))]


def _submodule(module: nn.Module, name: str, spec: str, option: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise PdvError(
            f"{option} {name}: model {spec!r} has no submodule {name!r}; its submodules: "
            f"{_names(module)}"
        ) from None


class _Traces:
    """The module traced and split once per micro-batch size. Every split shares one set of
    parameters, the module's own (so tied weights stay tied in one process)."""

    def __init__(self, root: nn.Module, points: list[tuple[str, str]],
                 make_batch: Callable[..., Any], spec: str) -> None:
        self.root, self.make_batch, self.spec = root, make_batch, spec
        self.cuts: list[tuple[str, str]] = []
        """the cut points in the order the traced forward met them"""
        _annotate(root, points, self.cuts)
        self.expected = len(points) + 1
        self.layer_names: list[str] = []
        self.traced: dict[int, list[fx.GraphModule]] = {}
        self.frozen = False
        self.wiring: list[_Wiring] = []
        self.piece_names: list[str] = []
        if not any(p.is_meta for p in root.parameters()):
            self.trace(2)

    def prepare(self, sizes: Sequence[int]) -> None:
        """Trace every micro-batch size that will run; after this, tracing is an error (the
        layers may be parallelized, and a new trace would not see it)."""
        for rows in sizes:
            self.trace(rows)
        self.frozen = True

    def canonical(self, index: int) -> fx.GraphModule:
        """Piece `index` as first traced: the owner of the parameters."""
        return self._first[index]

    def piece(self, index: int, args: Sequence[Any]) -> fx.GraphModule:
        """The graph of piece `index` traced at the shapes of `args`."""
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        for pieces in self.traced.values():
            if _placeholder_shapes(pieces[index]) == shapes:
                return pieces[index]
        if index == 0 and shapes and shapes[0]:
            return self.trace(shapes[0][0])[0]
        raise AssertionError(f"piece {index}: no trace for input shapes {shapes} "
                             f"(traced micro-batch sizes {sorted(self.traced)})")

    def trace(self, rows: int) -> list[fx.GraphModule]:
        """The split graphs at this micro-batch size, traced now if they are not yet."""
        if rows in self.traced:
            return self.traced[rows]
        if self.frozen:
            raise AssertionError(f"a micro-batch of {rows} rows was not prepared "
                                 f"(traced: {sorted(self.traced)})")
        pieces, wiring, names = self._trace(rows)
        if not self.traced:
            self._tie_to_root(pieces)
            self._first = pieces
            self.wiring, self.piece_names = wiring, names
        else:
            if wiring != self.wiring:
                raise PdvError(f"model {self.spec!r}: its traced dataflow changes with the "
                               f"micro-batch size ({rows} rows); pdv needs one dataflow")
            for mine, first in zip(pieces, self._first, strict=True):
                for name, _ in list(mine.named_children()):
                    setattr(mine, name, getattr(first, name))
        self.traced[rows] = pieces
        return pieces

    def _trace(self, rows: int) -> tuple[list[fx.GraphModule], list[_Wiring], list[str]]:
        from torch.distributed.pipelining._IR import Pipe

        gen = torch.Generator().manual_seed(0)
        x, _ = self.make_batch(rows, gen)
        self.cuts.clear()
        try:
            pipe = Pipe.from_tracing(self.root, as_args(x))
        except Exception as exc:  # torch.export fails in many ways; the cause is what helps
            cause = exc.__cause__ or exc
            text = str(cause).strip()
            first = text.splitlines()[0][:200] if text else ""
            raise PdvError(
                f"model {self.spec!r}: torch.export cannot trace its forward at a micro-batch "
                f"of {rows} ({type(cause).__name__}: {first}); control flow that depends on "
                "the data cannot be split by name: make the forward traceable, or return a "
                "pdv.models.ModelDef whose layers run one after another"
            ) from None
        if pipe.num_stages != self.expected or len(self.cuts) != self.expected - 1:
            raise PdvError(
                f"model {self.spec!r}: the split points give {pipe.num_stages} pieces, not "
                f"{self.expected}: a named submodule is not called by forward, is called more "
                "than once, or two points fall on the same place; name submodules that forward "
                "calls once each"
            )
        # Layers are named by the cut that starts them, in the order forward runs them.
        self.layer_names = ["prologue"] + [
            name if kind == "begin" else f"after_{name}" for name, kind in self.cuts
        ]
        wiring = _wiring(pipe.split_gm, self.spec)
        names = [n.name for n in pipe.split_gm.graph.nodes if n.op == "call_module"]
        pieces = [pipe.get_stage_module(i) for i in range(pipe.num_stages)]
        return pieces, wiring, names

    def _tie_to_root(self, pieces: list[fx.GraphModule]) -> None:
        # The tracer copies a parameter that several pieces use (an embedding tied to the LM
        # head); pointing every piece at the module's own tensors keeps them one parameter.
        for piece in pieces:
            for fqn, _ in list(piece.named_parameters(remove_duplicate=False)):
                owner, leaf = _owner(piece, fqn)
                owner._parameters[leaf] = self.root.get_parameter(fqn)
            for fqn, _ in list(piece.named_buffers(remove_duplicate=False)):
                owner, leaf = _owner(piece, fqn)
                # AttributeError: a constant the tracer lifted, the piece's own
                with contextlib.suppress(AttributeError):
                    owner._buffers[leaf] = self.root.get_buffer(fqn)


def _annotate(root: nn.Module, points: list[tuple[str, str]],
              met: list[tuple[str, str]]) -> None:
    """Mark the cut points in the modules' forwards (pipelining's pipe_split markers); a module
    may be cut both before and after (the last block of --blocks). Each marker, as forward
    meets it, is appended to `met`."""
    from torch.distributed.pipelining import pipe_split

    kinds: dict[str, set[str]] = {}
    for name, kind in points:
        kinds.setdefault(name, set()).add(kind)
    for name, wanted in kinds.items():
        module = root.get_submodule(name)
        inner = module.forward

        def cut(*args: Any, _inner: Any = inner, _wanted: set[str] = wanted,
                _name: str = name, **kwargs: Any) -> Any:
            if "begin" in _wanted:
                met.append((_name, "begin"))
                pipe_split()
            out = _inner(*args, **kwargs)
            if "end" in _wanted:
                met.append((_name, "end"))
                pipe_split()
            return out

        module.forward = cut  # type: ignore[method-assign]


def _placeholder_shapes(graph: fx.GraphModule) -> tuple[tuple[int, ...] | None, ...]:
    shapes = []
    for n in graph.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            shapes.append(tuple(val.shape) if isinstance(val, torch.Tensor) else None)
    return tuple(shapes)


def _owner(module: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, leaf = fqn.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


@dataclass(frozen=True)
class _Wiring:
    """How piece i of the split graph connects to the others (values are split-graph nodes)."""

    received: tuple[str, ...]
    """the values this piece's layer receives, in order"""
    args: tuple[str, ...]
    """the values its graph is called with"""
    unpacked: tuple[tuple[str, int], ...]
    """(value, index) of each element of the graph's tuple result that is used later"""
    handed: tuple[str, ...]
    """the values its layer hands on: made here or before, and read by a later piece"""


def _wiring(split_gm: fx.GraphModule, spec: str) -> list[_Wiring]:
    """Per piece, its wiring; the last piece hands on the model's output."""
    nodes = list(split_gm.graph.nodes)
    pieces = [n for n in nodes if n.op == "call_module"]
    made_by: dict[str, int] = {}
    unpacked: dict[int, list[tuple[str, int]]] = {i: [] for i in range(len(pieces))}
    for n in nodes:
        if n.op == "placeholder":
            made_by[n.name] = -1
        elif n.op == "call_module":
            made_by[n.name] = pieces.index(n)
        elif n.op == "call_function":
            src, index = n.args[0], n.args[1]
            if not isinstance(src, fx.Node) or src.op != "call_module" or not isinstance(index,
                                                                                        int):
                raise PdvError(f"model {spec!r}: its split graph computes between pieces "
                               f"({n.format_node()}); cut it at other submodules")
            made_by[n.name] = made_by[src.name]
            unpacked[made_by[src.name]].append((n.name, index))
    last_read: dict[str, int] = {}
    for n in nodes:
        reader = len(pieces) if n.op == "output" else made_by.get(n.name)
        if n.op in ("call_module", "output"):
            for arg in n.all_input_nodes:
                last_read[arg.name] = max(last_read.get(arg.name, -1), int(reader or 0))
    (output,) = [n for n in nodes if n.op == "output"]
    if len(output.all_input_nodes) != 1:
        raise PdvError(f"model {spec!r}: its forward returns {len(output.all_input_nodes)} "
                       "values; return the one tensor the loss reads")
    carried = [name for name, by in made_by.items() if by == -1]
    out = []
    for i, piece in enumerate(pieces):
        if piece.kwargs or not all(isinstance(a, fx.Node) for a in piece.args):
            raise PdvError(f"model {spec!r}: a traced piece takes constant arguments "
                           f"({piece.format_node()}); cut it at other submodules")
        made = [piece.name] + [name for name, _ in unpacked[i]]
        handed = [v for v in carried + made if last_read.get(v, -1) > i]
        out.append(_Wiring(tuple(carried), tuple(a.name for a in piece.args),
                           tuple(unpacked[i]), tuple(handed)))
        carried = handed
    return out


class _SplitLayer(nn.Module):
    """Piece i of the traced split: receives the carried values, runs its graph (the one
    traced at these shapes), hands on the values later pieces read; the last piece returns
    the model's output."""

    def __init__(self, traces: _Traces, index: int) -> None:
        super().__init__()
        self._traces = [traces]  # in a list: shared by every layer, not a submodule
        self.index = index
        if traces.traced:
            # The piece traced first owns the parameters (FSDP, TP and optimizers find them
            # here); the pieces of other sizes share its submodules.
            self.graph = traces.canonical(index)

    def forward(self, *values: Any) -> Any:
        traces = self._traces[0]
        wiring = traces.wiring[self.index]
        if len(values) != len(wiring.received):
            raise AssertionError(f"piece {self.index} got {len(values)} values, "
                                 f"expects {len(wiring.received)}")
        env = dict(zip(wiring.received, values, strict=True))
        args = [env[a] for a in wiring.args]
        graph = traces.piece(self.index, args)
        result = graph(*args)
        name = traces.piece_names[self.index]
        env[name] = result
        for value, i in wiring.unpacked:
            env[value] = result[i]
        handed = tuple(env[v] for v in wiring.handed)
        if self.index == len(traces.wiring) - 1:
            (out,) = handed
            return out
        return handed
