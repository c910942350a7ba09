"""α-β point-to-point and ring collectives against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdv.artifacts import ClusterArtifact, HostRing
from pdv.cost.comm import (
    Ring,
    all_gather_time,
    all_reduce_linear,
    all_reduce_time,
    p2p_time,
    pairs_time,
    reduce_scatter_time,
    ring_hops,
    ring_link,
    ring_of,
)
from tests.test_cost_builders import make_cluster

# Row = sender: 0→1 is slow (1 MB/s, 1 ms), 1→0 fast (100 MB/s, 10 µs).
BW = [[0, 1e6, 5e7], [1e8, 0, 2e7], [4e7, 3e7, 0]]
LAT = [[0, 1e-3, 2e-5], [1e-5, 0, 3e-5], [4e-5, 5e-5, 0]]
LINKS = make_cluster(3, bw=BW, lat=LAT).links


def test_p2p_uses_the_sender_row() -> None:
    """Each direction is priced on its own ordered link."""
    assert p2p_time(LINKS, 0, 1, 1e6) == pytest.approx(1e-3 + 1.0)
    assert p2p_time(LINKS, 1, 0, 1e6) == pytest.approx(1e-5 + 0.01)


def test_p2p_is_free_to_self_and_for_nothing() -> None:
    """No transfer happens inside one rank or for zero bytes."""
    assert p2p_time(LINKS, 2, 2, 1e9) == 0.0
    assert p2p_time(LINKS, 0, 1, 0) == 0.0


def test_ring_follows_its_direction() -> None:
    """Ring 0→1→2→0 uses links [0][1], [1][2], [2][0]; the slowest hop sets the pace."""
    assert ring_hops([0, 1, 2]) == [(0, 1), (1, 2), (2, 0)]
    assert ring_link(LINKS, [0, 1, 2]) == (1e-3, 1e6)
    # A group listed in another order runs the same ring (torch sorts a group's ranks).
    assert ring_link(LINKS, [0, 2, 1]) == (1e-3, 1e6)
    assert ring_hops([4]) == []


def test_collectives_match_nccl_tests_formulas() -> None:
    """All-reduce 2(n−1)/n·S/β + 2(n−1)α; all-gather and reduce-scatter (n−1)/n·S/β + (n−1)α."""
    ring = ring_of(LINKS, [0, 1, 2])
    assert ring == Ring(3, 1e-3, 1e6)
    alpha, beta = 1e-3, 1e6
    s = 3e6
    assert all_reduce_time(ring, s) == pytest.approx(2 * 2 / 3 * s / beta + 4 * alpha)
    assert all_gather_time(ring, s) == pytest.approx(2 / 3 * s / beta + 2 * alpha)
    assert reduce_scatter_time(ring, s) == pytest.approx(2 / 3 * s / beta + 2 * alpha)
    assert all_reduce_time(ring_of(LINKS, [1]), s) == 0.0
    assert all_gather_time(ring, 0.0) == 0.0


def test_collectives_price_arrays_like_scalars() -> None:
    """One call prices a size per layer (or layer range): each as the scalar formula would."""
    ring = ring_of(LINKS, [0, 1, 2])
    sizes = np.array([0.0, 1.0, 3e6, 7e8])
    for f in (all_reduce_time, all_gather_time, reduce_scatter_time):
        assert list(f(ring, sizes)) == [f(ring, float(x)) for x in sizes]
    # The solver's linear form is the same all-reduce for any positive size.
    per_byte, per_call = all_reduce_linear(ring)
    assert per_byte * 3e6 + per_call == pytest.approx(all_reduce_time(ring, 3e6))
    assert all_reduce_linear(ring_of(LINKS, [2])) == (0.0, 0.0)


def test_pairs_time_paces_each_direction_by_its_worst_pair() -> None:
    """Activations over (0→1, 2→0) and gradients back over (1→0, 0→2), each its slowest pair."""
    nbytes = np.array([0.0, 1e6])
    got = pairs_time(LINKS, [(0, 1), (2, 0)], nbytes)
    fwd = max(p2p_time(LINKS, 0, 1, 1e6), p2p_time(LINKS, 2, 0, 1e6))
    bwd = max(p2p_time(LINKS, 1, 0, 1e6), p2p_time(LINKS, 0, 2, 1e6))
    assert got[0] == 0.0 and got[1] == pytest.approx(fwd + bwd)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 6),
    nbytes=st.floats(1, 1e9),
    bw=st.floats(1e3, 1e11),
    lat=st.floats(0, 1e-2),
    slow=st.floats(1.0, 100.0),
)
def test_collectives_scale_with_the_link(
    n: int, nbytes: float, bw: float, lat: float, slow: float
) -> None:
    """All-reduce = RS + AG; a slower ring never makes a collective faster; more bytes cost more."""
    ranks = list(range(n))
    fast = ring_of(make_cluster(n, bw=bw, lat=lat).links, ranks)
    slower = ring_of(make_cluster(n, bw=bw / slow, lat=lat * slow).links, ranks)
    ar = all_reduce_time(fast, nbytes)
    assert ar == pytest.approx(reduce_scatter_time(fast, nbytes) + all_gather_time(fast, nbytes))
    assert all_reduce_time(slower, nbytes) >= ar
    assert all_reduce_time(fast, 2 * nbytes) > ar


def test_ring_follows_sorted_ranks_like_torch_groups():
    # Links 0<->1 and 2<->3 slow, everything else fast: the listed order 0,2,1,3 would use only
    # fast hops, but the group torch builds runs 0→1→2→3→0 and pays the slow 0→1 and 2→3.
    from pdv.artifacts import Links

    fast, slow = 1e10, 1e7
    bw = [[0.0 if i == j else fast for j in range(4)] for i in range(4)]
    for a, b in ((0, 1), (2, 3)):
        bw[a][b] = bw[b][a] = slow
    links = Links(latency_s=[[0.0] * 4 for _ in range(4)], bandwidth_Bps=bw)
    assert ring_hops([0, 2, 1, 3]) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert ring_link(links, [0, 2, 1, 3])[1] == slow


def test_rings_use_measured_collectives_where_the_cluster_has_them() -> None:
    """A pair's measured all-reduce α/β price the ring's hops instead of send/recv ones."""
    from pdv.artifacts import Links

    coll_bw = [[0, 2e5, 4e7], [2e5, 0, 1e7], [4e7, 1e7, 0]]
    coll_lat = [[0, 2e-4, 1e-4], [2e-4, 0, 3e-4], [1e-4, 3e-4, 0]]
    links = Links(latency_s=LAT, bandwidth_Bps=BW, collective_latency_s=coll_lat,
                  collective_bandwidth_Bps=coll_bw)
    assert ring_link(links, [0, 1, 2]) == (3e-4, 2e5)
    assert ring_link(links, [0, 2]) == (1e-4, 4e7)
    assert all_reduce_time(ring_of(links, [0, 2]), 1e6) == pytest.approx(1e6 / 4e7 + 2 * 1e-4)
    # Point-to-point transfers keep the point-to-point matrices.
    assert p2p_time(links, 1, 0, 1e6) == pytest.approx(1e-5 + 0.01)


@pytest.mark.parametrize("seed", range(12))
def test_a_ring_with_three_ranks_on_a_measured_host_is_no_faster_than_its_ring(
        seed: int) -> None:
    """Host rings bound every ring with 3 or more of their ranks, and only those; the pairs'
    α/β still bound it where they are slower."""
    rng = np.random.default_rng(seed)
    n = 8
    bw = rng.uniform(1e8, 1e10, (n, n))
    lat = rng.uniform(1e-6, 1e-3, (n, n))
    base = make_cluster(n, bw=bw.tolist(), lat=lat.tolist())
    host = HostRing(ranks=[0, 1, 2, 3], alpha_s=float(rng.uniform(1e-5, 2e-3)),
                    bandwidth_Bps=float(rng.uniform(1e8, 1e10)))
    links = base.links.model_copy(update={"host_rings": [host]})
    ClusterArtifact.model_validate(base.model_copy(update={"links": links}).model_dump())
    for _ in range(20):
        ranks = sorted(rng.choice(n, size=int(rng.integers(2, n + 1)), replace=False).tolist())
        plain, bound = ring_of(base.links, ranks), ring_of(links, ranks)
        if len(set(ranks) & {0, 1, 2, 3}) >= 3:
            assert bound.alpha == max(plain.alpha, host.alpha_s)
            assert bound.beta == min(plain.beta, host.bandwidth_Bps)
        else:
            assert bound == plain
    bad = links.model_copy(update={"host_rings": [host.model_copy(update={"ranks": [3, 9, 1]})]})
    with pytest.raises(ValueError, match="host_rings"):
        ClusterArtifact.model_validate(base.model_copy(update={"links": bad}).model_dump())


def test_an_exchange_pays_the_measured_excess_once_whatever_its_tensors() -> None:
    """pairs_time adds Links.exchange_latency_s once per direction of a boundary however many
    tensors it carries (α stays per tensor); p2p_time and the rings do not see it."""
    from pdv.artifacts import Links
    from pdv.cost.comm import exchange_time, p2p_time, pairs_time, ring_of

    lat = [[0.0, 1e-4], [2e-4, 0.0]]
    bw = [[0.0, 1e9], [5e8, 0.0]]
    plain = Links(latency_s=lat, bandwidth_Bps=bw)
    extra = plain.model_copy(update={"exchange_latency_s": [[0.0, 3e-3], [5e-3, 0.0]]})
    assert exchange_time(extra, 0, 1) == 3e-3 and exchange_time(extra, 1, 0) == 5e-3
    assert exchange_time(plain, 0, 1) == 0.0 and exchange_time(extra, 1, 1) == 0.0
    assert p2p_time(extra, 0, 1, 1e6) == p2p_time(plain, 0, 1, 1e6)
    nbytes = np.array([1e6, 2e6])
    for ahead, back in ((1.0, 1.0), (2.0, 3.0)):
        base = pairs_time(plain, [(0, 1)], nbytes, ahead, back)
        got = pairs_time(extra, [(0, 1)], nbytes, ahead, back)
        assert got == pytest.approx(base + 3e-3 + 5e-3)
    assert ring_of(extra, [0, 1]) == ring_of(plain, [0, 1])


def test_an_exchange_matrix_of_the_wrong_shape_is_rejected_and_an_absent_one_omitted() -> None:
    """Links.exchange_latency_s is checked like every link matrix; a file without it (every
    cluster measured before the probe) keeps its bytes."""
    import json

    from pydantic import ValidationError

    from pdv import artifacts
    from tests.test_cost_builders import make_cluster

    cl = make_cluster(2)
    assert "exchange_latency_s" not in json.loads(artifacts.dumps(cl))["links"]
    data = json.loads(artifacts.dumps(cl))
    data["links"]["exchange_latency_s"] = [[0.0]]
    with pytest.raises(ValidationError, match="exchange_latency_s must be a 2x2"):
        ClusterArtifact.model_validate(data)
    data["links"]["exchange_latency_s"] = [[0.0, 1e-3], [2e-3, 0.0]]
    again = artifacts.parse(data)
    assert again.links.exchange_latency_s == [[0.0, 1e-3], [2e-3, 0.0]]
