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

Shapes. At construction a shape pass runs one sample through the pipeline (headers with dtype
and per-sample shape travel along the same routes), so receive buffers are sized exactly.

Replicas are plain copies whose gradients one flat all-reduce sums, or FSDP2 shards whose
reduce-scatter sums (gradient divide factor 1, sync on the last micro-batch only).

Limits: one stage per rank (no interleaving); p2p matched by gloo tags (NCCL would need the same
order on both sides of each pair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pdv.errors import PdvError
from pdv.run.data import micro_batch_rows
from pdv.run.dims import ParallelDims, StageMeshes
from pdv.run.stage import ReplicaGrads

__all__ = ["Route", "routes_in", "routes_out", "WidthPipeline"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]
_HEADER = 8


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


class WidthPipeline:
    """This rank's stage under the split/merge executor (see the module docstring)."""

    def __init__(self, dims: ParallelDims, meshes: StageMeshes, modules: dict[int, nn.Module],
                 rank: int, device: torch.device, schedule: str,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 sample: torch.Tensor) -> None:
        """`sample`: one row of the first stage's input, for the shape pass."""
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
        self.in_meta = (
            (sample.dtype, tuple(sample.shape[1:])) if self.first else self._recv_header()
        )
        self._shape_pass()

    # ------------------------------------------------------------------ shape pass

    def _recv_header(self) -> tuple[torch.dtype, tuple[int, ...]]:
        h = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(h, self.fwd_in[0].peer, tag=999_999)
        for extra in self.fwd_in[1:]:
            dist.recv(torch.empty_like(h), extra.peer, tag=999_999)
        ndim = int(h[1])
        return _DTYPES[int(h[0])], tuple(int(d) for d in h[2 : 2 + ndim])

    def _shape_pass(self) -> None:
        # Zeros are valid input for every layer pdv knows (token id 0, zero activations).
        dtype, shape = self.in_meta
        with torch.no_grad():
            out = self.module(torch.zeros((1, *shape), dtype=dtype, device=self.device))
        self._send_header(out)

    def _send_header(self, out: torch.Tensor) -> None:
        if self.last:
            return
        h = torch.full((_HEADER,), -1, dtype=torch.int64)
        h[0], h[1] = _DTYPES.index(out.dtype), out.dim() - 1
        h[2 : 1 + out.dim()] = torch.tensor(out.shape[1:])
        h = h.to(self.device)
        for route in self.fwd_out:
            dist.send(h, route.peer, tag=999_999)

    # ------------------------------------------------------------------ one step

    def _order(self) -> list[tuple[str, int]]:
        nmb = self.dims.num_micro_batches
        warm = nmb if self.gpipe else min(nmb, self.dims.num_stages - self.stage - 1)
        ops = [("F", m) for m in range(warm)]
        for m in range(warm, nmb):
            ops += [("F", m), ("B", m - warm)]
        return ops + [("B", m) for m in range(nmb - warm, nmb)]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Forward and backward of one global batch, then the replicas' gradient sum."""
        nmb, dims = self.dims.num_micro_batches, self.dims
        spec = dims.stages[self.stage]
        xs = micro_batch_rows(x, nmb, spec.dp, self.replica).chunk(nmb) if self.first else None
        ys = micro_batch_rows(y, nmb, spec.dp, self.replica).chunk(nmb) if self.last else None
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        pending: list[dist.Work] = []
        losses: list[float] = []
        scale = 1.0 / (nmb * dims.stages[-1].dp)
        if self.replica_grads is not None:
            self.replica_grads.attach()
        for kind, m in self._order():
            if kind == "F":
                inp = xs[m].to(self.device) if xs is not None else self._recv_input(m)
                out = self.module(inp)
                if self.last:
                    assert ys is not None
                    loss = self.loss_fn(out, ys[m].to(self.device))
                    losses.append(float(loss.detach()))
                    out = loss * scale
                else:
                    pending += self._send(out.detach(), self.fwd_out, 2 * m)
                saved[m] = (inp if inp.requires_grad else None, out)
            else:
                inp, out = saved.pop(m)
                if self.fsdp:
                    self.fsdp[0].set_requires_gradient_sync(m == nmb - 1)
                    self.fsdp[0].set_is_last_backward(m == nmb - 1)
                if self.last:
                    out.backward()
                else:
                    out.backward(self._recv_grad(m, out))
                if inp is not None:
                    pending += self._send(inp.grad, self.bwd_out, 2 * m + 1)
        for work in pending:
            work.wait()
        self._sum_replica_grads()
        return losses

    def _recv_input(self, m: int) -> torch.Tensor:
        dtype, shape = self.in_meta
        bufs = [torch.empty((r.hi - r.lo, *shape), dtype=dtype, device=self.device)
                for r in self.fwd_in]
        works = [dist.irecv(b, r.peer, tag=2 * m) for b, r in zip(bufs, self.fwd_in, strict=True)]
        for w in works:
            w.wait()
        inp = torch.cat(bufs).to(self.device)
        return inp.requires_grad_(inp.is_floating_point())

    def _recv_grad(self, m: int, out: torch.Tensor) -> torch.Tensor:
        bufs = [torch.empty((r.hi - r.lo, *out.shape[1:]), dtype=out.dtype, device=self.device)
                for r in self.bwd_in]
        works = [dist.irecv(b, r.peer, tag=2 * m + 1)
                 for b, r in zip(bufs, self.bwd_in, strict=True)]
        for w in works:
            w.wait()
        return torch.cat(bufs).to(self.device)

    def _send(self, t: torch.Tensor | None, routes: list[Route], tag: int) -> list[dist.Work]:
        if t is None:
            return []
        return [dist.isend(t[r.lo - self.lo : r.hi - self.lo].contiguous(), r.peer, tag=tag)
                for r in routes]

    def _sum_replica_grads(self) -> None:
        if self.replica_grads is not None:
            self.replica_grads.reduce()
