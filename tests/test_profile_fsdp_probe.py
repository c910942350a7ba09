"""The FSDP own-work probe's arithmetic: which pairs probe together, and what is left to price."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdv.cost.comm import Ring, all_gather_time, reduce_scatter_time
from pdv.profile.network import tournament_rounds
from pdv.profile.overheads import (
    _FSDP_LARGE,
    _FSDP_WIRE_S,
    FSDP_PROBE_BYTES,
    _turns,
    fsdp_own_work,
    fsdp_pairs,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 17).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(0, 4), min_size=n, max_size=n))))
def test_pairs_take_turns_only_where_their_hosts_overlap(world_hosts: tuple[int, list[int]]
                                                         ) -> None:
    world, host_ids = world_hosts
    hosts = [f"h{h}" for h in host_ids]
    pairs = tournament_rounds(world)[0]
    turns = _turns(pairs, hosts)
    assert sorted(i for t in turns for i in t) == list(range(len(pairs)))
    for t in turns:
        used = [hosts[r] for i in t for r in pairs[i]]
        touched = [set(hosts[r] for r in pairs[i]) for i in t]
        assert sum(len(s) for s in touched) == len(set(used))  # no host in two pairs of a turn
    # A pair joins the first turn it fits: each later turn has a pair that clashed with every
    # earlier turn.
    for k, t in enumerate(turns[1:], 1):
        first = {hosts[r] for r in pairs[t[0]]}
        for earlier in turns[:k]:
            assert first & {hosts[r] for i in earlier for r in pairs[i]}


def test_pairs_on_separate_hosts_probe_at_once_and_a_shared_host_in_turns() -> None:
    pairs = [(0, 1), (2, 3), (4, 5)]
    assert _turns(pairs, ["a", "a", "b", "b", "c", "c"]) == [[0, 1, 2]]
    assert _turns(pairs, ["a"] * 6) == [[0], [1], [2]]


SIZES = [1024, 1024 * 1024]


def _probe(ring: Ring, extra: tuple[float, float], extra_scatter: tuple[float, float]) -> dict:
    """What the probe would read if FSDP cost the priced collective plus a line."""
    return {"unit_bytes": SIZES,
            "gather_op_s": [all_gather_time(ring, s) + extra[0] + extra[1] * s for s in SIZES],
            "reduce_scatter_s": [reduce_scatter_time(ring, s) + extra_scatter[0]
                                 + extra_scatter[1] * s for s in SIZES]}


@pytest.mark.parametrize("alpha,beta", [(1e-4, 2e8), (3e-5, 5e9)])
@pytest.mark.parametrize("extra,extra_scatter", [((1e-3, 1e-9), (4e-4, 0.0)),
                                                 ((0.0, 0.0), (2e-3, 3e-9))])
def test_own_work_is_what_the_probe_saw_beyond_the_priced_collective(
        alpha: float, beta: float, extra: tuple[float, float],
        extra_scatter: tuple[float, float]) -> None:
    ring = Ring(2, alpha, beta)._replace(gather_alpha=alpha, gather_beta=beta,
                                         scatter_alpha=2 * alpha, scatter_beta=beta / 2)
    own = fsdp_own_work(_probe(ring, extra, extra_scatter), ring)
    assert own["gather"]["a_s"] == pytest.approx(extra[0], abs=1e-12)
    assert own["gather"]["b_s_per_byte"] == pytest.approx(extra[1], abs=1e-15)
    assert own["reduce_scatter"]["a_s"] == pytest.approx(extra_scatter[0], abs=1e-12)
    assert own["reduce_scatter"]["b_s_per_byte"] == pytest.approx(extra_scatter[1], abs=1e-15)


def test_a_sweep_slower_than_the_probe_leaves_no_negative_work() -> None:
    """The sweep's β below what the probe's runs saw: the slope is 0, the constant kept."""
    ring = Ring(2, 1e-4, 1e8)._replace(gather_alpha=1e-4, gather_beta=1e8,
                                       scatter_alpha=1e-4, scatter_beta=1e8)
    fast = Ring(2, 1e-4, 1e9)._replace(gather_alpha=1e-4, gather_beta=1e9,
                                       scatter_alpha=1e-4, scatter_beta=1e9)
    own = fsdp_own_work(_probe(fast, (6e-4, 0.0), (0.0, 0.0)), ring)
    assert own["gather"] == {"a_s": pytest.approx(6e-4), "b_s_per_byte": 0.0}
    assert own["reduce_scatter"] == {"a_s": 0.0, "b_s_per_byte": 0.0}


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.floats(1e5, 1e11), min_size=n, max_size=n), min_size=n, max_size=n),
    st.lists(st.sampled_from([0.0, FSDP_PROBE_BYTES - 1.0, FSDP_PROBE_BYTES, 1e12]),
             min_size=n, max_size=n))))
def test_ranks_with_room_pair_up_over_their_fastest_links_first(
        case: tuple[list[list[float]], list[float]]) -> None:
    bw, room = case
    n = len(bw)
    pairs = fsdp_pairs(bw, room)
    able = [r for r in range(n) if room[r] >= FSDP_PROBE_BYTES]
    ranks = [r for a, b, _ in pairs for r in (a, b)]
    # disjoint, only ranks with room, all of them but one of an odd count
    assert len(ranks) == len(set(ranks)) == len(able) - len(able) % 2
    assert set(ranks) <= set(able)
    speed = {(a, b): min(bw[a][b], bw[b][a]) for a in able for b in able if a < b}
    taken: set[int] = set()
    for a, b, large in pairs:
        # no link between two ranks still free was faster when this pair was taken
        free = [v for (x, y), v in speed.items() if not {x, y} & taken]
        assert speed[(a, b)] == max(free)
        taken |= {a, b}
        lo, hi = _FSDP_LARGE
        assert large == int(min(hi, max(lo, speed[(a, b)] * _FSDP_WIRE_S)))
    assert fsdp_pairs(bw) == fsdp_pairs(bw, [float("inf")] * n)


def test_pairs_follow_the_measured_links_not_the_rank_order() -> None:
    """Ranks 0 and 1 (a host's first two, say) have the slowest link: 0 pairs with 2."""
    bw = [[0, 1e6, 5e9, 1e8], [1e6, 0, 1e8, 4e9], [5e9, 1e8, 0, 1e6], [1e8, 4e9, 1e6, 0]]
    assert [(a, b) for a, b, _ in fsdp_pairs(bw)] == [(0, 2), (1, 3)]
