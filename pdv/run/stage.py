"""Build one rank's stage module: keep the stage's layers, then TP, recompute, and replicas.

Order follows torchtitan's parallelize: tensor parallel first (parallelize_module with the model's
own TP plan on the stage's "tp" axis), then activation checkpointing, then data parallel over the
"dp" axis: FSDP2 ``fully_shard`` per layer and on the stage when the plan says fsdp, else plain
replicas whose grads one all-reduce per step sums (:class:`ReplicaGrads`; DDP under pipelining
hits a torch internal assert with several micro-batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pdv.artifacts import PlanStage
from pdv.errors import PdvError
from pdv.model_def import KeptBuffer, grad_copies, has_sparse_grads, kept_buffers, put_back
from pdv.models import ModelDef
from pdv.run.dims import ParallelDims

__all__ = ["ReplicaGrads", "build_stage_module", "check_tp_support", "replica_norm_notes"]


def check_tp_support(model: ModelDef, stages: list[PlanStage], spec: str) -> None:
    """A PdvError when the plan asks for a TP degree the model does not offer."""
    for i, s in enumerate(stages):
        if s.tp == 1:
            continue
        if model.tp_plan is None:
            raise PdvError(
                f"stage {i} asks for tp={s.tp} but model {spec} has no TP plan; use tp=1"
            )
        if s.tp not in model.tp_degrees:
            raise PdvError(
                f"stage {i} asks for tp={s.tp} but model {spec} supports TP degrees "
                f"{list(model.tp_degrees)}"
            )


def check_sparse_grads(model: ModelDef, stages: list[PlanStage], optimizer: str) -> None:
    """A PdvError when a layer's gradients are sparse (nn.Embedding or nn.EmbeddingBag with
    sparse=True) and the optimizer or the stage's FSDP takes dense ones only."""
    for i, s in enumerate(stages):
        lo, hi = s.layers
        for index in range(lo, hi):
            name, layer = model.layers[index]
            if not has_sparse_grads(layer):
                continue
            where = f"layer {index} {name!r} has an embedding with sparse=True"
            if optimizer == "adamw":
                raise PdvError(f"{where}: its gradients are sparse, which AdamW does not take "
                               "(torch refuses them in one process too); use --optimizer sgd, "
                               "or sparse=False")
            if any(c.fsdp for c in s.layer_choices()):
                raise PdvError(f"{where}, and stage {i} shards with FSDP, which reduces dense "
                               "gradients only; give that stage plain replicas (fsdp false), "
                               "or sparse=False")


def build_stage_module(model: ModelDef, stage: PlanStage, mesh: Any,
                       device: torch.device, tied: set[nn.Parameter] | None = None,
                       writers: frozenset[int] = frozenset()) -> nn.Module:
    """The stage's layers as one module, parallelized for this rank (TP, recompute, FSDP2).

    Plain replicas come back unwrapped; the executor sums their grads with ReplicaGrads.
    `tied` parameters stay out of FSDP's shards (pdv.run.tied sums their gradients).
    `writers`: layers that write into their input in place (pdv.boundaries.in_place_writers):
    the stage copies its input for the first (Chain.copy_inputs), a recompute for any.
    """
    start, end = stage.layers
    choices = stage.layer_choices()
    module = model.sequential(start, end)
    module.copy_inputs = start in writers
    module.to(device)
    # One module object may fill several places (ALBERT shares one encoder layer across
    # depths); TP and FSDP take it once. Read before recompute wraps each place on its own.
    layers = list(module)
    places: dict[int, list[int]] = {}
    for k, layer in enumerate(layers):
        places.setdefault(id(layer), []).append(k)
    if stage.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        assert model.tp_plan is not None
        tp_mesh = mesh["tp"]
        for k, *_ in places.values():
            layer = layers[k]
            plan = model.tp_plan(start + k, layer)
            # tp 1 in layer_sharding: the layer stays replicated inside the TP group.
            if plan and choices[k].tp > 1:
                parallelize_module(layer, tp_mesh, plan)
    if any(c.recompute for c in choices):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for k, c in enumerate(choices):
            if c.recompute:
                fn = _recompute_copying if start + k in writers else _recompute
                module[k] = checkpoint_wrapper(module[k], checkpoint_fn=fn)
    if stage.dp == 1:
        return module
    if any(c.fsdp for c in choices):
        from torch.distributed.fsdp import fully_shard

        # Layers marked fsdp are their own units; the rest fall into the stage's root unit,
        # so a stage with any FSDP layer shards all of its parameters.
        dp_mesh = mesh["dp"]
        ignored = set(tied or ())
        for ks in places.values():
            if any(choices[k].fsdp for k in ks):
                # A module at several places is its own unit, so that every place's wrapper
                # (and the root's walk through them) meets it already sharded.
                unit = layers[ks[0]] if len(ks) > 1 else module[ks[0]]
                fully_shard(unit, mesh=dp_mesh, ignored_params=ignored)
        fully_shard(module, mesh=dp_mesh, ignored_params=ignored)
        return module
    return module


def replica_norm_notes(model: ModelDef, dims: ParallelDims) -> list[str]:
    """One note per stage whose replicas hold BatchNorm: each normalizes over its own rows."""
    from torch.nn.modules.batchnorm import _BatchNorm

    notes = []
    for s, stage in enumerate(dims.stages):
        if stage.dp == 1:
            continue
        names = [name for name, layer in model.layers[slice(*stage.layers)]
                 if any(isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                        for m in layer.modules())]
        if names:
            notes.append(
                f"stage {s}: BatchNorm in layers {', '.join(names)} normalizes over each of its "
                f"{stage.dp} replicas' {dims.replica_rows(s)} rows of a micro-batch, not over the "
                "micro-batch's rows (as DDP without SyncBatchNorm): losses differ from one "
                "process's by that")
    return notes


def _recompute(module: nn.Module, *args: Any) -> Any:
    """A layer recomputed in backward, its buffers as its forward found them (see
    _BufferReplay)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=_BufferReplay(module).contexts)


def _recompute_copying(module: nn.Module, *args: Any) -> Any:
    """_recompute for a layer that writes into its input in place: the checkpoint keeps the
    input it was given and the layer writes into a copy, so the recompute reads what the
    forward read."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(lambda *xs: module(*grad_copies(xs)), *args, use_reentrant=False,
                      context_fn=_BufferReplay(module).contexts)


class _BufferReplay:
    """A forward in training mode may update buffers (BatchNorm's running statistics, spectral
    norm's power iteration), and torch's checkpoint runs that forward twice: the recompute
    would see buffers later micro-batches had moved on and update them again. So the forward
    keeps the values it found of the buffers it changed; the recompute runs on those and puts
    the current ones back after, as if it had not run. One instance per checkpointed call."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.found: list[KeptBuffer] = []

    def contexts(self) -> tuple[Any, Any]:
        """(around the forward, around the recompute), as checkpoint's context_fn gives them."""
        return self._forward(), self._recompute()

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        kept = kept_buffers([self.module])
        yield
        # By value: batch_norm's kernel updates the running statistics without bumping their
        # version counter.
        self.found = [(m, name, b, value) for m, name, b, value in kept
                      if m._buffers[name] is not b or not torch.equal(b, value)]

    @contextlib.contextmanager
    def _recompute(self) -> Iterator[None]:
        now = [(m, name, b, b.detach().clone()) for m, name, _, _ in self.found
               if (b := m._buffers[name]) is not None]
        put_back(self.found)
        try:
            yield
        finally:
            put_back(now)


class ReplicaGrads:
    """A stage's gradients kept as views of one flat buffer, summed over replicas in place.

    Flattening the grads before the all-reduce and copying them back after it held a second
    copy of every gradient at the step's peak and cost two passes over it (on CPU ranks that
    share cores, about as long as the all-reduce). With the grads as views, autograd accumulates
    straight into the buffer the all-reduce sends (DDP's gradient_as_bucket_view idea). DTensor
    grads (TP shards) cannot be views of a plain buffer and take the flatten path.
    """

    def __init__(self, module: nn.Module, group: Any, divide_by: int) -> None:
        from torch.distributed.tensor import DTensor

        from pdv.run.tied import TIED_ATTR

        self.group, self.divide_by = group, divide_by
        # Tied parameters are summed over every rank holding a copy (pdv.run.tied), not here.
        params = [p for p in module.parameters()
                  if p.requires_grad and not getattr(p, TIED_ATTR, False)]
        self.plain = [p for p in params if not isinstance(p, DTensor)]
        self.sharded = [p for p in params if isinstance(p, DTensor)]
        total = sum(p.numel() for p in self.plain)
        dtype = self.plain[0].dtype if self.plain else torch.float32
        device = self.plain[0].device if self.plain else torch.device("cpu")
        self.flat = torch.zeros(total, dtype=dtype, device=device)
        self.views = []
        at = 0
        for p in self.plain:
            self.views.append(self.flat[at : at + p.numel()].view_as(p))
            at += p.numel()

    def attach(self) -> None:
        """Zero the buffer and make it the grads, before a step's first backward."""
        self.flat.zero_()
        for p, view in zip(self.plain, self.views, strict=True):
            p.grad = view

    def reduce(self) -> None:
        """Sum the grads over the replicas (then divide), after the step's last backward."""
        import torch.distributed as dist

        for p, view in zip(self.plain, self.views, strict=True):
            if p.grad is None:
                p.grad = view  # a parameter this step did not touch: its zeros take part
            elif p.grad.data_ptr() != view.data_ptr():
                raise AssertionError("a gradient left its buffer view; attach() before backward")
        if self.plain:
            dist.all_reduce(self.flat, group=self.group)
            if self.divide_by != 1:
                self.flat.div_(self.divide_by)
        if self.sharded:
            _reduce_flattened(self.sharded, self.group, self.divide_by)


def _reduce_flattened(params: list[nn.Parameter], group: Any, divide_by: int) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        grads.append(g.to_local() if isinstance(g, DTensor) else g)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat.div_(divide_by)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)
