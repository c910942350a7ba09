"""The host bound: ranks that share a host's cores cannot all compute at their alone speed."""

from __future__ import annotations

import pytest

from pdv.artifacts import PlanStage
from pdv.cost.compute import speed_factor
from pdv.cost.simulate import host_capacity, simulate
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
    # pp=4 with 1 micro-batch: one rank computes at a time, so sharing 2 cores costs nothing.
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, matmul_flops=1e12)
    plan = chain_plan(4, num_micro=1)
    alone = simulate(plan, {"cpu": prof}, shared_host(4, 1.0))
    shared = simulate(plan, {"cpu": prof}, shared_host(4, 0.5))
    assert shared.step_time_s == pytest.approx(alone.step_time_s, rel=1e-9)
    # With many micro-batches the pipeline is full and the shared cores bind again.
    full = chain_plan(4, num_micro=16)
    t_alone = simulate(full, {"cpu": prof}, shared_host(4, 1.0)).step_time_s
    t_shared = simulate(full, {"cpu": prof}, shared_host(4, 0.5)).step_time_s
    assert t_shared == pytest.approx(4 * 16 * 0.03 / 2, rel=1e-6) and t_shared > t_alone
