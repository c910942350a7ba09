"""What a rank pays in a pipeline besides its layers and the wire: measured on the real backend.

Four probes, run by every rank of ``pdv profile cluster`` after the link sweeps:

- **Bookkeeping.** torch.distributed.pipelining on a one-rank stage (a process group of the rank
  alone) whose layer is one parameter times a tiny tensor, so what is timed is the schedule's own
  work: receive-buffer and autograd handling in ``forward_one_chunk`` / ``backward_one_chunk``,
  the loss call, splitting the batch, resetting state, ``zero_grad``. Steps of 1 and of
  ``_MICRO`` micro-batches are timed; the difference per micro-batch is the per-micro-batch
  cost (split forward/backward by the share each method took), the rest the per-step cost. The
  ranks of a host take turns (as the alone matmul probe does), so the numbers are a rank's own;
  sharing cores is the simulator's business. In the same turn, the **gradient passes**: a
  stage with plain replicas zeroes its flat gradient buffer before the first backward and
  divides it by the replica count after the all-reduce (pdv.run.stage.ReplicaGrads), two
  passes over every gradient byte a step that no layer profile times (2.7 ms from a traced
  mlp dp2 step's start to its first op, 33 MiB). Each is timed over ``_PASS_BYTES`` from a
  cold cache, as a step meets it; the cost model prices them per all-reduced byte.
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
- **A sync and a message after compute** (CPU ranks). A step's gradient all-reduce follows its
  last backward, and a pipeline message follows the op that made it: the ranks come to them
  from milliseconds of compute, not from the collective or message before, as in the sweeps,
  whose α is the least time a small size took. On this project's 2-core machine a 4 KiB
  all-reduce in a step-like loop (both ranks of a pair compute a 5 ms matmul burst, then
  all-reduce twice) took about 0.3 ms in half the rounds and 2-6 ms in the others, first and
  second alike: a loop thread waiting out a scheduler slice (pdv.profile.loops), and a partner
  that finished its equal burst later. The sweep priced it at 0.45 ms. A 32 KiB exchange after
  a 2 ms op landed 0.12-0.29 ms after both ends had posted in most rounds and 1.3-2.3 ms in a
  few, where the p2p sweep prices 61 µs. The tournament's first round pairs up (disjoint pairs
  at once, so the host's cores are as busy as in a step); each pair, in its own process group,
  computes a burst of about ``_BURST_S`` and all-reduces ``_SYNC_BYTES`` twice, then computes
  about ``_OP_S`` and exchanges ``_EXCHANGE_BYTES`` (both post a receive and a send, as 1F1B's
  steady state does; the sender's clock rides in the message, so only a pair on one host
  times it), in passes spread over the cluster probe (:class:`AfterCompute`: at its compute
  windows after the link sweep and the collectives, and once here). The
  cluster takes a rank's sync excess as the mean of the pair's later first all-reduce over
  each pass's rounds (a step ends with its last rank), the median over the passes (one pass
  in a slow spell does not set it), less what the sweep prices for it on the pair
  (:func:`sync_excess`), and a message's to the rank as its mean landing less the link's
  α + S/β (:func:`exchange_excess`). The mean, because the times are bimodal and a median
  flips between the modes from one profile to the next. The second all-reduce is kept in the
  record. The sync is timed after a burst ten times as long too: the excess grows with the
  compute before it, and a stage's is priced on the line between the two by its compute per
  step. Where a host holds several pairs (more ranks than one pair), its pairs also take the
  exchange rounds in turns with the host's other ranks idle: on oversubscribed cores the slow
  landings are waits for a core, and the simulator prices a transfer between the two
  readings by the host's load when it starts (Links.exchange_latency_alone_s).
- **FSDP's own work** (with the collective sweep). FSDP2 does work per unit besides its
  collectives: the hooks around each forward and backward, copying parameters into the
  all-gather's buffer and out of it, resharding, the gradients' copy into the reduce-scatter.
  On small layers it is many times the collective itself (about 1 ms per unit and gathering op
  on this project's 2-core machine, where the 2-rank all-gather's α is 0.1-0.2 ms). It is the
  rank's own work, so the ranks pair up over their fastest measured links (:func:`fsdp_pairs`;
  a pair over a 50 Mbit/s link took minutes), and each pair runs a stack of ``_FSDP_UNITS``
  bias-free Linear layers, each its own ``fully_shard`` unit on the pair, stepped as torch's
  pipelining steps FSDP (pdv.fsdp_step), with M of ``_FSDP_MICRO`` micro-batches, and the same
  stack unsharded; the FSDP step's excess per unit is (M + 1) gathering ops and one
  reduce-scatter, so two M give each op's time per unit size. Units are 1 KiB and what the
  pair's link moves in ``_FSDP_WIRE_S`` (16 KiB to 1 MiB). Pairs whose hosts overlap take
  turns, so the numbers are a pair's own (sharing cores is the simulator's business). The
  cluster subtracts what the sweep's α/β already price for the pair (:func:`fsdp_own_work`).

The cost model adds the bookkeeping to every forward, backward and step, the message CPU to
the compute of the ops that send and receive it, the sync's excess to each step's gradient sync
of a stage with replicas, the message's excess to each pipeline exchange, once per boundary
and pair of ranks (Links.exchange_latency_s, pdv.cost.comm.exchange_time), and FSDP's own
work to each FSDP layer's backward and step (pdv.cost.terms, pdv.cost.stage).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pdv.artifacts import Links
from pdv.cost.comm import Ring, all_gather_time, all_reduce_time, p2p_time, reduce_scatter_time
from pdv.fsdp_step import before_backward, end_step
from pdv.profile.hardware import host_name
from pdv.profile.loops import settle_gloo_loops
from pdv.profile.network import Progress, tournament_rounds

__all__ = ["FSDP_PROBE_BYTES", "MESSAGE_SIZES", "AfterCompute", "all_cpu", "fsdp_own_work",
           "fsdp_pairs", "exchange_excess", "measure_overheads", "overheads_block", "sync_excess",
           "typical_pass"]

MESSAGE_SIZES = (1, 16 * 1024, 256 * 1024, 1024 * 1024)
"""message sizes of the message-CPU probe, bytes"""
_MICRO = 8
_STEPS = 12
_WARMUP = 3
_MESSAGES = 24
_BATCH = 3
"""messages posted together in the batch probe (a boundary of three tensors: an LSTM's output
and its (h, c) state)"""
_BATCH_SIZE = 16 * 1024
"""bytes of each message of the batch probe"""
_ROUNDS = 6
_ROUND_GAP_S = 0.5
_BURST_S = 0.005
"""compute before each timed sync: a backward's length on the small models pdv runs on CPU"""
_SYNC_BYTES = 4096
_OP_S = 0.002
"""compute before each timed exchange: one forward or backward of those models"""
_EXCHANGE_BYTES = 32 * 1024
_SYNC_WARMUP, _SYNC_ROUNDS = 4, 24
"""warm-ups and timed rounds per pass of the after-compute probe (AfterCompute.take_pass)"""
_LONG_BURST_S, _LONG_WARMUP, _LONG_ROUNDS = 0.05, 1, 8
"""the sync's rounds after a longer burst, per pass (AfterCompute): with the shorter burst's,
the two ends of the line a stage's excess is priced on by its compute per step"""
_PASS_BYTES, _PASS_ROUNDS = 16 * 2**20, 5
"""the gradient passes' buffer (past a core's L2, as the buffers they price mostly are) and
timed rounds"""
_FSDP_SMALL, _FSDP_LARGE = 1024, (16 * 1024, 1024 * 1024)
"""parameter bytes of the FSDP probe's small unit, and the range of its large one"""
_FSDP_WIRE_S = 0.002
FSDP_PROBE_BYTES = 320 * 1024 * 1024
"""headroom a rank needs to take part in the FSDP probe (about twice what it was seen to use)"""
_FSDP_UNITS = 4
_FSDP_MICRO = (1, 3)
_FSDP_ROUNDS = 3
_FSDP_STEPS = 8


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

    from pdv.run.pipeline import loss_divided

    group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    settle_gloo_loops()
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
        divided, kwargs, _ = loss_divided(Schedule1F1B, loss_fn, micro)  # as pdv run does
        schedule = Schedule1F1B(stage, n_microbatches=micro, loss_fn=divided, **kwargs)
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


def _grad_passes(device: torch.device) -> float:
    """Seconds per byte of a plain replica's two passes over its flat gradient buffer a step
    (pdv.run.stage.ReplicaGrads: zero_ before the first backward, div_ by the replica count
    after the all-reduce), each pass from a cold cache as a step meets it (the ops between
    them touch far more memory than the cache holds)."""
    flat = torch.zeros(_PASS_BYTES // 4, device=device)
    evict = torch.empty(2 * _PASS_BYTES // 4, device=device)
    took: list[float] = []
    for k in range(_PASS_ROUNDS + 1):
        spent = 0.0
        for one in (flat.zero_, lambda: flat.div_(2)):
            evict.fill_(float(k))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            one()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent += time.perf_counter() - t0
        if k:  # the first round is a warm-up
            took.append(spent)
    return statistics.median(took) / _PASS_BYTES


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
    # per direction, per count posted together: CPU seconds per posting, a value per round
    batched: dict[str, dict[int, list[float]]] = {"send": {}, "recv": {}}
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
        if peer is not None:
            _batched_round(rank, peer, batched)
    dist.barrier()  # a rank with a bye waits here for the pairs
    if peer is None:
        return None
    sizes = list(MESSAGE_SIZES)
    send = [statistics.median(r) for r in sent]
    recv = [statistics.median(r) for r in received]
    send_line, recv_line = _line(sizes, send), _line(sizes, recv)
    for direction, line in (("send", send_line), ("recv", recv_line)):
        one = statistics.median(batched[direction][1])
        several = statistics.median(batched[direction][_BATCH])
        # k messages posted together: a + (k-1)·a' + b·k·S, against one posted alone, a + b·S
        extra = (several - one - (_BATCH - 1) * line["b_s_per_byte"] * _BATCH_SIZE)
        line["batched_a_s"] = max(extra / (_BATCH - 1), 0.0)
    return {"peer": peer, "sizes": sizes, "send_cpu_s": send, "recv_cpu_s": recv,
            "send_cpu_rounds_s": sent, "recv_cpu_rounds_s": received,
            "batched_cpu_rounds_s": {d: {str(k): v for k, v in by.items()}
                                     for d, by in batched.items()},
            "batch_size_bytes": _BATCH_SIZE,
            "spread": _spread(sent + received),
            "send_cpu": send_line, "recv_cpu": recv_line}


def _batched_round(rank: int, peer: int, batched: dict[str, dict[int, list[float]]]) -> None:
    """One round of messages posted together (batch_isend_irecv, as a pipeline stage posts a
    boundary's tensors): per direction, the CPU of one posting of 1 and of _BATCH messages."""
    for sender in (0, 1):
        sending = (rank < peer) == (sender == 0)
        for k in (1, _BATCH):
            bufs = [torch.zeros(_BATCH_SIZE, dtype=torch.uint8) for _ in range(k)]
            op = dist.isend if sending else dist.irecv
            for n in range(2 + _MESSAGES):
                if n == 2:  # after two warm-up postings
                    c0 = time.process_time()
                for work in dist.batch_isend_irecv([dist.P2POp(op, b, peer) for b in bufs]):
                    work.wait()
            per = (time.process_time() - c0) / _MESSAGES
            batched["send" if sending else "recv"].setdefault(k, []).append(per)


class AfterCompute:
    """The sync-and-message-after-compute probe, taken in passes at points spread over the
    cluster probe (see the module docstring); every rank makes one and calls each method at
    the same point, a rank with a bye too.

    Passes ride the probe's compute windows instead of sleeping half a second between them
    at its end, as they did: the slow landings come in spells of seconds. Between profiles of
    this project's 2-vCPU machine the spread barely moved (exchange excess: standard deviation
    0.12 ms over 8 files, 0.21 ms over 13 the old way; sync excess 0.47 and 0.36 ms), since
    the spells outlast the probe; the sleeps' 2 s of the probe's 23 are saved.

    Each pass also times the sync after a burst ten times as long (``_LONG_BURST_S``), with
    each round's compute: the later end grew with the compute before it in a scratch loop
    here (1.9-2.6 ms after 5 ms, 3.4-3.8 ms after 100 ms), which one burst length cannot
    say. The cluster file takes both bursts' compute and the longer one's excess, pass by
    pass as the shorter's (:func:`typical_pass`)
    (``RankOverheads.sync_after_long_compute``); a stage's excess is priced between them by its
    compute per step (pdv.cost.terms.sync_after_compute).
    """

    def __init__(self, device: torch.device) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        rounds = tournament_rounds(world)
        self.pairs = rounds[0] if rounds else []
        hosts: list[str] = [""] * world
        dist.all_gather_object(hosts, host_name())
        mine = next((i for i, p in enumerate(self.pairs) if rank in p), None)
        self.mine = mine
        # Where a host holds several pairs, its pairs also take turns at the exchange, the
        # host's other ranks idle (hosts in parallel): with its ranks outnumbering cores, the
        # slow landings of the busy rounds are waits for a core (4 ranks on 2 cores here:
        # 0.6-1.2 ms mean with both pairs at work, 0.3-0.6 ms taking turns, medians alike).
        on_host = [i for i, (a, b) in enumerate(self.pairs) if hosts[a] == hosts[b]]
        per_host = [[i for i in on_host if hosts[self.pairs[i][0]] == h]
                    for h in sorted(set(hosts))]
        self.turns = max((len(p) for p in per_host), default=0)
        self.turns = self.turns if self.turns > 1 else 0
        self.turn = next((p.index(mine) for p in per_host if mine in p), None)
        self.alone: list[float] = []
        self.burst = self.long_burst = self.op = 0  # agreed with the partner in the first pass
        self.pair: list[int] | None = None
        self.passes = 0
        self.first: list[float] = []
        self.second: list[float] = []
        self.landed: list[float] = []
        self.computed: list[float] = []  # each timed sync round's burst, seconds
        self.long_first: list[float] = []
        self.long_computed: list[float] = []
        if mine is None:
            return
        self.pair = list(self.pairs[mine])
        self.peer = self.pair[1] if self.pair[0] == rank else self.pair[0]
        # A message's landing is read against its sender's clock: only on one host.
        self.same_host = hosts[self.peer] == hosts[rank]
        self.run, self.per = _burst(device)
        self.buf = torch.zeros(_SYNC_BYTES // 4)
        self.send = torch.zeros(_EXCHANGE_BYTES // 8, dtype=torch.float64)
        self.recv = torch.zeros_like(self.send)

    def take_pass(self) -> None:
        """One pass: warm-ups then ``_SYNC_ROUNDS`` timed rounds of the sync, then of the
        exchange, every round after a barrier of the pair; ends with a barrier of all ranks.

        The pairs' groups live for the pass only. Every rank makes every pair's group, so each
        takes a fresh name (see _fsdp_probe), but only members hold one, and a group made
        later by its members alone (the collective sweep's) is named from how many groups
        each member holds: one kept across the sweeps left a rank with a bye one short of its
        partner there, and the two waited on different names (3 ranks).
        """
        groups = [dist.new_group(list(p)) for p in self.pairs]
        settle_gloo_loops()
        if self.pair is not None and self.mine is not None:
            self.group = groups[self.mine]
            if not self.burst:
                # Both ranks burst equally (the larger count): a partner's lateness is the rest.
                agreed = torch.tensor([max(1, round(_BURST_S / max(self.per, 1e-9)))])
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
                self.burst = int(agreed.item())
                self.long_burst = max(1, round(self.burst * _LONG_BURST_S / _BURST_S))
                self.op = max(1, round(self.burst * _OP_S / _BURST_S))
            self.passes += 1
            self._rounds(self._sync_round)
            self._rounds(self._long_round, _LONG_WARMUP, _LONG_ROUNDS)
            if self.same_host:
                self._rounds(self._exchange_round)
        for k in range(self.turns):
            dist.barrier()
            if k == self.turn and self.pair is not None:
                self._rounds(lambda timed: self._exchange_round(timed, self.alone))
        dist.barrier()  # a rank with a bye waits here for the pairs
        for g in groups:
            if g != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(g)

    def _rounds(self, one: Callable[[bool], None], warmup: int = _SYNC_WARMUP,
                timed: int = _SYNC_ROUNDS) -> None:
        for n in range(warmup + timed):
            dist.barrier(group=self.group)
            one(n >= warmup)

    def _burst_then_sync(self, count: int) -> tuple[float, float]:
        """A compute burst of `count`, then the pair's all-reduce: (burst, all-reduce) seconds."""
        t0 = time.perf_counter()
        self.run(count)
        t1 = time.perf_counter()
        dist.all_reduce(self.buf, group=self.group)
        return t1 - t0, time.perf_counter() - t1

    def _sync_round(self, timed: bool) -> None:
        """The pair's first all-reduce after a compute burst, and the one right after it."""
        computed, first = self._burst_then_sync(self.burst)
        t0 = time.perf_counter()
        dist.all_reduce(self.buf, group=self.group)
        second = time.perf_counter() - t0
        if timed:
            self.first.append(first)
            self.second.append(second)
            self.computed.append(computed)

    def _long_round(self, timed: bool) -> None:
        """The pair's first all-reduce after a longer burst."""
        computed, first = self._burst_then_sync(self.long_burst)
        if timed:
            self.long_first.append(first)
            self.long_computed.append(computed)

    def _exchange_round(self, timed: bool, into: list[float] | None = None) -> None:
        """An op's worth of compute, then both post a receive and a send, as a 1F1B steady
        state does; the time from when both ends had posted (the sender's clock, carried in
        the message) to the receive's completion, kept in `into` (default: the busy rounds')."""
        self.run(self.op)
        posted = time.perf_counter()
        self.send[0] = posted
        got = dist.irecv(self.recv, self.peer, group=self.group)
        sent = dist.isend(self.send, self.peer, group=self.group)
        got.wait()
        done = time.perf_counter()
        sent.wait()
        if timed:
            (self.landed if into is None else into).append(done - max(posted,
                                                                      float(self.recv[0])))

    def record(self) -> dict[str, Any] | None:
        """This rank's record (None: a bye, or no pass taken)."""
        if self.pair is None or not self.first:
            return None
        # The mean, not the median: the times are bimodal (about 0.3 ms, or 2-6 ms when a
        # loop thread waits out a scheduler slice), and a median flips between the modes from
        # one profile to the next (0.5 and 2.6 ms seen); a step pays the mix.
        out: dict[str, Any] = {
            "pair": self.pair, "passes": self.passes, "rounds_per_pass": _SYNC_ROUNDS,
            "burst_matmuls": self.burst, "bytes": _SYNC_BYTES,
            "first_s": statistics.mean(self.first), "second_s": statistics.mean(self.second),
            "first_median_s": statistics.median(self.first),
            "first_rounds_s": self.first, "second_rounds_s": self.second,
            "burst_rounds_s": self.computed,
            "long": {"burst_matmuls": self.long_burst, "rounds_per_pass": _LONG_ROUNDS,
                     "first_s": statistics.mean(self.long_first),
                     "first_rounds_s": self.long_first,
                     "burst_rounds_s": self.long_computed}}
        if self.landed:
            out["exchange"] = {
                "bytes": _EXCHANGE_BYTES, "op_matmuls": self.op, "from": self.peer,
                "landed_s": statistics.mean(self.landed),
                "landed_median_s": statistics.median(self.landed),
                "landed_rounds_s": self.landed}
            if self.alone:
                out["exchange"].update({
                    "alone_landed_s": statistics.mean(self.alone),
                    "alone_landed_median_s": statistics.median(self.alone),
                    "alone_landed_rounds_s": self.alone})
        return out


def all_cpu(device: torch.device, wire: torch.device) -> bool:
    """Whether every rank computes on CPU and moves messages in host memory (a collective).

    The message-CPU and after-compute probes pair ranks up: every rank takes part or none.
    """
    cpu = torch.tensor([int(device.type == "cpu" == wire.type)], device=wire)
    dist.all_reduce(cpu, op=dist.ReduceOp.MIN)
    return bool(cpu.item())


def _burst(device: torch.device) -> tuple[Callable[[int], None], float]:
    """A compute burst of n 256×256 matmuls, and the seconds one took here."""
    a = torch.randn(256, 256, device=device)
    b = torch.randn(256, 256, device=device)

    def run(n: int) -> None:
        for _ in range(n):
            a @ b

    t0 = time.perf_counter()
    run(10)
    return run, (time.perf_counter() - t0) / 10


def exchange_excess(record: dict[str, Any], links: Links, rank: int,
                    alone: bool = False) -> float | None:
    """What a message to this rank took, after compute, beyond its link's α + S/β (≥ 0); with
    `alone`, in the rounds its host's other ranks sat out (None where there were none)."""
    ex = record["exchange"]
    landed = ex.get("alone_landed_s") if alone else ex["landed_s"]
    if landed is None:
        return None
    priced = p2p_time(links, ex["from"], rank, float(ex["bytes"]))
    return max(0.0, float(landed) - priced)


def sync_excess(record: dict[str, Any], ring: Ring,
                partner: dict[str, Any] | None = None) -> float:
    """What the pair's first all-reduce after compute took, round by round the later of its two
    ranks, beyond the sweep's price for it on the pair's ring (at least 0).

    A step ends when its last rank does, and an all-reduce does not end on both ranks at once:
    one rank's loop thread may wait out a scheduler slice after the other's has finished (a
    dp2 run here ended its sync within 0.1 ms on its two ranks in 14 steps of 35, 0.55-2.1 ms
    apart in the other 21).
    The mean of each round's later end read 0.1-0.5 ms above the larger of the two ranks' own
    means in eight cluster files of this project's 2-vCPU machine. The later ends are taken
    pass by pass (:func:`typical_pass`). Without the partner's rounds (an older record), the
    rank's own mean.
    """
    took = float(record["first_s"])
    mine, theirs = record.get("first_rounds_s"), (partner or {}).get("first_rounds_s")
    if mine and theirs and len(mine) == len(theirs):
        later = [max(a, b) for a, b in zip(mine, theirs, strict=True)]
        took = typical_pass(later, int(record.get("passes", 1)))
    return max(0.0, took - all_reduce_time(ring, float(record["bytes"])))


def typical_pass(rounds: Sequence[float], passes: int) -> float:
    """The median over the passes of each pass's mean (rounds in pass order); the plain mean
    where the rounds do not split evenly.

    The mean inside a pass keeps the mix of fast and slow rounds a step pays; the median
    across passes keeps one pass's slow spell out. In one 2-rank file here a rank's 50 ms
    bursts ran 55-85 ms in the first pass and 37-50 ms in the other two, its partner waited
    17-46 ms after each, and the mean over all rounds priced 13.9 ms of excess where the
    passes' own means read 32.2, 4.5 and 4.6 ms; a dp2 run minutes later paid 7.6 ms for its
    whole rest (all-reduce and bookkeeping included).
    """
    n = len(rounds)
    if passes < 2 or n % passes:
        return statistics.mean(rounds)
    k = n // passes
    return statistics.median(statistics.mean(rounds[i * k:(i + 1) * k]) for i in range(passes))


def _spread(per_size_rounds: list[list[float]]) -> float:
    """The largest interquartile range over median of any size and direction's rounds."""
    worst = 0.0
    for r in per_size_rounds:
        if len(r) >= 2 and statistics.median(r) > 0:
            q = statistics.quantiles(r, n=4, method="inclusive")
            worst = max(worst, (q[2] - q[0]) / statistics.median(r))
    return worst


def _fsdp_stack(width: int, device: torch.device, mesh: Any) -> nn.Module:
    """`_FSDP_UNITS` bias-free Linear layers, each its own FSDP2 unit when a mesh is given."""
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(width, width, bias=False)
                            for _ in range(_FSDP_UNITS)]).to(device)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in stack:
            fully_shard(layer, mesh=mesh)
        fully_shard(stack, mesh=mesh)
    return stack


def fsdp_pairs(bandwidth_Bps: Sequence[Sequence[float]],
               headroom_bytes: Sequence[float] | None = None) -> list[tuple[int, int, int]]:
    """Disjoint pairs over the fastest links first (a link's speed: the slower direction), each
    with its large unit's bytes: what the link moves in _FSDP_WIRE_S, within _FSDP_LARGE.

    A rank with less than FSDP_PROBE_BYTES of headroom (memory it may use beyond what it held
    before any model) takes no part: the probe's FSDP machinery grew a rank by about 160 MiB,
    and a rank capped at 470 MiB was OOM-killed in it.
    """
    n = len(bandwidth_Bps)
    room = headroom_bytes if headroom_bytes is not None else [float("inf")] * n
    speed = {(a, b): min(bandwidth_Bps[a][b], bandwidth_Bps[b][a])
             for a in range(n) for b in range(a + 1, n)
             if min(room[a], room[b]) >= FSDP_PROBE_BYTES}
    free = set(range(n))
    out = []
    for (a, b), bw in sorted(speed.items(), key=lambda kv: (-kv[1], kv[0])):
        if a in free and b in free:
            free -= {a, b}
            lo, hi = _FSDP_LARGE
            out.append((a, b, int(min(hi, max(lo, bw * _FSDP_WIRE_S)))))
    return out


def _fsdp_pair(pair: tuple[int, int], large: int, group: Any,
               device: torch.device) -> dict[str, Any]:
    """Both ranks of a pair: FSDP's excess per unit and step over the unsharded stack."""
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(group, device.type)
    widths = [max(1, round(math.sqrt(b / 4))) for b in (_FSDP_SMALL, large)]
    stacks = {(w, sharded): _fsdp_stack(w, device, mesh if sharded else None)
              for w in widths for sharded in (False, True)}
    inputs = {w: torch.randn(2, w, device=device) for w in widths}

    def step(w: int, micro: int, sharded: bool) -> float:
        stack = stacks[(w, sharded)]
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stack.zero_grad()
        for _ in range(micro):
            if sharded:
                before_backward(stack)
            stack(inputs[w]).sum().backward()
        if sharded:
            end_step(stack)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    times: dict[tuple[int, int, bool], list[float]] = {}
    for k in range(_FSDP_ROUNDS):  # rounds, so that a burst of load spreads over every case
        for w in widths:
            for micro in _FSDP_MICRO:
                for sharded in (False, True):
                    for n in range(_FSDP_STEPS + (2 if k == 0 else 0)):
                        t = step(w, micro, sharded)
                        if k or n >= 2:  # after two warm-up steps
                            times.setdefault((w, micro, sharded), []).append(t)
    lo, hi = _FSDP_MICRO
    gather, scatter = [], []
    for w in widths:
        excess = {m: (statistics.median(times[(w, m, True)])
                      - statistics.median(times[(w, m, False)])) / _FSDP_UNITS
                  for m in _FSDP_MICRO}
        per_op = (excess[hi] - excess[lo]) / (hi - lo)
        gather.append(per_op)
        scatter.append(excess[lo] - (lo + 1) * per_op)
    return {"pair": list(pair), "unit_bytes": [w * w * 4 for w in widths],
            "gather_op_s": gather, "reduce_scatter_s": scatter,
            "step_medians_s": {f"{w}x{m}{'-fsdp' if f else ''}": statistics.median(v)
                               for (w, m, f), v in times.items()}}


def _turns(pairs: Sequence[tuple[int, int]], hosts: Sequence[str]) -> list[list[int]]:
    """Pairs (by index) in turns: no two pairs of a turn touch the same host."""
    turns: list[tuple[set[str], list[int]]] = []
    for i, (a, b) in enumerate(pairs):
        mine = {hosts[a], hosts[b]}
        for used, members in turns:
            if not used & mine:
                used |= mine
                members.append(i)
                break
        else:
            turns.append((set(mine), [i]))
    return [members for _, members in turns]


def _fsdp_probe(rank: int, world: int, device: torch.device,
                sized: list[tuple[int, int, int]]) -> dict[str, Any] | None:
    """Every rank: its pair's FSDP probe (`sized`: every rank's same :func:`fsdp_pairs`),
    pairs on overlapping hosts in turns."""
    pairs = [(a, b) for a, b, _ in sized]
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, host_name())
    # Every rank creates every pair's group, so the groups take fresh names. A group of the
    # same ranks made with use_local_synchronization (the collective sweep's, destroyed since)
    # has a name hashed from its ranks, and a second one found the first one's stale addresses
    # in the store ("Connection refused" in 1 of 4 runs).
    groups = [dist.new_group(list(p)) for p in pairs]
    settle_gloo_loops()
    out = None
    for turn in _turns(pairs, hosts):
        dist.barrier()
        for i in turn:
            if rank in pairs[i]:
                out = _fsdp_pair(pairs[i], sized[i][2], groups[i], device)
    dist.barrier()
    for g in groups:
        if g != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(g)
    return out


def fsdp_own_work(probe: dict[str, Any], ring: Ring) -> dict[str, dict[str, float]]:
    """FSDP's own work per unit as lines in the unit's bytes: the probe's line per gathering op
    and per reduce-scatter, less the line the cost model prices the pair's collective on
    (through the same sizes), coefficient by coefficient, each kept ≥ 0.

    Coefficient by coefficient: where the sweep's β is lower than the probe's runs saw, a
    difference per size would clamp the large size to 0 and halve the constant.
    """
    sizes = [int(b) for b in probe["unit_bytes"]]
    out = {}
    for op, measured, priced in (("gather", "gather_op_s", all_gather_time),
                                 ("reduce_scatter", "reduce_scatter_s", reduce_scatter_time)):
        raw = _line(sizes, [float(t) for t in probe[measured]])
        wire = _line(sizes, [priced(ring, b) for b in sizes])
        out[op] = {"a_s": max(0.0, raw["a_s"] - wire["a_s"]),
                   "b_s_per_byte": max(0.0, raw["b_s_per_byte"] - wire["b_s_per_byte"])}
    return out


def measure_overheads(device: torch.device, wire: torch.device,
                      report: Progress | None = None,
                      fsdp: list[tuple[int, int, int]] | None = None,
                      after: AfterCompute | None = None) -> dict[str, Any]:
    """Every rank: its bookkeeping (taking turns with its host's ranks), message CPU, given
    `after` its last pass and record, and given `fsdp` (:func:`fsdp_pairs`, the same on every
    rank), FSDP's own work (see the module docstring).

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
            book = _bookkeeping(device) | {"grad_passes_s_per_byte": _grad_passes(device)}
    dist.barrier()
    report({"phase": "message-cpu"})
    messages = _message_cpu(rank, world) if all_cpu(device, wire) else None
    record = None
    if after is not None:
        after.take_pass()
        record = after.record()
    out: dict[str, Any] = dict(book)
    if messages is not None:
        out["send_cpu"] = messages["send_cpu"]
        out["recv_cpu"] = messages["recv_cpu"]
    probe = None
    if fsdp:
        report({"phase": "fsdp"})
        probe = _fsdp_probe(rank, world, device, fsdp)
    return {"rank": rank, "overheads": out, "messages": messages, "after_compute": record,
            "fsdp": probe}


def overheads_block(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The cluster measurement's record of both probes (method and every rank's raw numbers)."""
    return {
        "method": "bookkeeping: torch.distributed.pipelining Schedule1F1B on a one-rank stage "
        f"whose layer is one parameter, steps of 1 and {_MICRO} micro-batches ({_WARMUP} "
        f"warm-up + {_STEPS} timed, medians), ranks of a host in turns; per micro-batch = "
        f"the difference / {_MICRO - 1}, split forward/backward by the time each method took; "
        "per step = the rest (zero_grad included). Gradient passes (the same turns): zero_ "
        f"and div_ of a {_PASS_BYTES} byte buffer, each after writing twice that elsewhere "
        f"(a cold cache), median of {_PASS_ROUNDS} rounds after a warm-up, per byte. "
        "Message CPU (CPU ranks): the tournament's "
        f"first round pairs send each other {_MESSAGES} messages per size after 2 warm-ups, "
        f"in {_ROUNDS} rounds {_ROUND_GAP_S} s apart; process CPU time per message on each "
        "side, the median of the rounds per size, least squares a + b*S; spread = the largest "
        "IQR/median of a size's rounds; each round also posts 1 and then "
        f"{_BATCH} messages of {_BATCH_SIZE} bytes together (batch_isend_irecv, "
        f"{_MESSAGES} postings each), and batched_a_s = (CPU of {_BATCH} - CPU of 1 - "
        f"{_BATCH - 1}*b*S) / {_BATCH - 1}, the medians of the rounds. "
        "Sync after compute (CPU ranks): the same pairs, each in "
        f"its own process group, compute about {_BURST_S} s of 256x256 matmuls (the pair's "
        f"larger count) then all-reduce {_SYNC_BYTES} bytes twice, "
        f"{_SYNC_ROUNDS} timed rounds after {_SYNC_WARMUP} warm-ups per pass, a pass at "
        "the cluster probe's compute windows after the link sweep and after the collectives "
        "and one here (record: passes); "
        "excess = the later of the pair's two first all-reduces, its mean over each pass's "
        "rounds and the median over the passes, "
        "less the sweep's price of the same all-reduce on the pair, at least 0, the same for "
        "both ranks of a pair (a rank in no pair: its kind's median); the same after a burst "
        f"of about {_LONG_BURST_S} s, {_LONG_ROUNDS} rounds per pass, each round's burst time "
        "kept; both bursts' compute (each pass's mean, the median over the passes) and the "
        "longer one's excess into "
        "sync_after_long_compute (a stage's excess: on the line between the two by its "
        "compute per step, held outside them). Message after compute (the same "
        f"pairs on one host): compute about {_OP_S} s, then both post a receive and a send of "
        f"{_EXCHANGE_BYTES} bytes, the sender's clock in the message; the time from both ends "
        "posted to the receive's end, the same rounds and passes; excess = mean less the "
        "link's alpha + S/beta, at least 0, per receiving rank (unmeasured: its kind's "
        "median) into links.exchange_latency_s; where a host holds several pairs, its "
        "pairs also take the exchange rounds in turns, the host's other ranks idle, into "
        "links.exchange_latency_alone_s (a rank whose host held one pair: its busy excess). "
        "FSDP's own work (with the "
        "collective sweep): ranks paired over their fastest links first, pairs on "
        "overlapping hosts in turns, step a stack of "
        f"{_FSDP_UNITS} bias-free Linear layers (each a fully_shard unit on the pair, stepped "
        f"as torch's pipelining steps FSDP) and the same stack unsharded, at M of "
        f"{list(_FSDP_MICRO)} micro-batches, units of about {_FSDP_SMALL} bytes and what the "
        f"pair's link moves in {_FSDP_WIRE_S} s (within {list(_FSDP_LARGE)} bytes), "
        f"{_FSDP_ROUNDS} rounds of {_FSDP_STEPS} steps (medians); excess per unit = (M + 1) "
        "gathering ops + one reduce-scatter, solved from the two M; less the sweep's pricing "
        "of the pair's collective, a + b*S per unit",
        "sizes_bytes": list(MESSAGE_SIZES),
        "ranks": [{"rank": r["rank"], **({"messages": r["messages"]} if r["messages"] else {}),
                   **({"after_compute": r["after_compute"]} if r.get("after_compute") else {}),
                   **({"fsdp": r["fsdp"]} if r.get("fsdp") else {})}
                  for r in per_rank],
    }
