"""Communication cost on measured links: the α-β model for point-to-point and ring collectives.

Every formula charges the actual links the ring or transfer uses, taken from the cluster's
measured (or declared) N×N matrices; nothing assumes that a host boundary makes a link slow.
This module is the only place in pdv that writes a transfer or collective formula: the
simulator, the stage DP and CP-SAT all price communication through it.

Sources: point-to-point t = α + S/β (Hockney); ring collectives as in nccl-tests
(PERFORMANCE.md: all-reduce moves 2(n−1)/n·S per rank in 2(n−1) steps, all-gather and
reduce-scatter (n−1)/n·S in n−1 steps). A ring runs at the pace of its slowest hop, so the ring
uses the minimum bandwidth and maximum latency over its hops.

FSDP's all-gather and reduce-scatter are priced on their own measured 2-rank α/β
(``Links.gather_*`` / ``scatter_*``) where the cluster has them: gloo on CPU ran a reduce-scatter
as slowly as an all-reduce of the same input, twice the ring formula on the all-reduce's β.

A hop's α/β for collectives come from the cluster's measured 2-rank all-reduces
(``Links.collective_*``) where it has them: a backend's collective also copies and reduces what
it moves, which point-to-point transfers do not (gloo on CPU measured several times slower per
byte than send/recv here). A ring of n ranks is priced from its hops' pair measurements; without
them the point-to-point matrices price the ring.

A message also costs its sender and its receiver CPU besides the wire (gloo on CPU moves it
with the ranks' own cores: the copy, the system calls, the backend thread's wake-up). That is
:func:`message_cpu_time`, from each rank's measured line (RankOverheads.send_cpu / recv_cpu); it
is compute time of the op that sends or receives, not link time.

The collective times take a byte count or a numpy array of them (one per layer, or one per
layer range for the stage DP) and answer in kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np

from pdv.artifacts import Links, MessageCost

__all__ = [
    "Ring",
    "p2p_time",
    "pairs_time",
    "ring_hops",
    "ring_link",
    "ring_of",
    "all_reduce_time",
    "all_reduce_linear",
    "exchange_time",
    "all_gather_time",
    "reduce_scatter_time",
    "message_cpu_time",
]

Bytes = TypeVar("Bytes", float, np.ndarray)


class Ring(NamedTuple):
    """A collective's ring as its cost sees it: n ranks paced by the slowest hop's α and β.

    A tuple, so the planner's caches hash and compare it at C speed.
    """

    n: int
    alpha: float
    beta: float
    gather_alpha: float = 0.0
    """α/β of the ring's all-gather where the cluster measured it (β 0: use alpha/beta)"""
    gather_beta: float = 0.0
    scatter_alpha: float = 0.0
    """α/β of the ring's reduce-scatter where measured (β 0: use alpha/beta)"""
    scatter_beta: float = 0.0


def p2p_time(links: Links, src: int, dst: int, nbytes: float) -> float:
    """Time to send nbytes from rank src to rank dst: α + S/β on that ordered link."""
    if src == dst or nbytes <= 0:
        return 0.0
    return links.latency_s[src][dst] + nbytes / links.bandwidth_Bps[src][dst]


def exchange_time(links: Links, src: int, dst: int, alone: bool = False) -> float:
    """What one exchange src → dst pays after compute beyond its messages' α + S/β
    (Links.exchange_latency_s, or with `alone` its value while the host's other ranks idle,
    Links.exchange_latency_alone_s where measured; 0 where unmeasured). Once per boundary,
    not per tensor: the executors post a boundary's tensors together, and the wait is for the
    ranks' threads to run, which the tensors share (tuples_tied's 3-tensor boundaries priced
    per tensor read +20-30% against -6 to -15% without the term)."""
    extra = links.exchange_latency_s
    if alone and links.exchange_latency_alone_s is not None:
        extra = links.exchange_latency_alone_s
    return extra[src][dst] if extra is not None and src != dst else 0.0


def pairs_time(links: Links, pairs: Sequence[tuple[int, int]], nbytes: np.ndarray,
               ahead: np.ndarray | float = 1.0, back: np.ndarray | float = 1.0) -> np.ndarray:
    """Activations over every (sender, receiver) pair at once and their gradients back.

    Each direction is paced by its worst pair: n·α + S/β on the ordered link for a boundary of
    n tensors (`ahead` forward, `back` carrying gradients; one message each, broadcast against
    nbytes), plus each direction's :func:`exchange_time` once; one entry per element of nbytes.
    """
    fwd = np.zeros_like(nbytes)
    bwd = np.zeros_like(nbytes)
    for s, d in pairs:
        a1, b1 = links.latency_s[s][d], links.bandwidth_Bps[s][d]
        a2, b2 = links.latency_s[d][s], links.bandwidth_Bps[d][s]
        fwd = np.maximum(fwd, ahead * a1 + exchange_time(links, s, d) + nbytes / b1)
        bwd = np.maximum(bwd, back * a2 + exchange_time(links, d, s) + nbytes / b2)
    return np.where(nbytes > 0, fwd + np.where(np.asarray(back) > 0, bwd, 0.0), 0.0)


def ring_hops(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The directed hops of the ring a process group over these ranks runs (r0→r1→…→r0).

    torch.distributed.new_group (and DeviceMesh) sort a group's ranks, and gloo's ring follows
    group-rank order, so the ring is in ascending global rank whatever order a plan lists.
    """
    ring = sorted(ranks)
    n = len(ring)
    return [(ring[i], ring[(i + 1) % n]) for i in range(n)] if n > 1 else []


def ring_link(links: Links, ranks: Sequence[int]) -> tuple[float, float]:
    """(α, β) of a ring: the slowest hop sets the pace (max latency, min bandwidth)."""
    hops = ring_hops(ranks)
    if not hops:
        return 0.0, float("inf")
    lat = links.collective_latency_s or links.latency_s
    bw = links.collective_bandwidth_Bps or links.bandwidth_Bps
    alpha = max(lat[s][d] for s, d in hops)
    beta = min(bw[s][d] for s, d in hops)
    return alpha, beta


def _slowest_hop(lat: list[list[float]], bw: list[list[float]],
                 hops: list[tuple[int, int]]) -> tuple[float, float]:  # fmt: skip
    return max(lat[s][d] for s, d in hops), min(bw[s][d] for s, d in hops)


def ring_of(links: Links, ranks: Sequence[int]) -> Ring:
    """The ring a process group over these ranks runs, priced on the links.

    Where the cluster measured FSDP's all-gather and reduce-scatter per pair, the ring carries
    their α/β too (the slowest hop's), and :func:`all_gather_time` /
    :func:`reduce_scatter_time` price with them. Where it measured a host's ranks all-reducing
    as one group (``Links.host_rings``), a ring with three or more of them is no faster.
    """
    ring = Ring(len(ranks), *ring_link(links, ranks))
    hops = ring_hops(ranks)
    if not hops:
        return ring
    # Three or more of the ring's ranks on a host measured as a whole: each ring step there
    # waits on that host's scheduler as the measured group's did (4 CPU ranks on 2 cores: 5-7
    # ms for a 4 KiB-1 MiB all-reduce that pairs' α/β priced at 1.5-3.1 ms). The whole host is
    # the only group measured, so a ring of fewer of its ranks is priced as the whole.
    mine = set(ranks)
    for host in links.host_rings or ():
        if len(mine.intersection(host.ranks)) >= 3:
            ring = ring._replace(alpha=max(ring.alpha, host.alpha_s),
                                 beta=min(ring.beta, host.bandwidth_Bps))
    if links.gather_latency_s is not None and links.gather_bandwidth_Bps is not None:
        a, b = _slowest_hop(links.gather_latency_s, links.gather_bandwidth_Bps, hops)
        ring = ring._replace(gather_alpha=a, gather_beta=b)
    if links.scatter_latency_s is not None and links.scatter_bandwidth_Bps is not None:
        a, b = _slowest_hop(links.scatter_latency_s, links.scatter_bandwidth_Bps, hops)
        ring = ring._replace(scatter_alpha=a, scatter_beta=b)
    return ring


def all_reduce_time(ring: Ring, nbytes: Bytes) -> Bytes:
    """Ring all-reduce of nbytes per rank: 2(n−1)/n·S/β + 2(n−1)α (0 for nothing to move)."""
    n, alpha, beta = ring.n, ring.alpha, ring.beta
    if n <= 1:
        return nbytes * 0.0
    return (2 * (n - 1) / n * nbytes / beta + 2 * (n - 1) * alpha) * (nbytes > 0)


def all_reduce_linear(ring: Ring) -> tuple[float, float]:
    """all_reduce_time as (seconds per byte, seconds per call) for a solver's linear model."""
    n = ring.n
    if n <= 1:
        return 0.0, 0.0
    return 2 * (n - 1) / n / ring.beta, 2 * (n - 1) * ring.alpha


def _half_ring(n: int, alpha: float, beta: float, nbytes: Bytes) -> Bytes:
    if n <= 1:
        return nbytes * 0.0
    return ((n - 1) / n * nbytes / beta + (n - 1) * alpha) * (nbytes > 0)


def all_gather_time(ring: Ring, nbytes: Bytes) -> Bytes:
    """Ring all-gather producing nbytes per rank: (n−1)/n·S/β + (n−1)α (0 for nothing), on
    the measured all-gather α/β where the ring has them."""
    if ring.gather_beta > 0:
        return _half_ring(ring.n, ring.gather_alpha, ring.gather_beta, nbytes)
    return _half_ring(ring.n, ring.alpha, ring.beta, nbytes)


def reduce_scatter_time(ring: Ring, nbytes: Bytes) -> Bytes:
    """Ring reduce-scatter of nbytes per rank: the all-gather's volume and steps, on the
    measured reduce-scatter α/β where the ring has them."""
    if ring.scatter_beta > 0:
        return _half_ring(ring.n, ring.scatter_alpha, ring.scatter_beta, nbytes)
    return _half_ring(ring.n, ring.alpha, ring.beta, nbytes)


def message_cpu_time(cost: MessageCost | None, nbytes: float, messages: int = 1) -> float:
    """CPU one rank spends sending (or receiving) `messages` messages of nbytes in all, posted
    together to one peer: a once, the batched a for each message after the first, b·S (0
    unmeasured). A file without the batch probe prices each message at a."""
    if cost is None or nbytes <= 0 or messages < 1:
        return 0.0
    extra = cost.a_s if cost.batched_a_s is None else cost.batched_a_s
    return cost.a_s + (messages - 1) * extra + cost.b_s_per_byte * nbytes
