"""Stages of different widths: split and merge micro-batches between them.

torch.distributed.pipelining connects stage i to stage i+1 one rank to one rank, so it cannot
feed a stage of 1 replica from a stage of 2. pdv runs such plans with this executor.

Design
------
Rows. One pipeline micro-batch has M samples. A stage with dp replicas splits every micro-batch
evenly: replica r owns rows ``[r*M/dp, (r+1)*M/dp)`` (M divisible by every stage's dp, checked
by ParallelDims). Ownership is by rows, never by rank, so it is the same on every rank and
needs no negotiation.

Split and merge. Between stage s and s+1, replica a of s sends to replica b of s+1 exactly the
rows both own (the intersection of their ranges; often empty). A narrower stage therefore
receives several pieces and concatenates them in row order (merge); a wider stage receives a
part of one sender's rows (split). Backward runs the same routes in reverse: a stage cuts the
gradient of its input along the same intersections and returns each piece to its sender.

Shards. All TP shards of a replica need the whole input: destination shard u receives from
source shard ``u mod tp_src``. Input gradients are replicated over a stage's shards (TP's
input all-reduce), so source shard t takes its gradient from destination shard ``t mod tp_dst``.

Loss and gradients. Replica r of the last stage takes the mean loss over its rows; the step's
loss is the mean over micro-batches of the mean over replicas (equal rows), which is the
single-process loss. Its backward is scaled by 1/(num_micro_batches * dp_last), so every
gradient that flows back is the exact derivative of the step loss, and replicas of every stage
*sum* their gradients (one all-reduce per stage after the last micro-batch). Stages of any
width thus train as one process does; the loss equality test checks it.

Order. Each rank runs its stage's forwards and backwards in GPipe order (all forwards, then
all backwards) or 1F1B order (``num_stages - stage - 1`` warm-up forwards, then alternate);
sends are asynchronous and every message carries a (micro-batch, direction) tag, so any order
that respects the data dependencies completes.

Values. A boundary carries a tensor or a tuple of tensors; what each is (dtype, shape, whether
a dim holds the micro-batch and how samples sit in it, whether a gradient flows back) comes
from the shape probe every rank runs on the whole model before building its stage
(:mod:`pdv.boundaries`), so receive buffers are sized exactly and nothing about shapes is
negotiated at run time. A batched value is split and merged by samples as above, in its own
layout (``Value.take`` and ``Value.join``), and a plan that would cut one whose samples the
probe could not find is refused; a value without the micro-batch dim (a table every sample
shares) travels whole on every route, and its gradient returns whole on the route of the
receiver's first rows only (zeros on the others), so the senders' replicas, which sum their
gradients, count each receiver's gradient once.

Replicas are plain copies whose gradients one flat all-reduce sums, or FSDP2 shards whose
reduce-scatter sums (gradient divide factor 1, sync on the last micro-batch only).

Limits: one stage per rank (no interleaving); p2p matched by gloo tags (NCCL would need the same
order on both sides of each pair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pdv.boundaries import Boundary, Value
from pdv.errors import PdvError
from pdv.fsdp_step import before_backward, end_step
from pdv.models import Inputs, as_args
from pdv.run.data import micro_batch_rows
from pdv.run.dims import ParallelDims, StageMeshes
from pdv.run.stage import ReplicaGrads

__all__ = ["Route", "routes_in", "routes_out", "WidthPipeline", "check_separable"]


def _tag(micro_batch: int, backward: bool, value: int) -> int:
    """A message's gloo tag: one per (micro-batch, direction, value of the boundary tuple)."""
    return (2 * micro_batch + int(backward)) * 256 + value


@dataclass(frozen=True)
class Route:
    """One piece of a micro-batch between two ranks: rows [lo, hi) of the micro-batch."""

    peer: int
    lo: int
    hi: int


def _rows(dims: ParallelDims, stage: int, replica: int) -> tuple[int, int]:
    n = dims.replica_rows(stage)
    return replica * n, (replica + 1) * n


def routes_in(dims: ParallelDims, stage: int, replica: int, shard: int) -> list[Route]:
    """Where this rank's input rows come from (stage - 1), in row order."""
    lo, hi = _rows(dims, stage, replica)
    src = dims.stages[stage - 1]
    out = []
    for a in range(src.dp):
        alo, ahi = _rows(dims, stage - 1, a)
        if max(lo, alo) < min(hi, ahi):
            out.append(Route(src.ranks[a * src.tp + shard % src.tp], max(lo, alo), min(hi, ahi)))
    return out


def routes_out(dims: ParallelDims, stage: int, replica: int, shard: int) -> list[Route]:
    """Where this rank's output rows go (stage + 1): every shard that reads from this shard."""
    lo, hi = _rows(dims, stage, replica)
    dst = dims.stages[stage + 1]
    cur = dims.stages[stage]
    out = []
    for b in range(dst.dp):
        blo, bhi = _rows(dims, stage + 1, b)
        if max(lo, blo) < min(hi, bhi):
            for u in range(dst.tp):
                if u % cur.tp == shard:
                    out.append(Route(dst.ranks[b * dst.tp + u], max(lo, blo), min(hi, bhi)))
    return out


def grad_routes_in(dims: ParallelDims, stage: int, replica: int, shard: int) -> list[Route]:
    """Where the gradient of this rank's output comes from (stage + 1), in row order."""
    lo, hi = _rows(dims, stage, replica)
    nxt = dims.stages[stage + 1]
    out = []
    for b in range(nxt.dp):
        blo, bhi = _rows(dims, stage + 1, b)
        if max(lo, blo) < min(hi, bhi):
            out.append(Route(nxt.ranks[b * nxt.tp + shard % nxt.tp], max(lo, blo), min(hi, bhi)))
    return out


def grad_routes_out(dims: ParallelDims, stage: int, replica: int, shard: int) -> list[Route]:
    """Where the gradient of this rank's input goes (stage - 1): shards t with t mod tp == shard."""
    prev, cur = dims.stages[stage - 1], dims.stages[stage]
    out = []
    for r in _unique_rows(routes_in(dims, stage, replica, shard)):
        a = prev.ranks.index(r.peer) // prev.tp
        for t in range(prev.tp):
            if t % cur.tp == shard:
                out.append(Route(prev.ranks[a * prev.tp + t], r.lo, r.hi))
    return out


def _unique_rows(routes: list[Route]) -> list[Route]:
    seen: dict[tuple[int, int], Route] = {}
    for r in routes:
        seen.setdefault((r.lo, r.hi), r)
    return list(seen.values())


def check_separable(dims: ParallelDims, boundaries: list[Boundary]) -> None:
    """A value is cut or joined by samples only where the probe found where they sit (checked
    on every rank alike, so all of them stop)."""
    for s, (a, b) in enumerate(zip(dims.stages, dims.stages[1:], strict=False)):
        if a.dp == b.dp:
            continue
        at = a.layers[1] - 1
        for k, v in enumerate(boundaries[at].values):
            if v.batched and not v.separable:
                raise PdvError(
                    f"stages {s} and {s + 1} have different widths (dp {a.dp} and {b.dp}), so "
                    f"what layer {at} {boundaries[at].name!r} hands on"
                    f"{f' (tensor {k})' if k else ''} is cut by samples, and pdv cannot find "
                    "them in it (run alone, the first samples do not give its first entries: "
                    "the layer mixes samples, or lays them out in a way pdv does not read); "
                    "give both stages the same dp, or cut elsewhere")


class WidthPipeline:
    """This rank's stage under the split/merge executor (see the module docstring)."""

    def __init__(self, dims: ParallelDims, meshes: StageMeshes, modules: dict[int, nn.Module],
                 rank: int, device: torch.device, schedule: str,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 boundaries: list[Boundary]) -> None:
        """`boundaries`: the shape probe's record of what every layer hands on."""
        if dims.multi_stage:
            raise PdvError("stages of different widths cannot also be interleaved; give each "
                           "rank one stage")
        (stage,) = modules
        spec = dims.stages[stage]
        self.dims, self.rank, self.device, self.loss_fn = dims, rank, device, loss_fn
        self.stage, self.module = stage, modules[stage]
        self.replica, self.shard = dims.position(rank, stage)
        self.lo, self.hi = _rows(dims, stage, self.replica)
        self.first, self.last = stage == 0, stage == dims.num_stages - 1
        self.reports_loss = self.last and self.shard == 0
        self.gpipe = schedule.lower() == "gpipe"
        if schedule.lower() not in ("gpipe", "1f1b"):
            raise PdvError(f"stages of different widths run GPipe or 1F1B, not {schedule!r}")
        r, t = self.replica, self.shard
        self.fwd_in = [] if self.first else routes_in(dims, stage, r, t)
        self.fwd_out = [] if self.last else routes_out(dims, stage, r, t)
        self.bwd_in = [] if self.last else grad_routes_in(dims, stage, r, t)
        self.bwd_out = [] if self.first else grad_routes_out(dims, stage, r, t)
        dp_group = meshes.stage_mesh[stage]["dp"].get_group() if spec.dp > 1 else None
        # modules() lists the root first: its sync flags cover every FSDP unit below it.
        self.fsdp = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        self.replica_grads = (
            ReplicaGrads(self.module, dp_group, 1) if dp_group is not None and not self.fsdp
            else None
        )
        for m in self.fsdp:
            m.set_gradient_divide_factor(1.0)  # replicas sum (see "Loss and gradients")
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        start, end = spec.layers
        self.in_values: tuple[Value, ...] = () if self.first else boundaries[start - 1].values
        self.out_values: tuple[Value, ...] = () if self.last else boundaries[end - 1].values
        check_separable(dims, boundaries)

    # ------------------------------------------------------------------ one step

    def _order(self) -> list[tuple[str, int]]:
        nmb = self.dims.num_micro_batches
        warm = nmb if self.gpipe else min(nmb, self.dims.num_stages - self.stage - 1)
        ops = [("F", m) for m in range(warm)]
        for m in range(warm, nmb):
            ops += [("F", m), ("B", m - warm)]
        return ops + [("B", m) for m in range(nmb - warm, nmb)]

    def step(self, x: Inputs, y: torch.Tensor) -> list[float]:
        """Forward and backward of one global batch, then the replicas' gradient sum."""
        nmb, dims = self.dims.num_micro_batches, self.dims
        spec = dims.stages[self.stage]
        xs = ([micro_batch_rows(t, nmb, spec.dp, self.replica).chunk(nmb) for t in as_args(x)]
              if self.first else None)
        ys = micro_batch_rows(y, nmb, spec.dp, self.replica).chunk(nmb) if self.last else None
        saved: dict[int, tuple[tuple[torch.Tensor, ...], Any]] = {}
        pending: list[dist.Work] = []
        losses: list[float] = []
        scale = 1.0 / (nmb * dims.stages[-1].dp)
        if self.replica_grads is not None:
            self.replica_grads.attach()
        for kind, m in self._order():
            if kind == "F":
                inputs = (tuple(c[m].to(self.device) for c in xs) if xs is not None
                          else self._recv_inputs(m))
                out = self.module(*inputs)
                if self.last:
                    assert ys is not None
                    loss = self.loss_fn(out, ys[m].to(self.device))
                    losses.append(float(loss.detach()))
                    out = loss * scale
                else:
                    outs = out if isinstance(out, tuple) else (out,)
                    for k, value in enumerate(outs):
                        pending += self._send(value.detach(), self.out_values[k], self.fwd_out,
                                              _tag(m, False, k), first_only=False)
                saved[m] = (inputs, out)
            else:
                inputs, out = saved.pop(m)
                if self.fsdp:
                    before_backward(self.fsdp[0])
                if self.last:
                    out.backward()
                else:
                    self._backward(out, m)
                received = () if self.first else inputs
                for k, (value, inp) in enumerate(zip(self.in_values, received, strict=True)):
                    if value.requires_grad:
                        grad = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                        pending += self._send(grad, value, self.bwd_out, _tag(m, True, k),
                                              first_only=True)
        for work in pending:
            work.wait()
        if self.fsdp:
            end_step(self.fsdp[0])
        self._sum_replica_grads()
        return losses

    def _backward(self, out: Any, m: int) -> None:
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, self._recv_grad(m, k, v)) for k, (o, v) in
                 enumerate(zip(outs, self.out_values, strict=True)) if v.requires_grad]
        # Receive every gradient (in value order, as sent) before running backward.
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    def _recv_inputs(self, m: int) -> tuple[torch.Tensor, ...]:
        out = []
        for k, value in enumerate(self.in_values):
            bufs = [torch.empty(value.full_shape(r.hi - r.lo), dtype=value.dtype,
                                device=self.device) for r in self.fwd_in]
            works = [dist.irecv(b, r.peer, tag=_tag(m, False, k))
                     for b, r in zip(bufs, self.fwd_in, strict=True)]
            for w in works:
                w.wait()
            inp = value.join(bufs) if value.batched else bufs[0]
            out.append(inp.requires_grad_(value.requires_grad))
        return tuple(out)

    def _recv_grad(self, m: int, k: int, value: Value) -> torch.Tensor:
        bufs = [torch.empty(value.full_shape(r.hi - r.lo), dtype=value.dtype,
                            device=self.device) for r in self.bwd_in]
        works = [dist.irecv(b, r.peer, tag=_tag(m, True, k))
                 for b, r in zip(bufs, self.bwd_in, strict=True)]
        for w in works:
            w.wait()
        if value.batched:
            return value.join(bufs)
        total = bufs[0]
        for b in bufs[1:]:
            total = total + b
        return total

    def _send(self, t: torch.Tensor, value: Value, routes: list[Route], tag: int,
              first_only: bool) -> list[dist.Work]:
        works = []
        first_lo = min((r.lo for r in routes), default=0)
        for r in routes:
            if value.batched:
                piece = value.take(t, r.lo - self.lo, r.hi - self.lo)
            elif first_only and r.lo != first_lo:
                piece = torch.zeros_like(t)
            else:
                piece = t
            works.append(dist.isend(piece.contiguous(), r.peer, tag=tag))
        return works

    def _sum_replica_grads(self) -> None:
        if self.replica_grads is not None:
            self.replica_grads.reduce()
