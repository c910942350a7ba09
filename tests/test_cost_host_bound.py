"""Shared cores: ranks on a host with a measured capacity are processor-shared in the simulator."""

from __future__ import annotations

import pytest

from pdv.artifacts import PlanStage
from pdv.cost.compute import speed_factor
from pdv.cost.schedules import stage_layout
from pdv.cost.simulate import Sharing, host_capacity, simulate, simulate_costs
from tests.test_cost_builders import chain_plan, make_cluster, make_plan, make_profile


def shared_host(n: int, share: float, alone: float = 1e12):
    """n ranks on one host; each measured `share` of its alone speed with all probing at once."""
    cluster = make_cluster(n, matmul_flops=[alone * share] * n)
    devices = [d.model_copy(update={"host": "box", "matmul_flops_alone": alone})
               for d in cluster.devices]
    return cluster.model_copy(update={"devices": devices})


def test_capacity_is_the_sum_of_measured_shares():
    assert host_capacity(shared_host(4, 0.5)) == pytest.approx({"box": 2.0})
    # Ranks that keep their full speed together (one GPU each) make no bound.
    assert host_capacity(shared_host(4, 1.0)) == {}
    # Without the alone probe (an older or declared cluster) nothing is assumed.
    assert host_capacity(make_cluster(4, matmul_flops=[1e12] * 4)) == {}


def test_speed_prefers_the_alone_probe():
    prof = make_profile(matmul_flops=1e12)
    dev = shared_host(1, 0.25).devices[0]
    assert speed_factor(prof, dev) == pytest.approx(1.0)
    assert speed_factor(prof, dev.model_copy(update={"matmul_flops_alone": None})) == (
        pytest.approx(4.0))


def test_data_parallel_on_shared_cores_is_bound_by_total_work():
    # 4 replicas of a 1-layer model, all busy all the time: on 2 cores' worth they take twice
    # their alone time; the schedule alone (no contention) would say 1x.
    prof = make_profile(n_layers=1, fwd=0.01, bwd=0.02, matmul_flops=1e12)
    plan = make_plan([PlanStage(layers=(0, 1), ranks=[0, 1, 2, 3], dp=4)], mbs=4, num_micro=2)
    alone = simulate(plan, {"cpu": prof}, shared_host(4, 1.0))
    shared = simulate(plan, {"cpu": prof}, shared_host(4, 0.5))
    assert alone.step_time_s == pytest.approx(2 * 0.03, rel=1e-3)  # + a tiny grad sync
    assert shared.step_time_s == pytest.approx(2 * alone.step_time_s, rel=1e-3)
    assert any("capacity" in n for n in shared.notes)


def test_pipeline_bubbles_leave_cores_for_the_busy_ranks():
    # pp=4 with 1 micro-batch (GPipe: torch's 1F1B wants M ≥ stages): one rank computes at a
    # time, so sharing 2 cores costs nothing.
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, matmul_flops=1e12)
    plan = chain_plan(4, num_micro=1, schedule="GPipe")
    alone = simulate(plan, {"cpu": prof}, shared_host(4, 1.0))
    shared = simulate(plan, {"cpu": prof}, shared_host(4, 0.5))
    assert shared.step_time_s == pytest.approx(alone.step_time_s, rel=1e-9)
    # With many micro-batches the pipeline is full and the shared cores bind again.
    full = chain_plan(4, num_micro=16)
    t_alone = simulate(full, {"cpu": prof}, shared_host(4, 1.0)).step_time_s
    t_shared = simulate(full, {"cpu": prof}, shared_host(4, 0.5)).step_time_s
    bound = 4 * 16 * 0.03 / 2  # all the host's work on its 2 cores' worth
    # Fill and drain run with fewer ranks than cores: above the bound by less than one trip.
    assert bound < t_shared < bound + 3 * 0.03 and t_shared > t_alone


def test_processor_sharing_by_hand():
    # pp=2 on one host measured at 1.5 ranks' worth; GPipe, 2 micro-batches, F 1 s, B 2 s.
    # Alone a rank runs at full speed; both computing, each runs at 0.75:
    # s0 F0 [0,1]; s0 F1 + s1 F0 [1, 1+1/0.75]; s1 F1 +1; s1 B0 +2; s0 B0 + s1 B1 (2 at 0.75)
    # then s0 B1 alone +2 = 10 s, where the schedule alone takes 9 s and total work / 1.5 is 8 s.
    prof = make_profile(n_layers=2, fwd=1.0, bwd=2.0, out=0, matmul_flops=1e12)
    plan = chain_plan(2, num_micro=2, schedule="GPipe")
    alone = simulate(plan, {"cpu": prof}, shared_host(2, 1.0))
    shared = simulate(plan, {"cpu": prof}, shared_host(2, 0.75))
    assert alone.step_time_s == pytest.approx(9.0)
    assert shared.step_time_s == pytest.approx(10.0)
    b0 = next(e for e in shared.events if (e.name, e.stage, e.micro) == ("B", 0, 0))
    assert (b0.start_s, b0.end_s) == pytest.approx((1 + 1 / 0.75 + 3, 8.0))
    # ... and says what sharing cores costs that it does not price
    assert any("processor sharing" in n and "Not priced" in n for n in shared.notes)
    assert not any("processor sharing" in n for n in alone.notes)


def test_sharing_with_room_for_everyone_changes_nothing():
    # A measured capacity at least the ranks' count is no sharing: the plain engine's times.
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, matmul_flops=1e12, optimizer_s=0.005)
    plan = make_plan([PlanStage(layers=(0, 2), ranks=[0, 1], dp=2),
                      PlanStage(layers=(2, 4), ranks=[2, 3], dp=2)], mbs=2, num_micro=4)

    base = simulate(plan, {"cpu": prof}, shared_host(4, 1.0))
    layout = stage_layout([s.ranks for s in plan.stages], "1F1B")
    roomy = Sharing({"box": 4.0}, [["box", "box"], ["box", "box"]])
    again = simulate_costs(base.costs, layout, "1F1B", 4, roomy)
    assert again.step_time_s == pytest.approx(base.step_time_s, rel=1e-12)
    key = lambda e: (e.name, e.stage, e.micro)  # noqa: E731
    times = lambda r: sorted((key(e), e.start_s, e.end_s) for e in r.events)  # noqa: E731
    assert [k for k, *_ in times(again)] == [k for k, *_ in times(base)]
    # pytest 9.2 dropped approx over nested containers: compare the flat start/end lists
    flat = lambda r: [t for _, *se in times(r) for t in se]  # noqa: E731
    assert flat(again) == pytest.approx(flat(base))


def _with_exchange(cluster, busy: float, alone: float | None):
    n = len(cluster.devices)
    links = cluster.links.model_copy(update={
        "exchange_latency_s": [[0.0 if i == j else busy for j in range(n)] for i in range(n)],
        "exchange_latency_alone_s": None if alone is None else
        [[0.0 if i == j else alone for j in range(n)] for i in range(n)]})
    return cluster.model_copy(update={"links": links})


def test_a_transfer_while_the_hosts_other_ranks_idle_pays_the_excess_measured_alone():
    """pp4 with one micro-batch on 4 ranks sharing a host: no rank but the two ends is at work
    during any of its 6 transfers, so each pays the alone excess, and the trace shows it;
    priced without the alone matrix each pays the busy one."""
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, matmul_flops=1e12)
    plan = chain_plan(4, num_micro=1, schedule="GPipe")
    host = shared_host(4, 0.5)
    base = simulate(plan, {"cpu": prof}, host).step_time_s
    busy_only = simulate(plan, {"cpu": prof}, _with_exchange(host, 0.003, None))
    both = simulate(plan, {"cpu": prof}, _with_exchange(host, 0.003, 0.001))
    assert busy_only.step_time_s == pytest.approx(base + 6 * 0.003)
    assert both.step_time_s == pytest.approx(base + 6 * 0.001)
    quiet = simulate(plan, {"cpu": prof}, host)
    sends = [e for e in both.events if e.name.startswith("send-")]
    plain = [e for e in quiet.events if e.name.startswith("send-")]
    assert len(sends) == 6
    for e, p in zip(sends, plain, strict=True):
        assert e.end_s - e.start_s == pytest.approx(p.end_s - p.start_s + 0.001)


def test_replicas_exchanging_at_once_fill_the_host_and_pay_the_busy_excess():
    """pp2 × dp2 on the 4 ranks: both pairs exchange together, as in the busy probe."""
    prof = make_profile(n_layers=2, fwd=0.01, bwd=0.02, matmul_flops=1e12)
    plan = make_plan([PlanStage(layers=(0, 1), ranks=[0, 1], dp=2),
                      PlanStage(layers=(1, 2), ranks=[2, 3], dp=2)],
                     mbs=2, num_micro=1, schedule="GPipe")
    host = shared_host(4, 0.5)
    busy_only = simulate(plan, {"cpu": prof}, _with_exchange(host, 0.003, None)).step_time_s
    both = simulate(plan, {"cpu": prof}, _with_exchange(host, 0.003, 0.001)).step_time_s
    assert both == pytest.approx(busy_only)
    assert both > simulate(plan, {"cpu": prof}, host).step_time_s + 2 * 0.003 - 1e-9


def test_busy_share_counts_the_hosts_ranks_at_work_beyond_one_pair():
    sharing = Sharing({"box": 2.0}, [["box"], ["box"], ["box", "box"], ["other"]],
                      {"box": 4, "other": 2})
    assert sharing.busy_share({0, 1}, 0) == 0.0
    assert sharing.busy_share({0, 2}, 0) == pytest.approx(0.5)
    assert sharing.busy_share({0, 1, 2}, 1) == 1.0
    assert sharing.busy_share({0, 1, 2, 3}, 3) == 0.0  # a host of one pair: nobody else
