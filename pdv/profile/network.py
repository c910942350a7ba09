"""Latency α and bandwidth β of every ordered pair of ranks, measured in a process group.

Method (nccl-tests style, point to point): for each ordered pair (src → dst) the sender sends
messages of 1 byte and then of the sweep's sizes S, each answered by a 1-byte ack, after
warm-ups, and keeps the best round trip per size (ranks may share CPUs: the minimum is the link,
the rest is scheduling noise; medians are kept too). Round trips are fitted by least squares to
rt(S) = c + S/β; the slope gives β, dominated by the large messages as bandwidth should be.

α and the one-way time. Clocks of two hosts are not synchronized, so the sender times the whole
round trip, S bytes forward and 1 byte back, on its own clock. The ack is the same for every S,
so it moves only the intercept, never the slope: β is strictly the sender → receiver bandwidth,
and an asymmetric link shows up as different β[i][j] and β[j][i] (row = sender). α is half the
best 1-byte round trip (a tiny message each way; small-message latency taken as symmetric; a
larger message's round trip, where faster, bounds it better and is used instead),
measured directly rather than read off the fit's intercept: the intercept of a line fitted to
megabyte messages is not a latency (a token bucket's burst makes it negative, CPU noise makes it
anything); it is kept in the artifact as `fit_intercept_s`. One-way time of S bytes: rt(S) − α.

Schedule. Pairs run as a round-robin tournament (circle method): N−1 rounds (N even; a bye
each round when N is odd) in which every rank meets exactly one partner, so pairs of one round
are disjoint and run concurrently; within a pair the two directions run one after the other.
Concurrent pairs can share a physical link (a host NIC, a switch uplink, one namespace's lo)
and then measure less than the link gives a lone pair; the artifact says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "DEFAULT_SIZES",
    "PairResult",
    "SweepConfig",
    "fit_line",
    "gather_on_rank0",
    "link_matrices",
    "measure_links",
    "measurement_block",
    "tournament_rounds",
]

KiB, MiB = 1024, 1024 * 1024
DEFAULT_SIZES = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SweepConfig:
    """How each ordered pair is measured."""

    sizes: tuple[int, ...] = DEFAULT_SIZES
    iters: int = 5
    warmup: int = 2
    # Fast links: keep multiplying the largest size by 4 while one message takes less than
    # grow_until_s, up to max_size, so the fit is not made of latency-bound points only.
    max_size: int = 64 * MiB
    grow_until_s: float = 0.01


@dataclass
class PairResult:
    """One ordered pair src → dst: the sweep and its fit."""

    src: int
    dst: int
    round: int
    sizes: list[int]
    rtt_s: list[float] = field(repr=False)  # best round trip per size (S forward, 1 B back)
    one_way_s: list[float] = field(repr=False)  # best round trip per size, minus the ack (α)
    median_one_way_s: list[float] = field(repr=False)
    rtt_1byte_s: float  # best 1-byte round trip
    fit_intercept_s: float  # intercept of the round-trip fit (not α; see the module docstring)
    alpha_s: float
    bandwidth_Bps: float
    r2: float
    fit: str  # how the line was fitted, or why a fallback was used


def tournament_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Circle-method round robin: N−1 rounds (N if odd, with a bye) of disjoint pairs (a < b)."""
    if n < 2:
        return []
    players: list[int | None] = list(range(n))
    if n % 2:
        players.append(None)  # the bye
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = players[i], players[m - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(sorted(pairs))
        # Keep the first player fixed and rotate the others one seat.
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def fit_line(sizes: list[int], times: list[float]) -> tuple[float, float, float, str]:
    """Least-squares t = c + S/β; returns (c, β, r², how), or a fallback where unusable."""
    assert len(sizes) == len(times) >= 2
    n = len(sizes)
    mean_s, mean_t = sum(sizes) / n, sum(times) / n
    sxx = sum((s - mean_s) ** 2 for s in sizes)
    sxy = sum((s - mean_s) * (t - mean_t) for s, t in zip(sizes, times, strict=True))
    slope = sxy / sxx if sxx > 0 else 0.0
    if slope <= 0:
        # Every size costs the same within noise (latency-bound): β from the largest message.
        big = max(range(n), key=lambda k: sizes[k])
        return min(times), sizes[big] / times[big], 0.0, "fallback: no positive slope"
    c = mean_t - slope * mean_s
    ss_tot = sum((t - mean_t) ** 2 for t in times)
    ss_res = sum((t - (c + slope * s)) ** 2 for s, t in zip(sizes, times, strict=True))
    return c, 1.0 / slope, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, "least squares"


class _Peer:
    """Point-to-point with one partner, with the device synchronization timing needs."""

    def __init__(self, peer: int, device: torch.device) -> None:
        self.peer, self.device = peer, device
        self.ack = torch.zeros(1, dtype=torch.uint8, device=device)
        self.ctl = torch.zeros(2, dtype=torch.int64, device=device)  # (size, count)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def send(self, t: torch.Tensor) -> None:
        dist.send(t, self.peer)

    def recv(self, t: torch.Tensor) -> None:
        dist.recv(t, self.peer)


def _rtt(p: _Peer, buf: torch.Tensor, count: int, warmup: int) -> tuple[float, float]:
    """Sender side: (best, median) over `count` of (send buf, receive 1-byte ack), seconds."""
    samples = []
    for i in range(warmup + count):
        p.sync()
        t0 = time.perf_counter()
        p.send(buf)
        p.recv(p.ack)
        p.sync()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return min(samples), statistics.median(samples)


def _echo(p: _Peer, buf: torch.Tensor, count: int, warmup: int) -> None:
    """Receiver side of _rtt."""
    for _ in range(warmup + count):
        p.recv(buf)
        p.send(p.ack)


# Cheap messages are repeated until about this much time is spent on a size (up to
# _MAX_ITERS): more samples make the best-of statistic reliable where a sample costs little.
_BUDGET_S, _MAX_ITERS = 0.02, 64


def _send_direction(p: _Peer, me: int, rnd: int, cfg: SweepConfig, report: Progress) -> PairResult:
    """Sender: the sweep (1 B first), each size and count announced on a control message."""
    sizes, best, medians = [], [], []
    pending, count = [1, *cfg.sizes], _MAX_ITERS
    while pending:
        size = pending.pop(0)
        p.ctl[0], p.ctl[1] = size, count
        p.send(p.ctl)
        t, med = _rtt(p, torch.empty(size, dtype=torch.uint8, device=p.device), count, cfg.warmup)
        sizes.append(size)
        best.append(t)
        medians.append(med)
        report({"phase": "pair", "round": rnd, "src": me, "dst": p.peer, "size": size})
        # The next size costs at least this one: size the next count by this time.
        count = max(cfg.iters, min(_MAX_ITERS, int(_BUDGET_S / max(t, 1e-9))))
        if not pending and t < cfg.grow_until_s and size * 4 <= cfg.max_size:
            pending.append(size * 4)
    p.ctl.fill_(0)
    p.send(p.ctl)  # size 0 = sweep done
    c, beta, r2, how = fit_line(sizes, best)
    # Half the 1-byte round trip (see the module docstring). A round trip cannot get faster
    # with size, so a larger message that came back sooner bounds it better: a noisy window
    # (a rank descheduled on a shared CPU) during the 1-byte step then does not inflate α.
    alpha = min(best) / 2
    return PairResult(
        src=me, dst=p.peer, round=rnd, sizes=sizes, rtt_s=best,
        one_way_s=[max(t - alpha, 0.0) for t in best],
        median_one_way_s=[max(t - alpha, 0.0) for t in medians],
        rtt_1byte_s=best[0], fit_intercept_s=c, alpha_s=alpha, bandwidth_Bps=beta, r2=r2,
        fit=how,
    )


def _recv_direction(p: _Peer, me: int, rnd: int, cfg: SweepConfig, report: Progress) -> None:
    """Receiver: answer every announced size until the size-0 control message."""
    while True:
        p.recv(p.ctl)
        size, count = int(p.ctl[0].item()), int(p.ctl[1].item())
        if size == 0:
            return
        _echo(p, torch.empty(size, dtype=torch.uint8, device=p.device), count, cfg.warmup)
        report({"phase": "pair", "round": rnd, "src": p.peer, "dst": me, "size": size})


def measure_links(
    cfg: SweepConfig, device: torch.device, report: Progress | None = None
) -> list[PairResult] | None:
    """Run the tournament on every rank; rank 0 gets every pair's result, the others None."""
    report = report or (lambda event: None)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine: list[PairResult] = []
    rounds = tournament_rounds(world)
    for rnd, pairs in enumerate(rounds):
        report({"phase": "round", "round": rnd, "rounds": len(rounds)})
        for a, b in pairs:
            if rank not in (a, b):
                continue
            peer = b if rank == a else a
            p = _Peer(peer, device)
            # Lower rank sends first; then the directions swap, so row = sender both times.
            for src in (a, b):
                report({"phase": "pair-start", "round": rnd, "src": src,
                        "dst": b if src == a else a})
                if src == rank:
                    mine.append(_send_direction(p, rank, rnd, cfg, report))
                else:
                    _recv_direction(p, rank, rnd, cfg, report)
        dist.barrier()  # rounds do not overlap: a round's pairs are the only traffic
        report({"phase": "round-done", "round": rnd, "rounds": len(rounds)})
    return gather_on_rank0(mine, rank, world)


def gather_on_rank0(mine: list[T], rank: int, world: int) -> list[T] | None:
    """Every rank's results, concatenated in rank order on rank 0; None on the others."""
    gathered: list[list[T]] | None = [[] for _ in range(world)] if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    return [r for part in gathered for r in part]


def link_matrices(
    n: int, results: list[PairResult]
) -> tuple[list[list[float]], list[list[float]]]:
    """N×N latency and bandwidth (row = sender); the diagonal is 0 (no rank sends to itself)."""
    lat = [[0.0] * n for _ in range(n)]
    bw = [[0.0] * n for _ in range(n)]
    for r in results:
        lat[r.src][r.dst] = r.alpha_s
        bw[r.src][r.dst] = r.bandwidth_Bps
    missing = [(i, j) for i in range(n) for j in range(n) if i != j and bw[i][j] <= 0]
    assert not missing, f"pairs never measured: {missing[:5]}"
    return lat, bw


def measurement_block(
    n: int, cfg: SweepConfig, results: list[PairResult], backend: str
) -> dict[str, Any]:
    """The artifact's `measurement`: method, schedule, concurrency, and every pair's fit."""
    r2s = [r.r2 for r in results]
    return {
        "method": "point-to-point send/recv sweep (1 B, then the sizes), round trips fitted to "
        "rt = c + S/beta by least squares (nccl-tests methodology); beta = 1/slope; "
        "one direction at a time (row = sender)",
        "one_way_time": "sender times S bytes forward + 1-byte ack back on its own clock; the ack "
        "moves only the intercept, not beta; alpha = half the best 1-byte round trip "
        "(or of any larger message if that came back sooner) "
        "(small-message latency taken as symmetric); one-way(S) = rt(S) - alpha",
        "iterations": f"at least iters per size; cheap sizes repeated up to {_MAX_ITERS} times "
        f"or about {_BUDGET_S}s per size",
        "backend": backend,
        "sizes_bytes": list(cfg.sizes),
        "max_size_bytes": cfg.max_size,
        "grow_until_s": cfg.grow_until_s,
        "iters": cfg.iters,
        "warmup": cfg.warmup,
        "statistic": "fit on the best (minimum) round trip per size: a capacity measurement "
        "robust to CPU scheduling noise; medians are kept per pair",
        "schedule": "round-robin tournament (circle method)",
        "rounds": [[list(p) for p in rnd] for rnd in tournament_rounds(n)],
        "concurrency": "pairs of one round run concurrently (disjoint ranks); the two directions "
        "of a pair run one after the other; rounds are separated by a barrier. Pairs that share a "
        "physical link (host NIC, uplink, one namespace's lo) can slow each other, so a "
        "shared link may measure below its lone-pair bandwidth.",
        "diagonal": "0 (a rank does not send to itself)",
        "r2_min": min(r2s) if r2s else None,
        "pairs": [
            {k: v for k, v in asdict(r).items() if not k.endswith("_s") or k == "alpha_s"}
            | {k: [float(f"{t:.6g}") for t in getattr(r, k)]
               for k in ("rtt_s", "one_way_s", "median_one_way_s")}
            | {"rtt_1byte_s": r.rtt_1byte_s, "fit_intercept_s": r.fit_intercept_s,
               # nccl-tests' algbw (bytes / time) of the largest message, round trip included:
               # a lower bound next to the fitted β.
               "algbw_largest_Bps": float(f"{r.sizes[-1] / r.rtt_s[-1]:.6g}")}
            for r in sorted(results, key=lambda r: (r.src, r.dst))
        ],
    }
