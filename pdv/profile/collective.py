"""Latency α and bandwidth β of an all-reduce, an all-gather and a reduce-scatter over every
unordered pair of ranks.

Why, next to the point-to-point sweep: a backend's all-reduce pays what a send/recv does not
(gloo on CPU copies into its own buffers, reduces, and moves both directions at once on the
same cores), so ring formulas priced at point-to-point β under-price gradient sync. Measured
on 4 loopback CPU ranks sharing 2 cores: β 2–4× below the pair's send/recv β.

Method. For each unordered pair {a, b} a 2-rank process group is made by the pair alone
(`new_group(..., use_local_synchronization=True)`: ranks outside the pair do not take part)
and all-reduces float32 tensors of the sweep's sizes: warm-ups, then repeats timed one by one
on each rank, spread over a few passes through all sizes; per size the slower rank's median
(an all-reduce is done when both have it). The ring all-reduce on n = 2 ranks takes
t = 2α + S/β (nccl-tests' busbw factor 2(n−1)/n = 1): α = half the least time any
latency-bound size took beyond S/β, and β = 1/slope of the least-squares line through the
medians that starts at 2α (:func:`price_line`: the price's own line; a free line's intercept
is kept too, but a line through megabyte messages is no latency). The cost model's ring
formulas take α and β as they are.

FSDP's collectives are swept the same way (issue 12), at least as far in size as the pair's
all-reduce grew (FSDP units are megabytes): a backend need not run them as the ring
formulas assume (gloo on CPU measured a reduce-scatter as slow as an all-reduce of the same
input here, twice the ring's price). On n = 2 a ring all-gather producing S bytes, and a
reduce-scatter of S bytes, take t = α + S/(2β): β = 1/(2·slope), α the least excess as above.

Schedule. The same circle-method tournament as the point-to-point sweep: disjoint pairs of a
round run concurrently, rounds are separated by a barrier on the whole group.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pdv.artifacts import HostRing
from pdv.profile.hardware import host_name
from pdv.profile.loops import settle_gloo_loops
from pdv.profile.network import (
    Progress,
    SweepConfig,
    fit_line,
    gather_on_rank0,
    tournament_rounds,
)

__all__ = [
    "PRICE_FIT", "HostRingSweep", "PairCollective", "collective_block", "collective_matrices",
    "host_ring_block", "measure_collectives", "measure_host_rings", "price_line",
    "ring_from_pair_line", "superlinearity", "sweep_flaws",
]

# As in the point-to-point sweep: cheap sizes are repeated until about this much time is
# spent on them (up to _MAX_ITERS), expensive ones at least `iters` times.
_BUDGET_S, _MAX_ITERS = 0.02, 64
_ELEMENT = 4  # float32, the gradients' dtype
_REPEAT_BELOW_R2 = 0.9
"""an all-reduce sweep whose size fit explains less than this is taken again (up to _SWEEPS)
and the better fit kept: on shared cores a burst of load can bend one sweep (r² 0.74 seen
with 4 ranks on 2 cores), and the all-reduce's β prices every gradient sync"""
_PASSES = 3  # the repeats of each size are split over this many passes through the sizes
_BURST = 2.0
"""a sweep is taken again when a size took more than this many times what the next smaller
size's time allows under t = c + S/β (which grows no faster than S): a burst of load that
covers one size's every pass (seen here: an all-gather's 1 MiB median 0.65 ms and its 4 MiB
13.2 ms, where 4 MiB runs in 1.2–2.8 ms) would otherwise set β alone, being the sweep's
largest and so the least-squares line's heaviest point"""
_SWEEPS = 3  # at most, per pair and collective
_SWEEP_GAP_S = 0.5  # between sweeps: such bursts last about a second here


OPS = ("all_reduce", "all_gather", "reduce_scatter")
"""the collectives swept per pair, in order"""
_FSDP_REACH = 16 * 1024 * 1024
"""FSDP's sweeps grow at least this far (as far as the all-reduce did, if less). Not to 64 MiB:
there gloo's reduce-scatter took 213-221 ms against 14.5 ms at 16 MiB in the same sweeps, and β
fell to 153 MB/s (likely, not proven: a full-size temporary larger than a worker thread's 64 MiB
malloc heap is mapped afresh and faulted in per call, which a run meets only with units that
large)"""
PRICE_FIT = "least squares through the least excess"
"""a sweep's `fit` when its α and β come from :func:`price_line`"""
# t(S) on n = 2 ranks = _STEPS[op]·α + S / (_SHARE[op]·β), S the full tensor's bytes
_STEPS = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}
_SHARE = {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 2}


@dataclass
class PairCollective:
    """One unordered pair a < b and one collective: the sweep and its fit."""

    a: int
    b: int
    round: int
    sizes: list[int]
    median_s: list[float] = field(repr=False)  # slower rank's median per size
    best_s: list[float] = field(repr=False)  # slower rank's best per size
    fit_intercept_s: float
    alpha_s: float
    bandwidth_Bps: float
    r2: float
    fit: str
    op: str = "all_reduce"
    sweeps: int = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _agree(values: list[float], group: Any, device: torch.device) -> list[float]:
    """The pair's maximum of each value: both ranks then take the same decisions."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [float(x) for x in t.tolist()]


class _Buffers:
    """What one collective of a full tensor of `numel` float32 moves, on a 2-rank group."""

    def __init__(self, op: str, numel: int, device: torch.device) -> None:
        self.op = op
        if op != "all_reduce":
            numel += numel % 2  # the pair's halves
        self.full = torch.ones(numel, dtype=torch.float32, device=device)
        self.half = torch.ones(numel // 2, dtype=torch.float32, device=device)

    def numel(self) -> int:
        """Elements of the full tensor (the size the sweep reports)."""
        return self.full.numel()

    def run(self, group: Any) -> None:
        """One collective over the pair."""
        if self.op == "all_reduce":
            dist.all_reduce(self.full, group=group)
        elif self.op == "all_gather":
            dist.all_gather_into_tensor(self.full, self.half, group=group)
        else:
            dist.reduce_scatter_tensor(self.half, self.full, group=group)


def _timed(buf: _Buffers, group: Any, count: int) -> list[float]:
    """`count` collectives of `buf` in the pair, each timed on this rank's clock."""
    samples = []
    for _ in range(count):
        _sync(buf.full.device)
        t0 = time.perf_counter()
        buf.run(group)
        _sync(buf.full.device)
        samples.append(time.perf_counter() - t0)
    return samples


def _sizes(
    cfg: SweepConfig, device: torch.device, group: Any, report: Progress, op: str,
    reach: int = 0,
) -> list[tuple[_Buffers, int]]:
    """Warm every size up and pick the sizes: the sweep's, grown ×4 as the p2p sweep grows,
    and at least up to `reach` bytes."""
    chosen: list[tuple[_Buffers, int]] = []  # (buffers, repeats per pass)
    pending = list(cfg.sizes)
    while pending:
        numel = max(1, -(-pending.pop(0) // _ELEMENT))
        buf = _Buffers(op, numel, device)
        # At least one warm-up: its time, agreed by the pair, sizes the repeats and the growth.
        (t,) = _agree([min(_timed(buf, group, max(1, cfg.warmup)))], group, device)
        count = max(cfg.iters, min(_MAX_ITERS, int(_BUDGET_S / max(t, 1e-9))))
        chosen.append((buf, -(-count // _PASSES)))
        size = buf.numel() * _ELEMENT
        report({"size": size, "pass": "warm-up"})
        if not pending and (t < cfg.grow_until_s or size < reach) and size * 4 <= cfg.max_size:
            pending.append(size * 4)
    return chosen


def _sweep_pair(
    a: int, b: int, rnd: int, cfg: SweepConfig, device: torch.device, group: Any,
    report: Progress, op: str = "all_reduce", reach: int = 0,
) -> PairCollective:
    """Both ranks of the pair run this together; its sizes reach at least `reach` bytes.

    The repeats of every size are spread over _PASSES passes through all sizes, so a burst
    of load from outside (other processes on the host's cores) lands in a few samples of
    several sizes rather than in all samples of one, and the medians stay put.
    """
    def step(event: dict[str, Any]) -> None:
        report({"phase": op.replace("_", "-"), "round": rnd, "src": a, "dst": b} | event)

    chosen = _sizes(cfg, device, group, step, op, reach)
    sizes = [buf.numel() * _ELEMENT for buf, _ in chosen]

    def sweep() -> tuple[list[float], list[float], tuple[float, float, float, str]]:
        samples: list[list[float]] = [[] for _ in chosen]
        for k in range(_PASSES):
            for i, (buf, count) in enumerate(chosen):
                samples[i] += _timed(buf, group, count)
                step({"size": buf.numel() * _ELEMENT, "pass": k})
        agreed = _agree([statistics.median(x) for x in samples] + [min(x) for x in samples],
                        group, device)
        medians = agreed[: len(sizes)]
        return medians, agreed[len(sizes):], fit_line(sizes, medians)

    def flaws(swept: tuple) -> tuple[int, float, float]:
        return sweep_flaws(op, sizes, swept[0], float(swept[2][2]))

    def ok(swept: tuple) -> bool:
        return flaws(swept)[0] == 0

    # Both ranks hold the same agreed medians, so they agree on the fit and on a repeat.
    swept, sweeps = sweep(), 1
    while not ok(swept) and sweeps < _SWEEPS:
        time.sleep(_SWEEP_GAP_S)
        swept, sweeps = min(swept, sweep(), key=flaws), sweeps + 1
    medians, bests, (c, slope_bw, r2, how) = swept
    if how == "least squares":
        excess, slope_bw = price_line(sizes, medians, slope_bw)
        how = PRICE_FIT
    else:
        excess = 2 * _alpha(sizes, medians, slope_bw)
    beta = slope_bw / _SHARE[op]  # t = k·α + S / (share·β)
    return PairCollective(
        a=a, b=b, round=rnd, sizes=sizes, median_s=medians, best_s=bests,
        fit_intercept_s=c, alpha_s=excess / _STEPS[op],
        bandwidth_Bps=beta, r2=r2, fit=how, op=op, sweeps=sweeps,
    )


def price_line(sizes: list[int], medians: list[float], slope_bw: float,
               rounds: int = 3) -> tuple[float, float]:  # fmt: skip
    """The line the cost model prices with, t = e + S/b: (e, b), from the free fit's b.

    The price's intercept e is the least excess over the latency-bound sizes (:func:`_alpha`),
    not the free line's intercept c, and waits only ever add time, so c sits above e whenever
    a small size met a wait. A free line then drops its slope to reach those points, and a
    price that puts e under that slope misses the bandwidth-bound sizes: 14 cluster files
    here priced their own largest all-reduce 0–9% under its median (pz21: c 1.5 ms, e 0.7 ms,
    b 1.94 GB/s where the same sweep fitted through e reads 1.74). So b is refitted by least
    squares through (0, e), which the largest sizes dominate, and e is taken again under the
    new b; it settles in a round or two.
    """
    excess = 2 * _alpha(sizes, medians, slope_bw)
    for _ in range(rounds):
        den = sum(s * (t - excess) for s, t in zip(sizes, medians, strict=True))
        if den <= 0:
            break  # every size within its latency: keep the free fit's slope
        slope_bw = sum(s * s for s in sizes) / den
        excess = 2 * _alpha(sizes, medians, slope_bw)
    return excess, slope_bw


def sweep_flaws(op: str, sizes: list[int], medians: list[float], r2: float
                ) -> tuple[int, float, float]:  # fmt: skip
    """What makes a sweep worse, smallest first: how many checks it fails (a burst; an
    all-reduce's r² below _REPEAT_BELOW_R2), then the all-reduce's unexplained share, then
    how bent it is."""
    bend = superlinearity(sizes, medians)
    unexplained = 1.0 - r2 if op == "all_reduce" else 0.0
    failed = int(bend > _BURST) + int(unexplained > 1.0 - _REPEAT_BELOW_R2)
    return failed, unexplained, bend


def superlinearity(sizes: list[int], times: list[float]) -> float:
    """The largest t(S')/t(S) ÷ S'/S over consecutive sizes S < S': at most 1 when t = c + S/β."""
    steps = zip(sizes, sizes[1:], times, times[1:], strict=False)
    return max(((t2 / t1) / (s2 / s1) for s1, s2, t1, t2 in steps if t1 > 0 and s2 > s1),
               default=0.0)


def _alpha(sizes: list[int], medians: list[float], beta: float) -> float:
    """α from the latency-bound sizes: t(S) = 2α + S/β, so 2α ≤ t(S) − S/β at every S.

    Not the fit's intercept: a line through megabyte messages crosses zero wherever their
    noise puts it (often below it). Of the sizes where S/β is at most half the time, the one
    that exceeded S/β least bounds α best: on shared cores, a small all-reduce that lands
    while a concurrent pair moves megabytes waits for the scheduler, and a bound taken from
    one size alone would carry that wait.
    """
    excess = [t - s / beta for s, t in zip(sizes, medians, strict=True) if s / beta <= t / 2]
    return max(min(excess or [medians[0] - sizes[0] / beta]), 0.0) / 2


def measure_collectives(
    cfg: SweepConfig, device: torch.device, timeout: timedelta, report: Progress | None = None
) -> list[PairCollective] | None:
    """Run the collective tournament on every rank; rank 0 gets every pair and collective
    (:data:`OPS`), the others None."""
    report = report or (lambda event: None)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine: list[PairCollective] = []
    rounds = tournament_rounds(world)
    for rnd, pairs in enumerate(rounds):
        report({"phase": "all-reduce-round", "round": rnd, "rounds": len(rounds)})
        for a, b in pairs:
            if rank not in (a, b):
                continue
            report({"phase": "all-reduce-start", "round": rnd, "src": a, "dst": b})
            # Only the pair makes its group (the other pairs of the round make theirs at the
            # same time); the name is a hash of the two ranks, so every pair's is distinct.
            group = dist.new_group([a, b], timeout=timeout, use_local_synchronization=True)
            settle_gloo_loops()  # the new group's loop threads, as the run's will be
            try:
                # FSDP's collectives are swept as far as the all-reduce grew, up to
                # _FSDP_REACH: a sweep that stopped at 4 MiB, where one slow stretch (12.7 ms,
                # 1.5 ms in a plain loop) had stopped its growth, read gather β 165 MB/s where
                # 4-32 MiB all-gathers ran at 1.1-1.5 GB/s in a plain loop (gpt_small's FSDP
                # steps were predicted +47% to +73%).
                results = [_sweep_pair(a, b, rnd, cfg, device, group, report, OPS[0])]
                reach = min(max(results[0].sizes), _FSDP_REACH)
                results += [_sweep_pair(a, b, rnd, cfg, device, group, report, op, reach)
                            for op in OPS[1:]]
            finally:
                dist.destroy_process_group(group)
            if rank == a:
                mine += results
        dist.barrier()  # rounds do not overlap: a round's pairs are the only traffic
        report({"phase": "all-reduce-round-done", "round": rnd, "rounds": len(rounds)})
    return gather_on_rank0(mine, rank, world)


def ring_from_pair_line(ranks: list[int], pair_alpha_s: float, pair_beta_Bps: float) -> HostRing:
    """A host's ring from its sweep's fit as a pair reads it (t = 2α' + S/β'): the same line
    read as a ring of n, t = 2(n−1)α + 2(n−1)/n·S/β."""
    n = len(ranks)
    return HostRing(ranks=ranks, alpha_s=pair_alpha_s / (n - 1),
                    bandwidth_Bps=2 * (n - 1) / n * pair_beta_Bps)


@dataclass
class HostRingSweep:
    """One host's all-reduce over all its ranks: the sweep (as a pair's) and its ring."""

    host: str
    ranks: list[int]
    sweep: PairCollective

    @property
    def ring(self) -> HostRing:
        """The ring the sweep's fit gives (what Links.host_rings keeps)."""
        return ring_from_pair_line(self.ranks, self.sweep.alpha_s, self.sweep.bandwidth_Bps)


def measure_host_rings(
    cfg: SweepConfig, device: torch.device, timeout: timedelta, report: Progress | None = None
) -> list[HostRingSweep] | None:
    """Every rank: each host with 3 or more ranks all-reduces over all of them at once (hosts
    side by side); rank 0 gets every host's sweep, the others None.

    The pairs' sweep cannot see what a ring of more ranks than the host has cores pays: each
    of its 2(n−1) steps waits until both ends are scheduled (4 CPU ranks on 2 cores: a 4 KiB
    all-reduce took 7.4 ms, a pair's α/β priced 1.5 ms). The same sweep as a pair's, fitted to
    the ring's t = 2(n−1)α + 2(n−1)/n·S/β.
    """
    report = report or (lambda event: None)
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, host_name())
    groups = {h: [r for r in range(world) if hosts[r] == h] for h in dict.fromkeys(hosts)}
    mine: list[HostRingSweep] = []
    # Every rank makes every host's group, in the same order, so each gets a fresh name.
    made = {h: dist.new_group(ranks, timeout=timeout) for h, ranks in groups.items()
            if len(ranks) >= 3}
    settle_gloo_loops()
    for h, group in made.items():
        ranks = groups[h]
        if rank not in ranks:
            continue
        report({"phase": "host-ring-start", "host": h, "ranks": len(ranks)})
        swept = _sweep_pair(ranks[0], ranks[-1], -1, cfg, device, group, report, OPS[0])
        if rank == ranks[0]:
            mine.append(HostRingSweep(h, ranks, swept))
    dist.barrier()
    for group in made.values():
        if group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
    rings = gather_on_rank0(mine, rank, world)
    return None if rings is None else sorted(rings, key=lambda r: r.ranks)


def host_ring_block(sweeps: list[HostRingSweep]) -> dict[str, Any]:
    """The `measurement.collective.host_rings` entry: method, and each host's sweep and fit,
    so that a ring's α/β can be checked against the medians it came from."""
    return {
        "method": "all-reduce over each host's whole set of ranks (hosts with 3 or more, side "
        "by side), swept as a pair's (same sizes, passes, repeats and burst checks); the "
        "median per size fitted as a pair's (alpha_pair = half the least t - S/slope_beta "
        "over the latency-bound sizes, slope_beta through 2 alpha_pair), then as a ring of n: "
        "alpha = alpha_pair/(n-1) per ring step, beta = 2(n-1)/n slope_beta",
        "statistic": "per size, the slowest rank's median (and best) over the repeats",
        "rings": [
            {"host": s.host, "ranks": s.ranks, "sizes": s.sweep.sizes,
             "median_s": [float(f"{t:.6g}") for t in s.sweep.median_s],
             "best_s": [float(f"{t:.6g}") for t in s.sweep.best_s],
             "fit_intercept_s": s.sweep.fit_intercept_s, "slope_beta_Bps": s.sweep.bandwidth_Bps,
             "alpha_pair_s": s.sweep.alpha_s, "r2": s.sweep.r2, "fit": s.sweep.fit,
             "sweeps": s.sweep.sweeps, "alpha_s": s.ring.alpha_s,
             "bandwidth_Bps": s.ring.bandwidth_Bps}
            for s in sweeps
        ],
    }


def collective_matrices(
    n: int, results: list[PairCollective], op: str = "all_reduce"
) -> tuple[list[list[float]], list[list[float]]]:
    """Symmetric N×N α and β of one collective; the diagonal is 0, as in the point-to-point
    matrices."""
    lat = [[0.0] * n for _ in range(n)]
    bw = [[0.0] * n for _ in range(n)]
    for r in results:
        if r.op != op:
            continue
        for i, j in ((r.a, r.b), (r.b, r.a)):
            lat[i][j], bw[i][j] = r.alpha_s, r.bandwidth_Bps
    missing = [(i, j) for i in range(n) for j in range(i + 1, n) if bw[i][j] <= 0]
    assert not missing, f"pairs never measured: {missing[:5]}"
    return lat, bw


def collective_block(results: list[PairCollective]) -> dict[str, Any]:
    """The `measurement.collective` entry: method, statistic, and every pair's fit."""
    r2s = [r.r2 for r in results if r.op == "all_reduce"]
    return {
        "method": "2-rank all-reduce (sum, float32) per unordered pair in its own process group "
        "(new_group with use_local_synchronization), swept over the sizes; median time per size "
        "fitted to t = c + S/beta by least squares (fit_intercept_s is c); ring all-reduce on "
        "n=2 is t = 2 alpha + S/beta, so alpha = half the least t(S) - S/beta over the "
        "latency-bound sizes (S/beta <= t/2), at least 0, and beta = 1/slope of the "
        "least-squares line through t = 2 alpha at S = 0, alpha and beta taken in turn "
        "3 times from the free fit's beta (fit says which line was used). The same "
        "sweep for FSDP's all_gather_into_tensor (S = the gathered bytes) and "
        "reduce_scatter_tensor (S = the input's bytes), grown at least to the pair's largest "
        f"all-reduce size or {_FSDP_REACH >> 20} MiB, the smaller: on n=2 "
        "t = alpha + S/(2 beta) "
        "(entries with op; r2_min is the all-reduce's). A sweep in which a size took more than "
        f"{_BURST}x what the next smaller size's time allows under that line (a burst of "
        "load), or an all-reduce sweep with r2 below "
        f"{_REPEAT_BELOW_R2}, is taken again after {_SWEEP_GAP_S}s, up to {_SWEEPS} sweeps; "
        "the one failing the fewest of these checks is kept, then the best all-reduce r2, then "
        "the least bent (sweeps says how many ran)",
        "statistic": "per size, the slower rank's median over the repeats (at least iters, cheap "
        f"sizes up to {_MAX_ITERS} or about {_BUDGET_S}s), after warm-ups, spread over "
        f"{_PASSES} passes through all sizes; bests are kept too",
        "schedule": "the point-to-point tournament rounds; pairs of a round concurrently, "
        "rounds separated by a barrier",
        "diagonal": "0 (no all-reduce of a rank with itself)",
        "r2_min": min(r2s) if r2s else None,
        "pairs": [
            {"a": r.a, "b": r.b, "round": r.round, "op": r.op, "sizes": r.sizes,
             "median_s": [float(f"{t:.6g}") for t in r.median_s],
             "best_s": [float(f"{t:.6g}") for t in r.best_s],
             "fit_intercept_s": r.fit_intercept_s, "alpha_s": r.alpha_s,
             "bandwidth_Bps": r.bandwidth_Bps, "r2": r.r2, "fit": r.fit, "sweeps": r.sweeps,
             # bytes / time of the largest size (nccl-tests' algbw), next to the fitted β.
             "algbw_largest_Bps": float(f"{r.sizes[-1] / r.median_s[-1]:.6g}")}
            for r in sorted(results, key=lambda r: (r.a, r.b, OPS.index(r.op)))
        ],
    }
