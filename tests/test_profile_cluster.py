"""pdv profile cluster: the tournament, the α/β fits (point to point and all-reduce), real 4-rank
runs, each rank's runtime memory (in and out of a memory cgroup), and the timeout path."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pdv import artifacts
from pdv.cost.comm import all_reduce_time, ring_of
from pdv.profile.collective import (
    _BURST,
    _FSDP_REACH,
    _SWEEPS,
    PRICE_FIT,
    PairCollective,
    _alpha,
    collective_matrices,
    price_line,
    ring_from_pair_line,
    superlinearity,
    sweep_flaws,
)
from pdv.profile.network import fit_line, tournament_rounds
from pdv.profile.overheads import typical_pass
from tests.conftest import run_pdv


@pytest.mark.parametrize("n", range(1, 12))
def test_tournament_meets_every_pair_once_in_disjoint_rounds(n: int) -> None:
    rounds = tournament_rounds(n)
    assert len(rounds) == (0 if n == 1 else n - 1 if n % 2 == 0 else n)
    met = [p for rnd in rounds for p in rnd]
    assert sorted(met) == list(itertools.combinations(range(n), 2))
    for rnd in rounds:
        ranks = [r for p in rnd for r in p]
        assert len(ranks) == len(set(ranks)), f"a rank plays twice in {rnd}"
        assert len(rnd) == n // 2  # everyone plays, but the one with the bye


@settings(max_examples=50, deadline=None)
@given(
    alpha=st.floats(1e-6, 1e-2),
    bw=st.floats(1e6, 1e11),
    noise=st.lists(st.floats(-0.01, 0.01), min_size=6, max_size=6),
)
def test_fit_recovers_beta(alpha: float, bw: float, noise: list[float]) -> None:
    sizes = [1, 4096, 65536, 1 << 20, 4 << 20, 16 << 20]
    # The sweep grows until the largest message is bandwidth-bound; test that regime.
    assume(sizes[-1] / bw >= 10 * alpha)
    times = [(alpha + s / bw) * (1 + e) for s, e in zip(sizes, noise, strict=True)]
    c, beta, r2, how = fit_line(sizes, times)
    assert how == "least squares"
    assert beta == pytest.approx(bw, rel=0.05)
    assert r2 > 0.98


def test_fit_falls_back_when_time_does_not_grow() -> None:
    c, beta, r2, how = fit_line([1, 1000, 2000], [1e-4, 1e-4, 0.9e-4])
    assert how.startswith("fallback") and beta == pytest.approx(2000 / 0.9e-4)


@settings(max_examples=50, deadline=None)
@given(
    alpha=st.floats(1e-6, 1e-3),
    bw=st.floats(1e7, 1e10),
    noise=st.lists(st.floats(0.0, 0.5), min_size=5, max_size=5),
)
def test_collective_alpha_is_bounded_by_the_cleanest_small_size(
        alpha: float, bw: float, noise: list[float]) -> None:
    """Waits only ever add time: α comes from the latency-bound size that waited least."""
    sizes = [4096, 16384, 65536, 1 << 20, 16 << 20]
    clean = [2 * alpha + s / bw for s in sizes]
    times = [t * (1 + e) for t, e in zip(clean, noise, strict=True)]
    got = _alpha(sizes, times, bw)
    assert got >= 0
    # Never above the smallest size's own bound, and exact where some size ran without a wait.
    assert got <= max(times[0] - sizes[0] / bw, 0) / 2 + 1e-15
    bound = [k for k, s in enumerate(sizes) if s / bw <= times[k] / 2]
    if any(noise[k] == 0 for k in bound):
        assert got == pytest.approx(alpha, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    alpha=st.floats(1e-5, 1e-3),
    bw=st.floats(1e8, 1e10),
    waited=st.lists(st.floats(0.0, 5.0), min_size=4, max_size=4),
)
def test_waits_on_small_sizes_do_not_make_the_bandwidth_cheaper(
        alpha: float, bw: float, waited: list[float]) -> None:
    """The price is t = 2α + S/β with α from the size that waited least, so β must come from a
    line through that intercept: the bandwidth-bound sizes are priced as they ran whatever
    waits the latency-bound ones (S/β ≤ 2α) met, up to 5x their time; the smallest ran clean."""
    sizes = [4096, 16384, 65536, 262144, 4 << 20, 16 << 20]
    assume(sizes[0] / bw <= 2 * alpha and sizes[-2] / bw >= 20 * alpha)
    clean = [2 * alpha + s / bw for s in sizes]
    times = [t * (1 + w) if s / bw <= 2 * alpha else t
             for s, t, w in zip(sizes, clean, [0.0, *waited, 0.0], strict=False)]
    _c, free_bw, _r2, how = fit_line(sizes, times)
    assume(how == "least squares")
    excess, slope_bw = price_line(sizes, times, free_bw)
    for k in (-2, -1):
        assert excess + sizes[k] / slope_bw == pytest.approx(clean[k], rel=0.01)
    assert excess == pytest.approx(2 * alpha, rel=0.05, abs=2e-6)


def test_a_wait_on_a_small_size_priced_the_free_line_under_its_largest() -> None:
    """The case that made price_line (pz21's all-reduce sweep): a 256 KiB size met a wait, the
    free line's slope read 1.94 GB/s and priced 16 MiB 9% under its own median."""
    sizes = [4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20]
    medians = [0.73e-3, 0.714e-3, 1.167e-3, 3.465e-3, 2.735e-3, 2.95e-3, 10.271e-3]
    _c, free_bw, _r2, _how = fit_line(sizes, medians)
    free_price = 2 * _alpha(sizes, medians, free_bw) + sizes[-1] / free_bw
    excess, slope_bw = price_line(sizes, medians, free_bw)
    assert free_price < 0.93 * medians[-1]
    assert excess + sizes[-1] / slope_bw == pytest.approx(medians[-1], rel=0.03)
    assert slope_bw < free_bw


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(3, 16),
    alpha=st.floats(1e-6, 1e-3),
    bw=st.floats(1e7, 1e11),
)
def test_a_host_ring_sweep_read_as_a_pair_gives_back_the_rings_alpha_and_beta(
        n: int, alpha: float, bw: float) -> None:
    """A host's all-reduce is swept and fitted as a pair's; reading that fit as a ring of n
    must return the ring's own α per step and β, whatever n."""
    sizes = [4096, 16384, 65536, 1 << 20, 4 << 20, 16 << 20]
    times = [2 * (n - 1) * alpha + 2 * (n - 1) / n * s / bw for s in sizes]
    _c, slope_beta, _r2, how = fit_line(sizes, times)
    assume(how == "least squares")
    ring = ring_from_pair_line(list(range(n)), _alpha(sizes, times, slope_beta), slope_beta)
    assert ring.bandwidth_Bps == pytest.approx(bw, rel=1e-6)
    assert ring.alpha_s == pytest.approx(alpha, rel=1e-4, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    alpha=st.floats(0.0, 1e-2),
    bw=st.floats(1e6, 1e11),
    sizes=st.lists(st.integers(1, 1 << 26), min_size=2, max_size=8, unique=True),
    slower=st.lists(st.floats(1.0, 1.9), min_size=8, max_size=8),
)
def test_a_line_never_reads_as_a_burst(
        alpha: float, bw: float, sizes: list[int], slower: list[float]) -> None:
    """t = c + S/β grows no faster than S, so a sweep on it (even one in which a smaller size
    waited up to 1.9x, which only lowers the ratio to it) is never taken again for a burst."""
    sizes = sorted(sizes)
    clean = [alpha + s / bw for s in sizes]
    assert superlinearity(sizes, clean) <= 1 + 1e-9
    assert superlinearity(sizes, [t * f for t, f in zip(clean, slower, strict=False)]) < _BURST


def test_a_burst_on_the_largest_size_reads_as_one() -> None:
    # The all-gather sweep seen here: 4 MiB's every pass landed in a burst.
    sizes = [4096, 16384, 65536, 262144, 1 << 20, 4 << 20]
    medians = [0.26e-3, 0.19e-3, 0.27e-3, 0.43e-3, 0.65e-3, 13.24e-3]
    assert superlinearity(sizes, medians) > _BURST
    assert superlinearity(sizes[:-1], medians[:-1]) < _BURST
    assert fit_line(sizes, medians)[2] > 0.9  # the all-reduce's r² test alone misses it


def test_the_kept_sweep_fails_fewest_checks_then_fits_best() -> None:
    """An all-reduce sweep bent by a burst but fitted at r² 0.95 beats a straight one at 0.44
    (each fails one check, r² decides: it prices every gradient sync); a clean one beats both.
    For FSDP's collectives only the bend counts."""
    sizes = [4096, 65536, 1 << 20, 4 << 20]
    straight, bent = [1e-4, 2e-4, 1e-3, 4e-3], [1e-4, 2e-4, 1e-3, 9e-3]
    clean = sweep_flaws("all_reduce", sizes, straight, 0.99)
    low_r2 = sweep_flaws("all_reduce", sizes, straight, 0.44)
    burst = sweep_flaws("all_reduce", sizes, bent, 0.95)
    assert clean[0] == 0 and low_r2[0] == burst[0] == 1
    assert sorted([low_r2, burst, clean]) == [clean, burst, low_r2]
    assert sweep_flaws("all_gather", sizes, straight, 0.1)[0] == 0
    assert sweep_flaws("all_gather", sizes, bent, 0.99)[0] == 1


def test_collective_matrices_are_symmetric_with_a_zero_diagonal() -> None:
    results = [PairCollective(a=a, b=b, round=0, sizes=[1], median_s=[1.0], best_s=[1.0],
                              fit_intercept_s=0.0, alpha_s=1e-4 * (a + 1), r2=1.0, fit="",
                              bandwidth_Bps=1e9 + 10 * a + b)
               for a, b in itertools.combinations(range(3), 2)]
    lat, bw = collective_matrices(3, results)
    for i, j in itertools.product(range(3), range(3)):
        assert bw[i][j] == bw[j][i] and lat[i][j] == lat[j][i]
        assert (bw[i][j] == 0) == (i == j)
    assert bw[0][2] == 1e9 + 2 and lat[2][0] == 1e-4


def test_help_lists_the_options() -> None:
    out = run_pdv("profile", "cluster", "--help")
    assert out.returncode == 0
    for option in ("--nproc-per-node", "--timeout", "--sizes", "--json", "--no-collectives"):
        assert option in out.stdout


def test_outside_torchrun_without_nproc_is_one_line_exit_2(tmp_path: Path) -> None:
    out = run_pdv("profile", "cluster", "-o", str(tmp_path / "c.json"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--nproc-per-node" in out.stderr


def test_bad_sizes_are_one_line_exit_2(tmp_path: Path) -> None:
    out = run_pdv("profile", "cluster", "-o", str(tmp_path / "c.json"), "--nproc-per-node", "2",
                  "--sizes", "4KiB,lots")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "lots" in out.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_four_local_ranks_give_a_valid_4x4_matrix(tmp_path: Path) -> None:
    out_file = tmp_path / "c.json"
    out = run_pdv("profile", "cluster", "--nproc-per-node", "4", "-o", str(out_file),
                  "--timeout", "120", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ordered pairs" in out.stdout
    assert run_pdv("validate", str(out_file)).returncode == 0
    data = json.loads(out_file.read_text())
    assert data["provenance"]["method"] == "measured"
    assert any("gloo event-loop threads" in n for n in data["provenance"]["notes"]), data
    lat, bw = data["links"]["latency_s"], data["links"]["bandwidth_Bps"]
    assert len(lat) == len(bw) == 4 and all(len(r) == 4 for r in lat + bw)
    for i, j in itertools.product(range(4), range(4)):
        if i == j:
            assert lat[i][j] == 0 and bw[i][j] == 0
        else:
            assert math.isfinite(bw[i][j]) and bw[i][j] > 1e6  # loopback moves > 1 MB/s
            assert math.isfinite(lat[i][j]) and 0 < lat[i][j] < 0.1
    m = data["measurement"]
    assert len(m["pairs"]) == 12
    assert {(p["src"], p["dst"]) for p in m["pairs"]} == {
        (i, j) for i in range(4) for j in range(4) if i != j
    }
    assert len(m["rounds"]) == 3 and "concurrently" in m["concurrency"]
    for p in m["pairs"]:
        # Time grows with size: the sweep measured something, and the fit follows it.
        assert p["one_way_s"][-1] > p["one_way_s"][0]
        assert p["bandwidth_Bps"] == bw[p["src"]][p["dst"]]
    assert [d["rank"] for d in data["devices"]] == [0, 1, 2, 3]
    for d in data["devices"]:
        assert d["kind"] == "cpu" and d["memory_bytes"] > 0 and d["matmul_flops"] > 1e8
        assert "memory_source" in d["details"]
        assert d["matmul_flops_alone"] > 1e8  # each rank is also timed alone
        # All ranks at once in three windows (start, after the links, after the collectives):
        # a spell sets one window, the rank keeps the best.
        windows = d["details"]["matmul_flops_together_windows"]
        assert len(windows) == 3 and d["matmul_flops"] == max(windows)
        # Alone too: the rank's speed is its best turn of three, not its first.
        alone = d["details"]["matmul_flops_alone_windows"]
        assert len(alone) == 3 and d["matmul_flops_alone"] == max(alone) > 0
        # The small-op reference step in the same turns: the fastest window is the file's.
        small = d["details"]["small_op_step_alone_windows_s"]
        assert len(small) == 3 and d["small_op_step_s"] == min(small)
        assert 1e-6 < d["small_op_step_s"] < 0.1
    if len(os.sched_getaffinity(0)) <= 2:
        # 4 ranks on 2 cores cannot all keep their alone speed: the host's measured capacity
        # (the sum of shares, ~2 here) is what the cost model's host bound divides by.
        assert sum(d["matmul_flops"] / d["matmul_flops_alone"] for d in data["devices"]) < 3.5
    _check_collectives(data)
    # The summary names each host ring it measured (4 ranks on one host here).
    assert "all-reduce over its 4 ranks as one ring" in " ".join(out.stdout.split())
    assert "after compute, beyond the sweeps' prices: gradient sync +" in " ".join(
        out.stdout.split())
    _check_overheads(data)
    for d in data["devices"]:
        # A rank holds torch, its libraries and gloo before any model: far above 100 MiB.
        assert d["runtime_bytes"] > 100 * 2**20, d["details"]
        if not _memory_capped():
            assert "resident set" in d["details"]["runtime_source"]
            assert d["runtime_bytes"] == d["details"]["runtime_rss_bytes"]


def _check_overheads(data: dict) -> None:
    """Every rank's pipeline bookkeeping and message CPU, with the raw numbers behind them."""
    block = data["measurement"]["overheads"]
    links = artifacts.parse(data).links
    assert "Schedule1F1B" in block["method"] and block["sizes_bytes"]
    paired = 0
    for d, raw in zip(data["devices"], block["ranks"], strict=True):
        o = d["overheads"]
        assert raw["rank"] == d["rank"]
        # torch.distributed.pipelining does Python work per micro-batch: never free, never 0.1 s
        assert 0 < o["fwd_s"] + o["bwd_s"] < 0.1 and 0 <= o["step_s"] < 0.1
        # Two passes over a flat gradient buffer: memory-bound, between 100 MB/s and 1 TB/s.
        assert 1e-12 < o["grad_passes_s_per_byte"] < 1e-8
        if "messages" in raw:  # 4 ranks pair up in the tournament's first round
            paired += 1
            m = raw["messages"]
            assert len(m["send_cpu_s"]) == len(m["recv_cpu_s"]) == len(block["sizes_bytes"])
            assert o["send_cpu"] == m["send_cpu"] and o["recv_cpu"] == m["recv_cpu"]
            assert o["send_cpu"]["a_s"] + o["recv_cpu"]["a_s"] > 0
            # Each size's number is the median of rounds spread in time, all of them kept.
            for key in ("send_cpu", "recv_cpu"):
                rounds = m[f"{key}_rounds_s"]
                assert len(rounds) == len(block["sizes_bytes"])
                assert all(len(r) == len(rounds[0]) >= 3 for r in rounds)
                assert m[f"{key}_s"] == [statistics.median(r) for r in rounds]
                # messages posted together: one posting of 1 and of 3, each round kept; the
                # batched cost of a message after the first follows from their medians
                by = m["batched_cpu_rounds_s"][key.split("_")[0]]
                assert set(by) == {"1", "3"} and len(by["1"]) == len(rounds[0])
                one, three = statistics.median(by["1"]), statistics.median(by["3"])
                want = (three - one - 2 * o[key]["b_s_per_byte"] * m["batch_size_bytes"]) / 2
                assert o[key]["batched_a_s"] == pytest.approx(max(want, 0.0))
            assert m["spread"] >= 0
            # The sync after compute: the same pairs, every round kept; the excess is each
            # round's later end of the pair's first all-reduce, the median of the passes'
            # means, less the sweep's price on the pair (never negative), so both ranks of a
            # pair carry the same excess.
            sy = raw["after_compute"]
            assert d["rank"] in sy["pair"] and m["peer"] in sy["pair"]
            assert sy["burst_matmuls"] >= 1
            # A pass at the compute windows after the links and after the collectives, and
            # one at the end, so the mean is not one short window's.
            passes = 3 if "collective" in data["measurement"] else 2
            assert sy["passes"] == passes
            assert (len(sy["first_rounds_s"]) == len(sy["second_rounds_s"])
                    == passes * sy["rounds_per_pass"])
            assert sy["first_s"] == pytest.approx(statistics.mean(sy["first_rounds_s"]))
            # The same sync after a burst ten times as long, each round's compute kept: it
            # computed for longer (recorded for a sync priced by the compute before it).
            long = sy["long"]
            assert len(long["first_rounds_s"]) == len(long["burst_rounds_s"]) == (
                passes * long["rounds_per_pass"])
            assert long["burst_matmuls"] == 10 * sy["burst_matmuls"]
            assert (statistics.median(long["burst_rounds_s"])
                    > 4 * statistics.median(sy["burst_rounds_s"]))
            ring = ring_of(links, sy["pair"])
            other = next(r for r in sy["pair"] if r != d["rank"])
            theirs = block["ranks"][other]["after_compute"]
            later = [max(a, b) for a, b in zip(sy["first_rounds_s"], theirs["first_rounds_s"],
                                              strict=True)]
            assert statistics.mean(later) >= sy["first_s"] - 1e-12
            assert o["sync_after_compute_s"] == pytest.approx(
                max(0.0, typical_pass(later, passes) - all_reduce_time(ring, sy["bytes"])))
            # The longer burst's excess, the pair's alike, and both bursts' lengths: what a
            # stage's compute per step prices the excess between.
            grows = o["sync_after_long_compute"]
            later_long = [max(a, b) for a, b in zip(long["first_rounds_s"],
                                                    theirs["long"]["first_rounds_s"],
                                                    strict=True)]
            assert grows["long_excess_s"] == pytest.approx(max(
                0.0, typical_pass(later_long, passes) - all_reduce_time(ring, sy["bytes"])))
            assert grows["burst_s"] == pytest.approx(
                typical_pass(sy["burst_rounds_s"], passes))
            assert grows["long_burst_s"] == pytest.approx(
                typical_pass(long["burst_rounds_s"], passes))
            # The exchange after compute (one host: the sender's clock reads on the receiver):
            # a message to this rank pays its mean landing beyond its link's α + S/β.
            ex = sy["exchange"]
            assert ex["from"] == m["peer"]
            assert len(ex["landed_rounds_s"]) == passes * sy["rounds_per_pass"]
            assert all(t >= 0 for t in ex["landed_rounds_s"])
            priced = (links.latency_s[ex["from"]][d["rank"]]
                      + ex["bytes"] / links.bandwidth_Bps[ex["from"]][d["rank"]])
            want = max(0.0, statistics.mean(ex["landed_rounds_s"]) - priced)
            assert all(links.exchange_latency_s[i][d["rank"]] == pytest.approx(want)
                       for i in range(len(data["devices"])) if i != d["rank"])
            assert links.exchange_latency_s[d["rank"]][d["rank"]] == 0.0
            # A host holding two pairs or more: they take the exchange in turns too, the
            # host's other ranks idle, and that mean prices the transfers of a quiet host.
            if [x["host"] for x in data["devices"]].count(d["host"]) >= 4:
                alone = ex["alone_landed_rounds_s"]
                assert len(alone) == passes * sy["rounds_per_pass"]
                want = max(0.0, statistics.mean(alone) - priced)
                assert links.exchange_latency_alone_s is not None
                assert all(links.exchange_latency_alone_s[i][d["rank"]] == pytest.approx(want)
                           for i in range(len(data["devices"])) if i != d["rank"])
            else:
                assert "alone_landed_rounds_s" not in ex
                assert links.exchange_latency_alone_s is None
        if "collective" in data["measurement"]:  # FSDP's own work, with the collective sweep
            f = raw["fsdp"]
            assert d["rank"] in f["pair"] and len(f["unit_bytes"]) == 2
            # Each FSDP gathering op and step costs something (hooks, copies, the collective).
            assert all(t > 0 for t in f["gather_op_s"])
            assert all(t > 0 for t in f["step_medians_s"].values())
            for key in ("fsdp_gather", "fsdp_reduce_scatter"):
                assert o[key]["a_s"] >= 0 and o[key]["b_s_per_byte"] >= 0
    assert paired == 4


def _memory_capped() -> bool:
    from pdv.profile.hardware import _cgroup_memory_limits

    return any(limit < psutil.virtual_memory().total for limit, _ in _cgroup_memory_limits())


def _check_collectives(data: dict) -> None:
    """The all-reduce matrices: symmetric, positive, fitted well, and below point to point."""
    p2p = data["links"]["bandwidth_Bps"]
    lat, bw = data["links"]["collective_latency_s"], data["links"]["collective_bandwidth_Bps"]
    n = len(p2p)
    assert len(lat) == len(bw) == n and all(len(r) == n for r in lat + bw)
    block = data["measurement"]["collective"]
    assert {(p["a"], p["b"]) for p in block["pairs"]} == set(itertools.combinations(range(n), 2))
    assert sorted({p["round"] for p in block["pairs"]}) == list(range(n - 1))
    for i, j in itertools.product(range(n), range(n)):
        assert bw[i][j] == bw[j][i] and lat[i][j] == lat[j][i]
        if i == j:
            assert bw[i][j] == 0 and lat[i][j] == 0
            continue
        assert math.isfinite(bw[i][j]) and bw[i][j] > 1e6
        assert 0 <= lat[i][j] < 0.1
        # An all-reduce moves S bytes each way at once and adds the sum on the same cores:
        # per byte it cannot beat a one-way send (measured 2-4x slower here; kept loose).
        assert bw[i][j] < max(p2p[i][j], p2p[j][i]), (i, j, bw[i][j], p2p[i][j], p2p[j][i])
    links = data["links"]
    # Every host with 3 or more ranks all-reduced as one group, and only those.
    hosts: dict[str, list[int]] = {}
    for d in data["devices"]:
        hosts.setdefault(d["host"], []).append(d["rank"])
    rings = {tuple(r["ranks"]): r for r in links.get("host_rings", [])}
    assert set(rings) == {tuple(r) for r in hosts.values() if len(r) >= 3}
    swept = {tuple(r["ranks"]): r for r in block.get("host_rings", {}).get("rings", [])}
    assert set(swept) == set(rings)
    for ranks, ring in rings.items():
        assert 0 <= ring["alpha_s"] < 0.1 and math.isfinite(ring["bandwidth_Bps"])
        assert ring["bandwidth_Bps"] > 1e6
        # The file keeps the sweep the ring came from: its medians give the ring back.
        rec = swept[ranks]
        assert rec["host"] == data["devices"][ranks[0]]["host"]
        assert len(rec["sizes"]) == len(rec["median_s"]) >= 2
        assert all(b <= m for b, m in zip(rec["best_s"], rec["median_s"], strict=True))
        excess, slope_beta = price_line(rec["sizes"], rec["median_s"],
                                        fit_line(rec["sizes"], rec["median_s"])[1])
        again = ring_from_pair_line(list(ranks), excess / 2, slope_beta)
        assert again.bandwidth_Bps == pytest.approx(ring["bandwidth_Bps"], rel=1e-3)
        assert again.alpha_s == pytest.approx(ring["alpha_s"], rel=1e-3, abs=1e-9)
    matrices = {"all_reduce": bw, "all_gather": links["gather_bandwidth_Bps"],
                "reduce_scatter": links["scatter_bandwidth_Bps"]}
    for op, m in matrices.items():
        mine = [p for p in block["pairs"] if p["op"] == op]
        assert {(p["a"], p["b"]) for p in mine} == set(itertools.combinations(range(n), 2))
        for p in mine:
            assert p["bandwidth_Bps"] == m[p["a"]][p["b"]] == m[p["b"]][p["a"]] > 1e6
            assert links[f"{'collective' if op == 'all_reduce' else op.split('_')[-1]}"
                         "_latency_s"][p["a"]][p["b"]] == p["alpha_s"] >= 0
    for p in block["pairs"]:
        assert 1 <= p["sweeps"] <= _SWEEPS
        if p["op"] == "all_reduce" and p["fit"] == PRICE_FIT:
            # The price's line comes from the medians the file keeps.
            excess, slope_bw = price_line(p["sizes"], p["median_s"],
                                          fit_line(p["sizes"], p["median_s"])[1])
            assert p["bandwidth_Bps"] == pytest.approx(slope_bw, rel=1e-3)
            assert p["alpha_s"] == pytest.approx(excess / 2, rel=1e-3, abs=1e-9)
        if p["sweeps"] < _SWEEPS:  # sweeps stop at the first without a burst
            assert superlinearity(p["sizes"], p["median_s"]) <= _BURST
        if p["op"] != "all_reduce":
            # FSDP's collectives: measured, growing with size (fit quality not asserted: on 2
            # shared cores a reduce-scatter's medians are noisier than the all-reduce's)
            assert p["median_s"][-1] > p["median_s"][0]
            # ... swept at least as far as the pair's all-reduce grew, up to _FSDP_REACH
            reduce = next(q for q in block["pairs"]
                          if q["op"] == "all_reduce" and (q["a"], q["b"]) == (p["a"], p["b"]))
            assert max(p["sizes"]) >= min(max(reduce["sizes"]), _FSDP_REACH)
            continue
        # Fitted well, or swept as often as the probe allows (noise on 2 shared cores can
        # outlast 3 sweeps: a kept r2 of 0.76 was seen).
        assert p["fit"] == PRICE_FIT and (p["r2"] > 0.8 or p["sweeps"] == _SWEEPS), p
        # Time grows with size (only loosely: on 2 cores a 4 KiB all-reduce that meets the
        # concurrent pair's megabytes has been seen to wait 3.5 ms, a 16 MiB one takes ~17 ms).
        assert p["median_s"][-1] > p["median_s"][0]
        assert p["sizes"][:len(data["measurement"]["sizes_bytes"])] == \
            data["measurement"]["sizes_bytes"]
        assert p["bandwidth_Bps"] == bw[p["a"]][p["b"]]


@pytest.mark.e2e
@pytest.mark.slow
def test_no_collectives_leaves_the_collective_matrices_out(tmp_path: Path) -> None:
    out_file = tmp_path / "c.json"
    out = run_pdv("profile", "cluster", "--nproc-per-node", "2", "-o", str(out_file),
                  "--no-collectives", "--sizes", "4KiB,256KiB", "--max-size", "256KiB",
                  timeout=300)
    assert out.returncode == 0, out.stderr
    assert "all-reduce" not in out.stdout and "runtime memory" in out.stdout
    data = json.loads(out_file.read_text())
    assert data["links"].get("collective_bandwidth_Bps") is None
    assert data["links"].get("collective_latency_s") is None
    assert "collective" not in data["measurement"]
    assert all(d["runtime_bytes"] > 100 * 2**20 for d in data["devices"])
    # Without the collectives, all ranks at once in two windows (start, after the links).
    assert all(len(d["details"]["matmul_flops_together_windows"]) == 2 for d in data["devices"])
    assert all(len(d["details"]["matmul_flops_alone_windows"]) == 2 for d in data["devices"])
    assert all(d["small_op_step_s"] == min(d["details"]["small_op_step_alone_windows_s"])
               for d in data["devices"])
    # The after-compute probe's passes ride the same windows, and one more at the end.
    for raw in data["measurement"]["overheads"]["ranks"]:
        after = raw["after_compute"]
        assert after["passes"] == 2
        assert len(after["exchange"]["landed_rounds_s"]) == 2 * after["rounds_per_pass"]


def _pdv_processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(("stall_at", "expect"), [
    ("join", "rank 2 did not join"),
    ("round", "rank 2 stopped answering"),
    ("exit-join", "rank 2 exited first"),
    # A dead peer resets the others' sockets (named by the launcher) or torchrun sees it exit
    # first (named from torchrun's log): both name the rank.
    ("exit-round", ("no answer from rank 2", "rank 2 exited first")),
    # The same inside the all-reduce tournament, where the pairs have their own groups.
    ("all-reduce", "rank 2 stopped answering"),
    ("exit-all-reduce", ("no answer from rank 2", "rank 2 exited first")),
])
def test_a_stuck_or_dead_rank_is_named_within_the_timeout(
        tmp_path: Path, stall_at: str, expect: str | tuple[str, ...]) -> None:
    out_file = tmp_path / f"stall-{stall_at}.json"
    timeout = 8
    start = time.monotonic()
    out = run_pdv(
        "profile", "cluster", "--nproc-per-node", "3", "-o", str(out_file),
        "--timeout", str(timeout), "--sizes", "4KiB,64KiB", "--max-size", "64KiB",
        env={"PDV_TEST_STALL_RANK": "2", "PDV_TEST_STALL_AT": stall_at}, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    expected = (expect,) if isinstance(expect, str) else expect
    assert len(lines) == 1 and any(e in lines[0] for e in expected), out.stderr
    # The timeout plus process start-up, which does not count against it (python and the torch
    # import took over 20 s at load 11 on this 2-core machine): never waiting forever is the
    # point, so the bound is loose.
    assert elapsed < timeout + 90, f"took {elapsed:.1f}s with --timeout {timeout}"
    assert not out_file.exists()
    time.sleep(0.5)
    assert _pdv_processes_with(str(out_file)) == [], "ranks left running"


@pytest.mark.e2e
@pytest.mark.slow
def test_under_plain_torchrun_a_silent_peer_is_named(tmp_path: Path) -> None:
    """Without the launcher, the group timeout ends the run, naming the rank it waited on."""
    import os
    import subprocess
    import sys

    from pdv.profile.launch_local import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "--no-python", sys.executable, "-m", "pdv", "profile", "cluster",
           "-o", str(tmp_path / "c.json"), "--timeout", "5", "--sizes", "4KiB",
           "--max-size", "4KiB"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PDV_TEST_STALL_RANK": "1"}
    env.pop("PDV_PROGRESS_DIR", None)
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "rank 0: no answer from rank 1" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - start < 5 + 90  # start-up on a busy machine comes on top


def test_device_kind_is_a_stable_slug() -> None:
    from pdv.profile.hardware import device_kind

    assert device_kind("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_kind("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"


def test_a_memory_cgroup_limit_sets_a_cpu_ranks_memory(tmp_path: Path) -> None:
    """A rank inside a memory cgroup reports the limit (shared by its local ranks), not RAM."""
    import os
    import subprocess
    import sys

    line = next((ln for ln in Path("/proc/self/cgroup").read_text().splitlines()
                 if ln.split(":")[1] == "memory"), None)
    base = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/") if line else None
    if os.geteuid() != 0 or base is None or not (base / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and a cgroup v1 memory controller")
    group = base / f"pdv-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(512 * 2**20))
        code = (f"import os; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
                "from pdv.profile.hardware import memory_limit\n"
                "import json; print(json.dumps(memory_limit(2)))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, check=True)
        memory, source = json.loads(done.stdout)
        assert memory == 256 * 2**20
        assert "cgroup limit" in source and group.name in source
    finally:
        group.rmdir()


@pytest.mark.e2e
@pytest.mark.slow
def test_in_a_memory_cgroup_runtime_bytes_is_the_groups_charge(tmp_path: Path) -> None:
    """A rank whose memory is capped reports what the cap counts: torchrun's agent and the rank
    (the group's charge), not the rank's resident set alone."""
    import shlex
    import subprocess
    import sys

    from benchmarks.testbed import cgroups
    from pdv.profile.launch_local import free_port

    if cgroups.unavailable_reason():
        pytest.skip(cgroups.unavailable_reason())
    group = cgroups.RankGroup(f"pdvtest-{os.getpid()}-runtime-r0")
    out_file = tmp_path / "c.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                "--nproc-per-node=1", "--rdzv-backend=static", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "--no-python", sys.executable, "-m", "pdv",
                "profile", "cluster", "-o", str(out_file), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PDV_PROGRESS_DIR", None)
    cap = 4 * 2**30
    try:
        group.create(cpu=None, memory=cap)
        script = f"{group.shell_enter()} && exec {shlex.join(torchrun)}"
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        peak = group.peak_memory()
    finally:
        group.remove()
    (device,) = json.loads(out_file.read_text())["devices"]
    details = device["details"]
    assert "cgroup charge" in details["runtime_source"] and group.name in details["runtime_source"]
    assert device["memory_bytes"] == cap  # the cap binds memory_bytes too (one local rank)
    # The charge holds the rank's resident set and torchrun's agent beside it, and never more
    # than the group ever held.
    assert details["runtime_rss_bytes"] < device["runtime_bytes"] <= peak
    assert device["runtime_bytes"] == details["runtime_cgroup_charge_bytes"]
    # Most of it is the processes' own (anonymous) memory; the page cache is reported beside it.
    stat = details["runtime_cgroup_stat_bytes"]
    assert stat["total_rss"] > device["runtime_bytes"] / 2 and "total_cache" in stat


def test_the_sync_excess_is_the_first_all_reduce_beyond_the_sweeps_price() -> None:
    """Each paired rank: its mean first all-reduce after compute less the pair's priced
    all-reduce of the same bytes (never below 0); a rank with a bye: its kind's median."""
    from pdv.artifacts import Links
    from pdv.profile.cluster import _sync_after_compute

    n = 3
    lat = [[0.0 if i == j else 1e-4 for j in range(n)] for i in range(n)]
    bw = [[0.0 if i == j else 1e9 for j in range(n)] for i in range(n)]
    links = Links(latency_s=lat, bandwidth_Bps=bw)
    priced = all_reduce_time(ring_of(links, [0, 1]), 4096)
    devices = [{"rank": r, "kind": "cpu", "overheads": {}} for r in range(n)]
    over = [{"rank": 0, "after_compute": {"pair": [0, 1], "bytes": 4096,
                                          "first_s": priced + 0.002}},
            {"rank": 1, "after_compute": {"pair": [0, 1], "bytes": 4096, "first_s": priced / 2}},
            {"rank": 2, "after_compute": None}]
    _sync_after_compute(devices, over, links)
    got = [d["overheads"]["sync_after_compute_s"] for d in devices]
    assert got[0] == pytest.approx(0.002) and got[1] == 0.0
    assert got[2] == pytest.approx(statistics.median([0.002, 0.0]))


def test_a_pairs_sync_excess_is_each_rounds_later_end() -> None:
    """With both ranks' rounds, the pair's excess is the mean over rounds of the later of its
    two first all-reduces: a rank fast where its partner is slow does not average the step's
    end away. Both ranks of the pair carry it."""
    from pdv.artifacts import Links
    from pdv.profile.cluster import _sync_after_compute

    lat = [[0.0, 1e-4], [1e-4, 0.0]]
    bw = [[0.0, 1e9], [1e9, 0.0]]
    links = Links(latency_s=lat, bandwidth_Bps=bw)
    priced = all_reduce_time(ring_of(links, [0, 1]), 4096)
    a = [priced + x for x in (0.001, 0.0, 0.004, 0.0)]
    b = [priced + x for x in (0.0, 0.003, 0.0, 0.001)]
    devices = [{"rank": r, "kind": "cpu", "overheads": {}} for r in range(2)]
    over = [{"rank": r, "after_compute": {"pair": [0, 1], "bytes": 4096,
                                          "first_s": statistics.mean(x), "first_rounds_s": x}}
            for r, x in enumerate((a, b))]
    _sync_after_compute(devices, over, links)
    got = [d["overheads"]["sync_after_compute_s"] for d in devices]
    # Own means would be 1.25 ms and 1.0 ms; each round's later end is 2.25 ms past the price.
    assert got == [pytest.approx(0.00225), pytest.approx(0.00225)]


def test_the_sync_after_a_longer_burst_is_each_rounds_later_end_and_a_bye_takes_its_kinds() -> None:
    """After the longer burst too, the pair's excess is each round's later end less the
    sweep's price; both bursts are the rounds' mean compute. A rank with a bye takes its
    kind's median of each number; a record without the longer rounds gives no field."""
    from pdv.artifacts import Links
    from pdv.profile.cluster import _sync_after_compute

    n = 3
    lat = [[0.0 if i == j else 1e-4 for j in range(n)] for i in range(n)]
    bw = [[0.0 if i == j else 1e9 for j in range(n)] for i in range(n)]
    links = Links(latency_s=lat, bandwidth_Bps=bw)
    priced = all_reduce_time(ring_of(links, [0, 1]), 4096)

    def rec(short: list[float], burst: list[float], long: list[float],
            long_burst: list[float]) -> dict:  # fmt: skip
        return {"pair": [0, 1], "bytes": 4096, "first_s": statistics.mean(short),
                "first_rounds_s": short, "burst_rounds_s": burst,
                "long": {"first_s": statistics.mean(long), "first_rounds_s": long,
                         "burst_rounds_s": long_burst}}

    a = rec([priced + 0.001] * 2, [0.005, 0.007], [priced + x for x in (0.002, 0.010)],
            [0.05, 0.07])
    b = rec([priced] * 2, [0.006, 0.006], [priced + x for x in (0.008, 0.004)], [0.06, 0.06])
    devices = [{"rank": r, "kind": "cpu", "overheads": {}} for r in range(n)]
    over = [{"rank": 0, "after_compute": a}, {"rank": 1, "after_compute": b},
            {"rank": 2, "after_compute": None}]
    _sync_after_compute(devices, over, links)
    got = [d["overheads"]["sync_after_long_compute"] for d in devices]
    # Later ends 8 and 10 ms past the price: 9 ms; each rank's own would be 6 ms.
    assert got[0]["long_excess_s"] == pytest.approx(0.009) == got[1]["long_excess_s"]
    assert got[0]["burst_s"] == pytest.approx(0.006)
    assert got[0]["long_burst_s"] == pytest.approx(0.06)
    assert got[2] == {k: pytest.approx(statistics.median([got[0][k], got[1][k]])) for k in got[0]}
    artifacts.RankOverheads(fwd_s=0.0, bwd_s=0.0, step_s=0.0, **devices[2]["overheads"])

    old = [{**o, "after_compute": {k: v for k, v in o["after_compute"].items() if k != "long"}}
           for o in over[:2]]
    devices = [{"rank": r, "kind": "cpu", "overheads": {}} for r in range(2)]
    _sync_after_compute(devices, old, links)
    assert all("sync_after_long_compute" not in d["overheads"] for d in devices)
    assert all("sync_after_compute_s" in d["overheads"] for d in devices)


def test_a_pass_in_a_slow_spell_does_not_set_the_sync_excess() -> None:
    """The later ends are averaged within each pass and the passes' means take their median:
    one pass whose bursts ran long (the partner waiting after each) moves the excess no more
    than any other pass would; the burst lengths are taken the same way."""
    from pdv.artifacts import Links
    from pdv.profile.cluster import _sync_after_compute

    lat = [[0.0, 1e-4], [1e-4, 0.0]]
    bw = [[0.0, 1e9], [1e9, 0.0]]
    links = Links(latency_s=lat, bandwidth_Bps=bw)
    priced = all_reduce_time(ring_of(links, [0, 1]), 4096)
    quiet, spell = [0.001, 0.003], [0.030, 0.040]  # excess per round, two rounds a pass

    def rec(long_excess: list[float], long_burst: list[float]) -> dict:
        return {"pair": [0, 1], "bytes": 4096, "passes": 3, "first_s": priced,
                "first_rounds_s": [priced + 0.002] * 6, "burst_rounds_s": [0.005] * 6,
                "long": {"first_s": 0.0, "first_rounds_s": [priced + x for x in long_excess],
                         "burst_rounds_s": long_burst}}

    # Rank 0's first pass ran slow; rank 1 waited after each of its bursts.
    a = rec([0.0] * 6, [0.08, 0.07] + [0.04, 0.05] * 2)
    b = rec(spell + quiet + quiet[::-1], [0.04] * 6)
    devices = [{"rank": r, "kind": "cpu", "overheads": {}} for r in range(2)]
    _sync_after_compute(devices, [{"rank": r, "after_compute": x} for r, x in enumerate((a, b))],
                        links)
    got = [d["overheads"]["sync_after_long_compute"] for d in devices]
    # Pass means 35, 2 and 2 ms: 2 ms (the mean of all six rounds would be 13 ms).
    assert got[0]["long_excess_s"] == pytest.approx(0.002) == got[1]["long_excess_s"]
    assert got[0]["long_burst_s"] == pytest.approx(0.045)  # pass means 75, 45, 45 ms
    assert got[1]["long_burst_s"] == pytest.approx(0.04)
    assert devices[0]["overheads"]["sync_after_compute_s"] == pytest.approx(0.002)
    # Rounds that do not split into the passes evenly: the plain mean.
    assert typical_pass([1.0, 2.0, 9.0], 2) == pytest.approx(4.0)
    assert typical_pass([1.0, 3.0, 9.0, 1.0, 2.0, 2.0], 3) == pytest.approx(2.0)


def test_a_message_pays_its_receivers_exchange_excess_and_a_rank_unmeasured_its_kinds() -> None:
    """Links.exchange_latency_s[i][j]: rank j's mean landing beyond the link's α + S/β; a
    rank without a same-host pair takes the median of its device kind's; 0 on the diagonal."""
    from pdv.artifacts import Links
    from pdv.profile.cluster import _with_exchange

    n = 4
    lat = [[0.0 if i == j else 1e-4 for j in range(n)] for i in range(n)]
    bw = [[0.0 if i == j else 1e9 for j in range(n)] for i in range(n)]
    links = Links(latency_s=lat, bandwidth_Bps=bw)
    wire = 1e-4 + 32768 / 1e9
    devices = [{"rank": r, "kind": "cpu" if r < 3 else "gpu", "overheads": {}} for r in range(n)]

    def probe(src: int, landed: float) -> dict:
        return {"pair": [0, 1], "exchange": {"from": src, "bytes": 32768, "landed_s": landed}}

    over = [{"rank": 0, "after_compute": probe(1, wire + 0.003)},
            {"rank": 1, "after_compute": probe(0, wire / 2)},
            {"rank": 2, "after_compute": {"pair": [2, 3]}}, {"rank": 3, "after_compute": None}]
    got = _with_exchange(devices, over, links).exchange_latency_s
    assert got is not None
    per = [0.003, 0.0, statistics.median([0.003, 0.0]), 0.0]  # rank 3: no gpu rank measured
    for i in range(n):
        for j in range(n):
            assert got[i][j] == pytest.approx(0.0 if i == j else per[j])
    assert _with_exchange(devices, [{"rank": 0, "after_compute": None}], links) is links


def test_the_exchange_taken_in_turns_fills_its_own_matrix_and_a_lone_pair_keeps_its_busy() -> None:
    """Links.exchange_latency_alone_s: rank j's landing in the rounds its host's other pairs
    sat out, beyond α + S/β; a measured rank without such rounds (one pair on its host) keeps
    its busy excess; a file whose ranks took no turns has no such matrix."""
    from pdv.artifacts import Links
    from pdv.profile.cluster import _with_exchange

    n = 4
    lat = [[0.0 if i == j else 1e-4 for j in range(n)] for i in range(n)]
    bw = [[0.0 if i == j else 1e9 for j in range(n)] for i in range(n)]
    links = Links(latency_s=lat, bandwidth_Bps=bw)
    wire = 1e-4 + 32768 / 1e9
    devices = [{"rank": r, "kind": "cpu", "overheads": {}} for r in range(n)]

    def probe(src: int, busy: float, alone: float | None) -> dict:
        ex = {"from": src, "bytes": 32768, "landed_s": wire + busy}
        if alone is not None:
            ex["alone_landed_s"] = wire + alone
        return {"pair": [0, 1], "exchange": ex}

    over = [{"rank": 0, "after_compute": probe(1, 0.002, 0.0005)},
            {"rank": 1, "after_compute": probe(0, 0.003, 0.0004)},
            {"rank": 2, "after_compute": probe(3, 0.001, None)},
            {"rank": 3, "after_compute": probe(2, 0.004, 0.0006)}]
    got = _with_exchange(devices, over, links)
    assert got.exchange_latency_s is not None and got.exchange_latency_alone_s is not None
    busy, alone = [0.002, 0.003, 0.001, 0.004], [0.0005, 0.0004, 0.001, 0.0006]
    for i in range(n):
        for j in range(n):
            assert got.exchange_latency_s[i][j] == pytest.approx(0.0 if i == j else busy[j])
            assert got.exchange_latency_alone_s[i][j] == pytest.approx(
                0.0 if i == j else alone[j])
    without = [{"rank": o["rank"], "after_compute": probe(o["after_compute"]["exchange"]["from"],
                                                          0.002, None)} for o in over]
    assert _with_exchange(devices, without, links).exchange_latency_alone_s is None
