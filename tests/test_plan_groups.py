"""Islands and device orders on matrices as they are measured: noisy, asymmetric, patternless."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.noisy_cluster import noisy_cluster
from pdv.artifacts import Links
from pdv.plan.groups import GAP, classes, device_order, islands


def _links(bw: np.ndarray) -> Links:
    n = bw.shape[0]
    bw = bw.copy()
    np.fill_diagonal(bw, 0.0)
    lat = np.full((n, n), 1e-5)
    np.fill_diagonal(lat, 0.0)
    return Links(latency_s=lat.tolist(), bandwidth_Bps=bw.tolist())


def _contiguous(order: list[int], group: list[int]) -> bool:
    at = sorted(order.index(r) for r in group)
    return at[-1] - at[0] == len(group) - 1


def test_classes_split_at_gaps_beyond_the_tolerance_only() -> None:
    assert classes([100, 95, 91, 30, 29, 5]) == [0, 0, 0, 1, 1, 2]
    # a chain of small steps is one class however far its ends are apart
    steps = [100 * 0.9**k for k in range(20)]
    assert set(classes(steps)) == {0}
    assert classes([1.0, 1.0 / (1 + GAP) * 0.999]) == [0, 1]
    assert classes([]) == []


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.1])
def test_noisy_two_level_matrix_finds_the_boxes(seed: int, noise: float) -> None:
    # 2 NVLink boxes (450 GB/s inside) and 2 PCIe boxes (25 GB/s inside) on a 50 GB/s fabric,
    # every ordered pair off its class by up to ±noise: each NVLink box is an island; the PCIe
    # devices reach each other best over the fabric, so they form one island together.
    cluster = noisy_cluster(4, per_node=8, noise=noise, seed=seed)
    assert islands(cluster.links) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 32))]
    order = device_order(cluster)
    assert sorted(order) == list(range(32))
    for box in (range(0, 8), range(8, 16)):
        assert _contiguous(order, list(box))


@pytest.mark.parametrize("seed", range(3))
def test_alike_links_within_the_tolerance_are_one_island_in_rank_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bw = 10e9 * rng.uniform(0.9, 1.1, (12, 12))
    assert islands(_links(bw)) == [list(range(12))]
    assert device_order(_links(bw)) == list(range(12))


def test_asymmetric_links_are_judged_by_their_slower_direction() -> None:
    # 0↔1 and 2↔3 are fast one way only; 0↔2 and 1↔3 are fast both ways: those pair up.
    bw = np.full((4, 4), 1e9)
    bw[0, 1] = bw[2, 3] = 100e9
    bw[0, 2] = bw[2, 0] = bw[1, 3] = bw[3, 1] = 50e9
    assert islands(_links(bw)) == [[0, 2], [1, 3]]
    order = device_order(_links(bw))
    assert _contiguous(order, [0, 2]) and _contiguous(order, [1, 3])


@pytest.mark.parametrize("seed", range(5))
def test_patternless_matrices_give_a_partition_and_a_permutation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    bw = 10 ** rng.uniform(8, 11, (n, n))  # three decades, no classes at all
    parts = islands(_links(bw))
    assert sorted(r for p in parts for r in p) == list(range(n))
    assert sorted(device_order(_links(bw))) == list(range(n))


def test_one_kind_with_two_memory_sizes_and_speeds_puts_the_roomy_fast_ones_first() -> None:
    # One device kind, all links alike (±10%): 8 devices of 80 GiB (capacities ±2%) and
    # 8 of 40 GiB, interleaved by rank; the faster half of each runs 3x faster.
    rng = np.random.default_rng(1)
    n = 16
    bw = 10e9 * rng.uniform(0.9, 1.1, (n, n))
    capacity = [(80 if r % 2 == 0 else 40) * 2**30 * rng.uniform(0.98, 1.02) for r in range(n)]
    order = device_order(_links(bw), capacity=capacity)
    assert order[:8] == list(range(0, 16, 2)) and order[8:] == list(range(1, 16, 2))
    slowness = [1.0 if r < 8 else 3.0 * rng.uniform(0.95, 1.05) for r in range(n)]
    order = device_order(_links(bw), slowness=slowness, capacity=capacity)
    assert order == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
