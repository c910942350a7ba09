"""Devices → islands → one chain, from the measured bandwidth matrix (never from host names).

Islands. Two devices are linked strongly when the slower direction of their link carries at
least ``ISLAND_RATIO`` (one half) of what the better-connected of the two sees on its own best
link, i.e. ``min(β[i][j], β[j][i]) ≥ ρ · min(best_i, best_j)``. Islands are the connected
components of the strong links. The ratio is relative, so the same rule finds NVLink boxes on
InfiniBand, PCIe boxes on a faster fabric (one big island), or a cluster whose links are all
alike (one island).

Chain. Stages take contiguous slices of one device order, so neighbours in the order should be
joined by fast links. Islands are chained to maximize the sum of the bandwidth between
neighbouring islands (median of the cross links): exact (Held–Karp over subsets) up to
``EXACT_LIMIT`` islands, greedy nearest-neighbour plus 2-opt beyond. Devices inside an island
are chained by the same rule on single links. Ties break by the lowest index, so the order is
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pdv.artifacts import ClusterArtifact, Links

__all__ = [
    "ISLAND_RATIO",
    "EXACT_LIMIT",
    "symmetric_bandwidth",
    "islands",
    "best_chain",
    "chain_value",
    "device_order",
]

ISLAND_RATIO = 0.5
EXACT_LIMIT = 10


def symmetric_bandwidth(links: Links) -> np.ndarray:
    """min(β[i][j], β[j][i]): a pipeline or ring uses both directions, the slower one paces it."""
    bw = np.array(links.bandwidth_Bps, dtype=float)
    sym = np.minimum(bw, bw.T)
    np.fill_diagonal(sym, 0.0)
    return sym


def islands(links: Links, ratio: float = ISLAND_RATIO) -> list[list[int]]:
    """Connected components of the strong links, each sorted, listed by their smallest rank."""
    sym = symmetric_bandwidth(links)
    return _islands_of(sym, list(range(sym.shape[0])), ratio)


def chain_value(weight: np.ndarray, order: Sequence[int]) -> float:
    """Sum of the weights between neighbours of a chain."""
    return float(sum(weight[order[k], order[k + 1]] for k in range(len(order) - 1)))


def _exact_chain(weight: np.ndarray) -> list[int]:
    # Held–Karp on paths: best[mask][last] = best chain value over the nodes in mask ending at last.
    n = weight.shape[0]
    full = (1 << n) - 1
    best = np.full((1 << n, n), -np.inf)
    back = np.full((1 << n, n), -1, dtype=int)
    for i in range(n):
        best[1 << i, i] = 0.0
    for mask in range(1, full + 1):
        for last in range(n):
            value = best[mask, last]
            if value == -np.inf:
                continue
            for nxt in range(n):
                if mask >> nxt & 1:
                    continue
                m2 = mask | 1 << nxt
                cand = value + weight[last, nxt]
                if cand > best[m2, nxt]:
                    best[m2, nxt] = cand
                    back[m2, nxt] = last
    last = int(np.argmax(best[full]))
    order, mask = [], full
    while last >= 0:
        order.append(last)
        prev = int(back[mask, last])
        mask &= ~(1 << last)
        last = prev
    order.reverse()
    # A chain and its reverse are worth the same; start from the lower index for determinism.
    return order if order[0] <= order[-1] else order[::-1]


def _greedy_chain(weight: np.ndarray) -> list[int]:
    n = weight.shape[0]
    order, used = [0], {0}
    while len(order) < n:
        last = order[-1]
        nxt = max((j for j in range(n) if j not in used), key=lambda j: (weight[last, j], -j))
        order.append(nxt)
        used.add(nxt)
    improved = True
    while improved:  # 2-opt: reverse a segment when that raises the two boundary weights
        improved = False
        for a in range(n - 1):
            for b in range(a + 1, n):
                before = (weight[order[a - 1], order[a]] if a > 0 else 0.0) + (
                    weight[order[b], order[b + 1]] if b + 1 < n else 0.0
                )
                after = (weight[order[a - 1], order[b]] if a > 0 else 0.0) + (
                    weight[order[a], order[b + 1]] if b + 1 < n else 0.0
                )
                if after > before * (1 + 1e-12) + 1e-300:
                    order[a : b + 1] = order[a : b + 1][::-1]
                    improved = True
    return order


def best_chain(weight: np.ndarray) -> list[int]:
    """An order of the nodes maximizing the sum of neighbour weights (exact for small n)."""
    n = weight.shape[0]
    off = weight[~np.eye(n, dtype=bool)]
    if n <= 2 or np.all(off == off[0]):  # all links alike: every order is as good
        return list(range(n))
    key = weight.tobytes()
    if key not in _CHAIN_CACHE:  # declared clusters repeat the same island many times
        _CHAIN_CACHE[key] = _exact_chain(weight) if n <= EXACT_LIMIT else _greedy_chain(weight)
    return list(_CHAIN_CACHE[key])


_CHAIN_CACHE: dict[bytes, list[int]] = {}


def _islands_of(sym: np.ndarray, ranks: list[int], ratio: float) -> list[list[int]]:
    # A link is strong when it is at least `ratio` of both ends' best links.
    sub = sym[np.ix_(ranks, ranks)]
    n = len(ranks)
    best = sub.max(axis=1) if n > 1 else np.zeros(1)
    strong = sub >= ratio * np.minimum.outer(best, best)
    np.fill_diagonal(strong, False)
    seen = [False] * n
    out: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            i = stack.pop()
            comp.append(ranks[i])
            for j in np.flatnonzero(strong[i]):
                if not seen[j]:
                    seen[j] = True
                    stack.append(int(j))
        out.append(sorted(comp))
    return out


def _chain_order(sym: np.ndarray, ranks: list[int], ratio: float) -> list[int]:
    parts = _islands_of(sym, ranks, ratio)
    inner = [[part[k] for k in best_chain(sym[np.ix_(part, part)])] for part in parts]
    k = len(parts)
    between = np.zeros((k, k))
    for a in range(k):
        for b in range(a + 1, k):
            cross = sym[np.ix_(parts[a], parts[b])]
            between[a, b] = between[b, a] = float(np.median(cross))
    order: list[int] = []
    for idx in best_chain(between):
        order.extend(inner[idx])
    return order


def device_order(
    cluster: ClusterArtifact | Links,
    ratio: float = ISLAND_RATIO,
    slowness: Sequence[float] | None = None,
) -> list[int]:
    """Global ranks in pipeline order: islands chained by bandwidth, devices chained inside.

    With `slowness` (time multiplier per rank), devices are first split into speed classes,
    fastest first, and each class is chained on its own: slow devices gather at the end of the
    order, where a pipeline may leave them unused.
    """
    links = cluster.links if isinstance(cluster, ClusterArtifact) else cluster
    sym = symmetric_bandwidth(links)
    ranks = list(range(sym.shape[0]))
    if slowness is None:
        return _chain_order(sym, ranks, ratio)
    classes = sorted({round(float(x), 6) for x in slowness})
    order: list[int] = []
    for c in classes:
        members = [r for r in ranks if round(float(slowness[r]), 6) == c]
        order.extend(_chain_order(sym, members, ratio))
    return order
