"""What a rank pays in a pipeline besides its layers and the wire: measured on the real backend.

Two probes, run by every rank of ``pdv profile cluster`` after the link sweeps:

- **Bookkeeping.** torch.distributed.pipelining on a one-rank stage (a process group of the rank
  alone) whose layer is one parameter times a tiny tensor, so what is timed is the schedule's own
  work: receive-buffer and autograd handling in ``forward_one_chunk`` / ``backward_one_chunk``,
  the loss call, splitting the batch, resetting state, ``zero_grad``. Steps of 1 and of
  ``_MICRO`` micro-batches are timed; the difference per micro-batch is the per-micro-batch
  cost (split forward/backward by the share each method took), the rest the per-step cost. The
  ranks of a host take turns (as the alone matmul probe does), so the numbers are a rank's own;
  sharing cores is the simulator's business.
- **Message CPU** (CPU ranks). In gloo on CPU a message is moved by the ranks' own cores: the
  sender writes it, the receiver's backend thread reads it, with the system calls and thread
  wake-ups around them. Ranks pair up (the tournament's first round, disjoint pairs at once);
  each side sends messages of the sweep's sizes and the other receives them, and the process
  CPU time each side spent per message is fitted by least squares to a + b·S. The probe runs in
  ``_ROUNDS`` rounds spread over a few seconds and keeps each size's median: most of a message's
  CPU is gloo's loop thread in the kernel, and on a shared (virtual) machine that cost comes in
  bursts lasting seconds, 3-4 times the usual (a single round read 40 µs or 3.5 ms for the same
  1-byte message). Every round is kept in the record, with the spread. A CUDA rank's compute is
  its GPU, which host CPU does not slow, so no message CPU is recorded there.

The cost model adds the bookkeeping to every forward, backward and step, and the message CPU to
the compute of the ops that send and receive it (pdv.cost.terms, pdv.cost.stage).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pdv.profile.network import Progress, tournament_rounds

__all__ = ["MESSAGE_SIZES", "measure_overheads", "overheads_block"]

MESSAGE_SIZES = (1, 16 * 1024, 256 * 1024, 1024 * 1024)
"""message sizes of the message-CPU probe, bytes"""
_MICRO = 8
_STEPS = 12
_WARMUP = 3
_MESSAGES = 24
_ROUNDS = 6
_ROUND_GAP_S = 0.5


class _Scale(nn.Module):
    """A layer that costs next to nothing: one parameter times its input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return call


def _bookkeeping(device: torch.device) -> dict[str, float]:
    """Per micro-batch forward/backward and per step costs of a one-rank pipeline stage."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import Schedule1F1B

    group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    rows, width = 2, 8
    example = torch.zeros(rows, width, device=device)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[int, list[float]] = {}
    fwd: list[float] = []
    bwd: list[float] = []
    for micro in (1, _MICRO):
        module = _Scale().to(device)
        stage = PipelineStage(module, 0, 1, device, group=group, input_args=(example,),
                              output_args=(example,))
        # Instance attributes: the schedule calls the stage's methods through them.
        stage.forward_one_chunk = _timed(stage.forward_one_chunk, fwd)  # type: ignore[method-assign]
        stage.backward_one_chunk = _timed(stage.backward_one_chunk, bwd)  # type: ignore[method-assign]
        schedule = Schedule1F1B(stage, n_microbatches=micro, loss_fn=loss_fn)
        x = torch.randn(rows * micro, width, device=device)
        y = torch.randn(rows * micro, width, device=device)
        samples = []
        for s in range(_WARMUP + _STEPS):
            if s == _WARMUP and micro == _MICRO:
                fwd.clear()
                bwd.clear()
            sync()
            t0 = time.perf_counter()
            module.zero_grad()
            schedule.step(x, target=y, losses=[])
            sync()
            if s >= _WARMUP:
                samples.append(time.perf_counter() - t0)
        times[micro] = samples
    one, many = statistics.median(times[1]), statistics.median(times[_MICRO])
    per_micro = max(0.0, (many - one) / (_MICRO - 1))
    f, b = statistics.median(fwd), statistics.median(bwd)
    share = f / (f + b) if f + b > 0 else 0.5
    dist.destroy_process_group(group)
    return {"fwd_s": per_micro * share, "bwd_s": per_micro * (1 - share),
            "step_s": max(0.0, one - per_micro)}


def _line(sizes: list[int], cpu: list[float]) -> dict[str, float]:
    """Least squares cpu = a + b·S, both kept ≥ 0 (a flat or falling line: its mean, b = 0)."""
    n = len(sizes)
    ms, mc = sum(sizes) / n, sum(cpu) / n
    sxx = sum((s - ms) ** 2 for s in sizes)
    slope = sum((s - ms) * (c - mc) for s, c in zip(sizes, cpu, strict=True)) / sxx if sxx else 0
    if slope <= 0:
        return {"a_s": max(mc, 0.0), "b_s_per_byte": 0.0}
    return {"a_s": max(mc - slope * ms, 0.0), "b_s_per_byte": slope}


def _message_cpu(rank: int, world: int) -> dict[str, Any] | None:
    """This rank's process CPU per message sent and received, per size (median of rounds)."""
    rounds = tournament_rounds(world)
    pairs = rounds[0] if rounds else []
    peer = next((b if a == rank else a for a, b in pairs if rank in (a, b)), None)
    # per round, per size: CPU seconds per message in each direction
    sent: list[list[float]] = [[] for _ in MESSAGE_SIZES]
    received: list[list[float]] = [[] for _ in MESSAGE_SIZES]
    for k in range(_ROUNDS):
        if k:
            time.sleep(_ROUND_GAP_S)  # rounds apart in time, past one burst of kernel cost
        for i, size in enumerate(MESSAGE_SIZES):
            buf = torch.zeros(size, dtype=torch.uint8)
            for sender in (0, 1):
                if peer is None:
                    continue
                sending = (rank < peer) == (sender == 0)
                for n in range(2 + _MESSAGES):
                    if n == 2:  # after two warm-up messages
                        c0 = time.process_time()
                    if sending:
                        dist.send(buf, peer)
                    else:
                        dist.recv(buf, peer)
                per = (time.process_time() - c0) / _MESSAGES
                (sent if sending else received)[i].append(per)
    dist.barrier()  # a rank with a bye waits here for the pairs
    if peer is None:
        return None
    sizes = list(MESSAGE_SIZES)
    send = [statistics.median(r) for r in sent]
    recv = [statistics.median(r) for r in received]
    return {"peer": peer, "sizes": sizes, "send_cpu_s": send, "recv_cpu_s": recv,
            "send_cpu_rounds_s": sent, "recv_cpu_rounds_s": received,
            "spread": _spread(sent + received),
            "send_cpu": _line(sizes, send), "recv_cpu": _line(sizes, recv)}


def _spread(per_size_rounds: list[list[float]]) -> float:
    """The largest interquartile range over median of any size and direction's rounds."""
    worst = 0.0
    for r in per_size_rounds:
        if len(r) >= 2 and statistics.median(r) > 0:
            q = statistics.quantiles(r, n=4, method="inclusive")
            worst = max(worst, (q[2] - q[0]) / statistics.median(r))
    return worst


def measure_overheads(device: torch.device, wire: torch.device,
                      report: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Every rank: its bookkeeping (taking turns with its host's ranks) and message CPU.

    `device` is what the rank computes on (the stage's), `wire` where the backend's messages
    live (NCCL: the GPU; gloo: host memory).
    """
    report = report or (lambda event: None)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine_local = int(os.environ.get("LOCAL_RANK", "0"))
    turns = torch.tensor([int(os.environ.get("LOCAL_WORLD_SIZE", "1"))], device=wire)
    dist.all_reduce(turns, op=dist.ReduceOp.MAX)
    report({"phase": "overheads"})
    book: dict[str, float] = {}
    for turn in range(int(turns.item())):
        dist.barrier()
        if turn == mine_local:
            book = _bookkeeping(device)
    dist.barrier()
    report({"phase": "message-cpu"})
    # Every rank takes part in the pairs or none does (the sweep pairs ranks up): only when all
    # ranks compute on CPU and move messages in host memory.
    cpu = torch.tensor([int(device.type == "cpu" == wire.type)], device=wire)
    dist.all_reduce(cpu, op=dist.ReduceOp.MIN)
    messages = _message_cpu(rank, world) if int(cpu.item()) else None
    out: dict[str, Any] = dict(book)
    if messages is not None:
        out["send_cpu"] = messages["send_cpu"]
        out["recv_cpu"] = messages["recv_cpu"]
    return {"rank": rank, "overheads": out, "messages": messages}


def overheads_block(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The cluster measurement's record of both probes (method and every rank's raw numbers)."""
    return {
        "method": "bookkeeping: torch.distributed.pipelining Schedule1F1B on a one-rank stage "
        f"whose layer is one parameter, steps of 1 and {_MICRO} micro-batches ({_WARMUP} "
        f"warm-up + {_STEPS} timed, medians), ranks of a host in turns; per micro-batch = "
        f"the difference / {_MICRO - 1}, split forward/backward by the time each method took; "
        "per step = the rest (zero_grad included). Message CPU (CPU ranks): the tournament's "
        f"first round pairs send each other {_MESSAGES} messages per size after 2 warm-ups, "
        f"in {_ROUNDS} rounds {_ROUND_GAP_S} s apart; process CPU time per message on each "
        "side, the median of the rounds per size, least squares a + b*S; spread = the largest "
        "IQR/median of a size's rounds",
        "sizes_bytes": list(MESSAGE_SIZES),
        "ranks": [{"rank": r["rank"], **({"messages": r["messages"]} if r["messages"] else {})}
                  for r in per_rank],
    }
