"""Devices → islands → one chain, from the measured bandwidth matrix (never from host names).

Classes by relative gaps. A measured matrix is never two-valued: links of one class scatter
(±10% between pairs of one class on this machine). Values are put into classes by the gaps
between them: sorted from the largest, a value more than ``GAP`` (25%) below the one before it
starts a new class; values closer than that stay in one class however many there are. With
±10% noise two links of one class are at most 1.1/0.9 = 1.22× apart, under the tolerance; two
link classes a hierarchy would tell apart (NVLink and a NIC, a PCIe switch and a fabric) are
several times apart. The same rule groups device speeds and memory sizes (:func:`classes`).

Islands. Each device's *near* links are its links in its own top class (everything down to
the first gap in its sorted links; all of them when there is no gap). Two devices are joined
when each is near to the other, and islands are the connected components of those joins. So
NVLink boxes on a slower fabric are islands of one box each, PCIe-only boxes whose fabric is
faster than their PCIe form one island of all of them (what joins them is the fabric), a
cluster whose links are all alike within the tolerance is one island, and a matrix with no
pattern at all gives whatever its gaps say, down to islands of one device.

Chain. Stages take contiguous slices of one device order, so neighbours in the order should be
joined by fast links. Islands are chained to maximize the sum of the bandwidth between
neighbouring islands (median of the cross links): exact (Held–Karp over subsets) up to
``EXACT_LIMIT`` islands, greedy nearest-neighbour plus 2-opt beyond. Devices inside an island
are chained by the same rule on single links, unless the island is flat (all its links in one
class): then any order is as good within the tolerance and the island keeps rank order. Ties
break by the lowest index, so the order is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pdv.artifacts import ClusterArtifact, Links

__all__ = [
    "GAP",
    "EXACT_LIMIT",
    "classes",
    "symmetric_bandwidth",
    "islands",
    "best_chain",
    "chain_value",
    "device_order",
    "folded",
]

GAP = 0.25
"""relative gap between consecutive sorted values that separates two classes"""
EXACT_LIMIT = 10
_TWO_OPT_PASSES = 8
"""2-opt sweeps at most on a big chain (each is O(n²) work, vectorized per segment start)"""


def classes(values: Sequence[float], gap: float = GAP) -> list[int]:
    """Class of each value, 0 for the largest: sorted descending, a step of more than `gap`
    (relative to the larger value's successor) starts the next class."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return []
    idx = np.argsort(-x, kind="stable")
    s = x[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        step = s[:-1] > s[1:] * (1 + gap)
    level = np.concatenate([[0], np.cumsum(step)])
    out = np.empty(x.size, dtype=int)
    out[idx] = level
    return [int(v) for v in out]


def symmetric_bandwidth(links: Links) -> np.ndarray:
    """min(β[i][j], β[j][i]): a pipeline or ring uses both directions, the slower one paces it."""
    bw = np.array(links.bandwidth_Bps, dtype=float)
    sym = np.minimum(bw, bw.T)
    np.fill_diagonal(sym, 0.0)
    return sym


def _near(sym: np.ndarray, gap: float) -> np.ndarray:
    # Each row's links down to the first gap of more than `gap` (its top class).
    n = sym.shape[0]
    if n < 2:
        return np.zeros((n, n), dtype=bool)
    off = sym[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    s = -np.sort(-off, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = s[:, :-1] > s[:, 1:] * (1 + gap)
    gaps = step.any(axis=1)
    first = np.where(gaps, np.argmax(step, axis=1), n - 2) if n > 2 else np.zeros(n, dtype=int)
    threshold = s[np.arange(n), first]
    near = sym >= threshold[:, None]
    np.fill_diagonal(near, False)
    return near


def _components(joined: np.ndarray, ranks: list[int]) -> list[list[int]]:
    n = len(ranks)
    seen = np.zeros(n, dtype=bool)
    out: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            i = stack.pop()
            comp.append(ranks[i])
            nxt = np.flatnonzero(joined[i] & ~seen)
            seen[nxt] = True
            stack.extend(int(j) for j in nxt)
        out.append(sorted(comp))
    return out


def _islands_of(sym: np.ndarray, ranks: list[int], gap: float) -> list[list[int]]:
    sub = sym[np.ix_(ranks, ranks)]
    near = _near(sub, gap)
    return _components(near & near.T, ranks)


def islands(links: Links, gap: float = GAP) -> list[list[int]]:
    """Islands of mutually near devices (see the module docstring), each sorted, listed by
    their smallest rank."""
    sym = symmetric_bandwidth(links)
    return _islands_of(sym, list(range(sym.shape[0])), gap)


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
    order, free = [0], np.ones(n, dtype=bool)
    free[0] = False
    for _ in range(n - 1):
        row = np.where(free, weight[order[-1]], -np.inf)
        nxt = int(np.argmax(row))  # the lowest index among equals
        order.append(nxt)
        free[nxt] = False
    return _two_opt(weight, order)


def _two_opt(weight: np.ndarray, chain: list[int]) -> list[int]:
    # Reverse a segment [a, b] when that raises the two weights at its ends; for each a, every
    # b is tried at once. A bounded number of sweeps: each sweep only improves the chain.
    order = np.array(chain)
    n = len(order)
    for _ in range(_TWO_OPT_PASSES):
        improved = False
        for a in range(n - 1):
            b = np.arange(a + 1, n)
            left = weight[order[a - 1], order[a]] if a > 0 else 0.0
            right = np.where(b + 1 < n, weight[order[b], order[np.minimum(b + 1, n - 1)]], 0.0)
            new_left = weight[order[a - 1], order[b]] if a > 0 else np.zeros(len(b))
            new_right = np.where(b + 1 < n, weight[order[a], order[np.minimum(b + 1, n - 1)]], 0.0)
            gain = new_left + new_right - (left + right)
            k = int(np.argmax(gain))
            if gain[k] > (left + right[k]) * 1e-12 + 1e-300:
                order[a : b[k] + 1] = order[a : b[k] + 1][::-1].copy()
                improved = True
        if not improved:
            break
    return [int(x) for x in order]


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


def _flat(weight: np.ndarray, gap: float) -> bool:
    n = weight.shape[0]
    return n <= 2 or max(classes(weight[~np.eye(n, dtype=bool)].tolist(), gap)) == 0


def _chain_order(sym: np.ndarray, ranks: list[int], gap: float) -> list[int]:
    parts = _islands_of(sym, ranks, gap)
    inner = []
    for part in parts:
        sub = sym[np.ix_(part, part)]
        inner.append(part if _flat(sub, gap) else [part[k] for k in best_chain(sub)])
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
    gap: float = GAP,
    slowness: Sequence[float] | None = None,
    capacity: Sequence[float] | None = None,
) -> list[int]:
    """Global ranks in pipeline order: islands chained by bandwidth, devices chained inside.

    With `slowness` (time multiplier per rank) and/or `capacity` (bytes a rank may use),
    devices are first split into classes (:func:`classes`): fastest first, and among equally
    fast ones the roomiest first; each class is chained on its own. Slow or small devices
    gather at the end of the order, where a pipeline may leave them unused.
    """
    links = cluster.links if isinstance(cluster, ClusterArtifact) else cluster
    sym = symmetric_bandwidth(links)
    n = sym.shape[0]
    ranks = list(range(n))
    if slowness is None and capacity is None:
        return _chain_order(sym, ranks, gap)
    speed = classes([1.0 / s for s in slowness], gap) if slowness is not None else [0] * n
    room = classes(capacity, gap) if capacity is not None else [0] * n
    order: list[int] = []
    for key in sorted(set(zip(speed, room, strict=True))):
        members = [r for r in ranks if (speed[r], room[r]) == key]
        order.extend(_chain_order(sym, members, gap))
    return order


def folded(order: Sequence[int], parts: Sequence[Sequence[int]] | None = None) -> list[int]:
    """`order` folded in two: every other unit on the way out, the rest on the way back, so
    its two ends are neighbours in `order`. Units are devices, or the islands `parts` (kept
    whole, as the DP's island steps need) in the order they lie in `order`.

    A pipeline cut from it has its first and last stages on a link the chain rates well, where
    a tied embedding and LM head sum their copies every step; its activations cross links one
    unit apart instead.
    """
    at = {r: k for k, r in enumerate(order)}
    if parts is None:
        units = [[r] for r in order]
    else:
        units = sorted((sorted(part, key=at.__getitem__) for part in parts),
                       key=lambda u: at[u[0]])
    return [r for unit in units[0::2] + units[1::2][::-1] for r in unit]
