"""Equal-width plans: one torch.distributed.pipelining pipeline per chain.

Every stage has the same (dp, tp), so replica r, shard t of each stage form chain (r, t): a
pipeline with its own process group, run by the plan's schedule (GPipe, 1F1B, or an interleaved
schedule when ranks hold several stages). Gradient sync across replicas is FSDP2's, driven by
the schedule (requires_gradient_sync on the last micro-batch only), or for plain replicas one
flat all-reduce after the schedule (averaged: each replica's loss is a mean over its rows).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pdv.boundaries import Boundary, Value
from pdv.errors import PdvError
from pdv.models import Inputs, as_args
from pdv.run.data import micro_batch_rows
from pdv.run.dims import ParallelDims, StageMeshes
from pdv.run.stage import ReplicaGrads

__all__ = ["ChainPipeline", "OP_TRACE_ENV", "OpRecorder", "loss_divided"]

OP_TRACE_ENV = "PDV_OP_TRACE"
"""Diagnostics: a directory; each rank of an equal-width run writes ``ops-rank{R}.json``, the
compute ops torch executed in the last step, in order, with their start and end times
(``time.monotonic``, one clock for all ranks of a host) and the process CPU time each took, and
the step's marks (loop top, step start, schedule end, replica sync end, optimizer end) in both
clocks: where a step's time went besides its ops, and whether a rank waited for a core; and
every step's marks on the ops' clock (``step_marks``, warm-up steps included), so a phase's
spread over steps and across ranks can be read. The schedule check compares them with the
simulator's op order and bubble (tests/test_schedule_order.py, benchmarks/schedule_check.py).
"""


class OpRecorder:
    """Wraps a PipelineStage's compute calls to log (kind, stage, micro, start, end) per op."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out / f"ops-rank{rank}.json"
        self.rank = rank
        self.ops: list[tuple[str, int, int, float, float]] = []
        # Where the step's time outside the ops went: the loop's top, step() called, the
        # schedule returned, the replicas' gradient sync ended, the optimizer stepped.
        self.marks: dict[str, float] = {}
        self.cpu_marks: dict[str, float] = {}  # the process's CPU seconds (all its threads)
        self.op_cpu: list[float] = []  # per op: the process's CPU seconds while it ran
        self.step_marks: list[dict[str, float]] = []  # every finished step's marks, in order

    def watch(self, stage: Any) -> None:
        """Record this stage's forward, backward (full or input-grad) and weight-grad calls."""
        fwd, bwd, wgt = (stage.forward_one_chunk, stage.backward_one_chunk,
                         stage.backward_weight_one_chunk)
        index = stage.stage_index

        def timed(kind: str, fn: Callable[..., Any], micro: int, *a: Any, **kw: Any) -> Any:
            t0, c0 = time.monotonic(), time.process_time()
            out = fn(micro, *a, **kw)
            self.ops.append((kind, index, int(micro), t0, time.monotonic()))
            self.op_cpu.append(time.process_time() - c0)
            return out

        stage.forward_one_chunk = lambda micro, *a, **kw: timed("F", fwd, micro, *a, **kw)
        stage.backward_one_chunk = lambda micro, *a, **kw: timed(
            "B" if kw.get("full_backward", True) else "I", bwd, micro, *a, **kw)
        stage.backward_weight_one_chunk = lambda micro, *a, **kw: timed(
            "W", wgt, micro, *a, **kw)

    def begin_step(self) -> None:
        """The training loop's top: the previous step's ops go, its marks join the history."""
        if self.marks:
            self.step_marks.append(self.marks)
        self.ops, self.op_cpu = [], []
        self.marks, self.cpu_marks = {}, {}
        self.mark("loop_top")

    def mark(self, name: str) -> None:
        """Note when the step reached `name` (its time, on the ops' clock)."""
        self.marks[name] = time.monotonic()
        self.cpu_marks[name] = time.process_time()

    def write(self) -> None:
        """The step's ops as JSON (the training loop rewrites it every step: the last stays)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "ops": self.ops, "op_cpu_s": self.op_cpu,
                                   "marks": self.marks, "cpu_marks": self.cpu_marks,
                                   "step_marks": [*self.step_marks, self.marks]}))
        tmp.replace(self.path)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_divided(schedule_cls: type, loss_fn: LossFn,
                 num_micro: int) -> tuple[LossFn, dict[str, Any], int]:
    """(loss function, schedule keywords, loss scale) for a schedule that divides each
    micro-batch's loss by the micro-batch count rather than every gradient after the step.

    torch's schedules divide every gradient after the step's last backward (scale_grads): one
    more pass over each stage's gradients, per parameter, that no layer's profile times (mlp's
    33 MiB: 1.2-1.5 ms a step here, traced). Dividing the loss gives the same gradients, as the
    single-process reference accumulates them (pdv.run.reference), at no cost; multiply the
    reported losses by the scale. A torch without the flag keeps its own behaviour (scale 1).
    The run and the cluster's bookkeeping probe both build their schedules with it.
    """
    if "scale_grads" not in inspect.signature(schedule_cls).parameters:
        return loss_fn, {}, 1

    def divided(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, target) / num_micro

    return divided, {"scale_grads": False}, num_micro


def _examples(values: tuple[Value, ...], rows: int,
              device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(v.full_shape(rows), dtype=v.dtype, device=device)
                 .requires_grad_(v.requires_grad) for v in values)


class ChainPipeline:
    """This rank's PipelineStage(s) and the schedule that drives them."""

    def __init__(self, dims: ParallelDims, meshes: StageMeshes, modules: dict[int, nn.Module],
                 rank: int, device: torch.device, schedule: str,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 boundaries: list[Boundary], first_inputs: tuple[Value, ...]) -> None:
        """`boundaries`: the shape probe's record of what each layer hands on; `first_inputs`:
        the model's inputs (pdv.boundaries.input_values). Stages get their shapes from them
        (torch's static mode), so no shape inference runs on the wire."""
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        self.dims = dims
        self.rank = rank
        self.device = device
        self.stage_ids = sorted(modules)
        group_ranks = sorted(set(meshes.pp_ranks))
        # new_group numbers its members in sorted order; stages find their peers through this map
        # (the default assumes stage i sits on group rank i % size, which a plan need not do).
        to_group = {i: group_ranks.index(g) for i, g in enumerate(meshes.pp_ranks)}
        if dims.multi_stage:
            loop = {i: i % len(group_ranks) for i in range(dims.num_stages)}
            if to_group != loop:
                raise PdvError(
                    f"interleaved schedules place stage i on the chain's (i mod pp)-th rank in "
                    f"increasing rank order; chain {meshes.pp_ranks} does not; reorder the "
                    "stages' ranks"
                )
        self.stages = []
        rows = dims.replica_rows(0)
        for i in self.stage_ids:
            start, end = dims.stages[i].layers
            ins = first_inputs if i == 0 else boundaries[start - 1].values
            st = PipelineStage(modules[i], i, dims.num_stages, device, group=meshes.pp_group,
                               input_args=_examples(ins, rows, device),
                               output_args=_examples(boundaries[end - 1].values, rows, device))
            st.stage_index_to_group_rank = dict(to_group)
            self.stages.append(st)
        try:
            cls = get_schedule_class(schedule)
        except ValueError as exc:
            raise PdvError(f"plan schedule: {exc}") from None
        nmb = dims.num_micro_batches
        loss_fn, kwargs, self.loss_scale = loss_divided(cls, loss_fn, nmb)
        if dims.multi_stage:
            self.schedule = cls(self.stages, n_microbatches=nmb, loss_fn=loss_fn, **kwargs)
        else:
            self.schedule = cls(self.stages[0], n_microbatches=nmb, loss_fn=loss_fn, **kwargs)
        # torch's last stage keeps every micro-batch's output (the loss's input: a GPT's logits)
        # until the next step, to merge them for the caller; pdv reads only the losses, and the
        # cost model counts no such outputs. torch before pytorch#165822 (late 2025) keeps them.
        self.step_kwargs = ({"return_outputs": False}
                            if "return_outputs" in inspect.signature(self.schedule.step).parameters
                            else {})
        trace = os.environ.get(OP_TRACE_ENV)
        self.recorder = OpRecorder(Path(trace), rank) if trace else None
        for st in self.stages:
            if self.recorder:
                self.recorder.watch(st)
        self.first = 0 in self.stage_ids
        self.last = dims.num_stages - 1 in self.stage_ids
        self.replica_sync = [
            ReplicaGrads(modules[i], meshes.stage_mesh[i]["dp"].get_group(), dims.stages[i].dp)
            for i in self.stage_ids
            if dims.stages[i].dp > 1 and not isinstance(modules[i], FSDPModule)
        ]
        self.reports_loss = self.last and dims.position(rank, dims.num_stages - 1)[1] == 0
        """True on the ranks whose losses count: shard 0 of each last-stage replica."""

    def step(self, x: Inputs, y: torch.Tensor) -> list[float]:
        """Forward and backward of one global batch; the last stage returns micro-batch losses."""
        losses: list[torch.Tensor] = []
        nmb = self.dims.num_micro_batches
        if self.recorder:
            self.recorder.mark("step_start")
        for grads in self.replica_sync:
            grads.attach()
        args = ()
        if self.first:
            replica, _ = self.dims.position(self.rank, 0)
            args = tuple(micro_batch_rows(t, nmb, self.dims.stages[0].dp, replica).to(self.device)
                         for t in as_args(x))
        if self.last:
            end = self.dims.num_stages - 1
            replica, _ = self.dims.position(self.rank, end)
            target = micro_batch_rows(y, nmb, self.dims.stages[end].dp, replica).to(self.device)
            self.schedule.step(*args, target=target, losses=losses, **self.step_kwargs)
        else:
            self.schedule.step(*args, **self.step_kwargs)
        if self.recorder:
            self.recorder.mark("schedule_end")
        for grads in self.replica_sync:
            grads.reduce()
        if self.recorder:
            self.recorder.mark("sync_end")
        return [float(v.detach()) * self.loss_scale for v in losses]
