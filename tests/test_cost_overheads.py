"""The measured pipeline overheads: schedule work per micro-batch and step, message CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdv import artifacts
from pdv.artifacts import (
    ClusterArtifact,
    FsdpUnitCost,
    LayerChoice,
    MessageCost,
    Plan,
    PlanStage,
    RankOverheads,
)
from pdv.cost.comm import Ring, message_cpu_time
from pdv.cost.simulate import simulate
from pdv.cost.stage import stage_cost
from pdv.cost.terms import RankView, RingView, StageGroup, price_layers, price_ranges
from pdv.plan.objective import stage_prices
from pdv.plan.problem import PlanProblem, StageSpec
from tests.test_cost_builders import chain_plan, make_cluster, make_plan, make_profile

OVER = RankOverheads(fwd_s=0.1, bwd_s=0.2, step_s=0.5,
                     send_cpu=MessageCost(a_s=0.01, b_s_per_byte=1e-4),
                     recv_cpu=MessageCost(a_s=0.02, b_s_per_byte=2e-4))  # fmt: skip


def _with_overheads(cluster: ClusterArtifact, ranks: list[int] | None = None) -> ClusterArtifact:
    ranks = list(range(len(cluster.devices))) if ranks is None else ranks
    devices = [d.model_copy(update={"overheads": OVER}) if d.rank in ranks else d
               for d in cluster.devices]  # fmt: skip
    return cluster.model_copy(update={"devices": devices})


def test_each_rank_pays_its_own_schedule_work_before_the_slowest_is_taken() -> None:
    """fwd = max over ranks of (layers + that rank's overhead), not max layers + max overhead."""
    prof = {"a": make_profile("a", n_layers=2, fwd=0.3, bwd=0.1),
            "b": make_profile("b", n_layers=2, fwd=0.1, bwd=0.1)}  # fmt: skip
    group = StageGroup(
        ranks=(RankView("a", 1.0, 0.0, 1e9, 0.0, 0.0, 0.0),
               RankView("b", 1.0, 0.0, 1e9, 0.5, 0.05, 0.7)),
        tp_rings=(RingView(Ring(1, 0.0, float("inf")), ("a", "b")),),
        dp_rings=(RingView(Ring(1, 0.0, float("inf")), ("a",)),),
        tp=1, dp=1,
    )  # fmt: skip
    one = price_layers(prof, group, 1, 0, [LayerChoice()] * 2, num_micro=1)
    assert float(one.compute_fwd_s) == pytest.approx(max(0.6, 0.2 + 0.5))
    assert float(one.compute_bwd_s) == pytest.approx(max(0.2, 0.2 + 0.05))
    assert float(one.optimizer_s) == pytest.approx(0.7)
    table = price_ranges(prof, group, 1, LayerChoice(), np.array([0, 1, 2]), num_micro=1)
    for x, y in ((0, 1), (0, 2), (1, 2)):
        lo, hi = x, y
        ref = price_layers(prof, group, 1, lo, [LayerChoice()] * (hi - lo), num_micro=1)
        assert table.fwd_s[x, y] == pytest.approx(float(ref.fwd_s))
        assert table.optimizer_s[x, y] == pytest.approx(float(ref.optimizer_s))


def test_a_middle_stage_pays_the_cpu_of_the_messages_it_receives_and_sends() -> None:
    """Stage 1 of 3: forward += recv(in) + send(out); backward += recv(grad) + send(grad)."""
    prof = make_profile(n_layers=3, fwd=1.0, bwd=2.0, out=100)
    plan = chain_plan(3, num_micro=2, mbs=2)
    plain, measured = make_cluster(3, bw=1e9), _with_overheads(make_cluster(3, bw=1e9))
    kw = dict(mbs=2, schedule="1F1B", stage_index=1, num_stages=3, num_micro=2)
    base = stage_cost({"cpu": prof}, plain, plan.stages[1], plan.stages[2],
                      prev_stage=plan.stages[0], **kw)  # type: ignore[arg-type]
    got = stage_cost({"cpu": prof}, measured, plan.stages[1], plan.stages[2],
                     prev_stage=plan.stages[0], **kw)  # type: ignore[arg-type]
    msg = 200.0  # 100 B per sample, micro-batch of 2
    cpu = message_cpu_time(OVER.recv_cpu, msg) + message_cpu_time(OVER.send_cpu, msg)
    assert got.fwd_s == pytest.approx(base.fwd_s + OVER.fwd_s + cpu)
    assert got.bwd_s == pytest.approx(base.bwd_s + OVER.bwd_s + cpu)
    assert got.optimizer_s == pytest.approx(base.optimizer_s + OVER.step_s)
    assert got.send_s == base.send_s  # the wire is priced as before
    first = stage_cost({"cpu": prof}, measured, plan.stages[0], plan.stages[1],
                       **{**kw, "stage_index": 0})  # type: ignore[arg-type]
    # The first stage receives nothing in its forward: only its send's CPU.
    assert first.fwd_s == pytest.approx(2 * 1.0 + OVER.fwd_s + message_cpu_time(OVER.send_cpu, msg))


def test_one_stage_step_adds_the_overheads_exactly() -> None:
    """A one-rank pipeline: step = M·(f + b + fwd_s + bwd_s) + step_s (no messages)."""
    prof = make_profile(n_layers=2, fwd=0.5, bwd=1.0)
    plan = make_plan([PlanStage(layers=(0, 2), ranks=[0])], num_micro=3)
    sim = simulate(plan, {"cpu": prof}, _with_overheads(make_cluster(1)))
    assert sim.step_time_s == pytest.approx(3 * (1.0 + 2.0 + 0.1 + 0.2) + 0.5)
    assert not any("unpriced" in n for n in sim.notes)


def test_a_cluster_without_the_probe_loads_prices_zero_and_says_so() -> None:
    """Clusters profiled before the probe keep their bytes and are noted as unpriced."""
    old = make_cluster(2)
    text = artifacts.dumps(old)
    assert "overheads" not in json.loads(text)["devices"][0]
    assert artifacts.parse(json.loads(text)) == old
    sim = simulate(chain_plan(2), {"cpu": make_profile(n_layers=2)}, old)
    assert any("unpriced (0) on every rank" in n for n in sim.notes)
    half = _with_overheads(make_cluster(2), [1])
    sim = simulate(chain_plan(2), {"cpu": make_profile(n_layers=2)}, half)
    assert any("unpriced (0) on ranks [0]" in n for n in sim.notes)
    again = artifacts.parse(json.loads(artifacts.dumps(half)))
    assert again.devices[1].overheads == OVER


def test_the_planner_prices_a_stage_as_the_simulator_does() -> None:
    """The DP's view (worst rank of each kind) and stage_cost agree on a one-stage plan."""
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, optimizer_s=0.001)
    cl = _with_overheads(make_cluster(2), [1])
    problem = PlanProblem({"cpu": prof}, cl, 4)
    mine = stage_prices(problem, [StageSpec(0, 4, (0, 1), LayerChoice())], 2)[0]
    ref = stage_cost({"cpu": prof}, cl, PlanStage(layers=(0, 4), ranks=[0, 1], dp=2), None,
                     mbs=2, schedule="1F1B", stage_index=0, num_stages=1, num_micro=2)
    assert mine.fwd_s == pytest.approx(ref.fwd_s)
    assert mine.bwd_s == pytest.approx(ref.bwd_s)
    assert mine.sync_s == pytest.approx(ref.grad_sync_s + ref.optimizer_s)
    assert ref.fwd_s == pytest.approx(0.04 + OVER.fwd_s)


def test_a_stage_with_replicas_pays_the_sync_after_compute_once_per_step() -> None:
    """grad sync += the slowest rank's measured excess when dp > 1; nothing when dp = 1; the
    planner's price, CP-SAT's and the simulator's agree."""
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, optimizer_s=0.001)
    late = OVER.model_copy(update={"sync_after_compute_s": 0.003})
    base = make_cluster(2)
    devices = [d.model_copy(update={"overheads": late if d.rank == 1 else OVER})
               for d in base.devices]  # fmt: skip
    cl = base.model_copy(update={"devices": devices})
    kw = dict(mbs=2, schedule="1F1B", stage_index=0, num_stages=1, num_micro=2)
    dp2 = PlanStage(layers=(0, 4), ranks=[0, 1], dp=2)
    with_excess = stage_cost({"cpu": prof}, cl, dp2, None, **kw)  # type: ignore[arg-type]
    without = stage_cost({"cpu": prof}, _with_overheads(base), dp2, None,
                         **kw)  # type: ignore[arg-type]
    assert with_excess.grad_sync_s == pytest.approx(without.grad_sync_s + 0.003)
    assert with_excess.fwd_s == without.fwd_s and with_excess.optimizer_s == without.optimizer_s
    one = PlanStage(layers=(0, 4), ranks=[1], dp=1)
    assert stage_cost({"cpu": prof}, cl, one, None,
                      **kw).grad_sync_s == 0.0  # type: ignore[arg-type]
    problem = PlanProblem({"cpu": prof}, cl, 4)
    mine = stage_prices(problem, [StageSpec(0, 4, (0, 1), LayerChoice())], 2)[0]
    assert mine.sync_s == pytest.approx(with_excess.grad_sync_s + with_excess.optimizer_s)
    plan = make_plan([dp2], num_micro=2, mbs=2)
    step = simulate(plan, {"cpu": prof}, cl).step_time_s
    assert step == pytest.approx(simulate(plan, {"cpu": prof}, _with_overheads(base)).step_time_s
                                 + 0.003)


@pytest.mark.parametrize("num_micro", [1, 2, 4, 8])
def test_a_stages_sync_excess_grows_with_its_compute_per_step(num_micro: int) -> None:
    """Between the probe's two bursts the excess lies on the line between their excesses, by
    the stage's compute per step (its micro-batches' forwards and backwards); past the longer
    burst it is held. The simulator, the planner's price and the stage cost agree."""
    from pdv.artifacts import SyncAfterLongCompute

    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, optimizer_s=0.001)
    grows = OVER.model_copy(update={
        "sync_after_compute_s": 0.002,
        "sync_after_long_compute": SyncAfterLongCompute(burst_s=0.005, long_burst_s=2.0,
                                                        long_excess_s=0.010)})
    flat = OVER.model_copy(update={"sync_after_compute_s": 0.002})
    base = make_cluster(2)

    def on(o: RankOverheads) -> ClusterArtifact:
        return base.model_copy(update={"devices": [d.model_copy(update={"overheads": o})
                                                   for d in base.devices]})

    kw = dict(mbs=2, schedule="1F1B", stage_index=0, num_stages=1, num_micro=num_micro)
    dp2 = PlanStage(layers=(0, 4), ranks=[0, 1], dp=2)
    got = stage_cost({"cpu": prof}, on(grows), dp2, None, **kw)  # type: ignore[arg-type]
    ref = stage_cost({"cpu": prof}, on(flat), dp2, None, **kw)  # type: ignore[arg-type]
    step = num_micro * (got.fwd_s + got.bwd_s)  # 0.42 s a micro-batch: 8 pass the longer burst
    want = 0.008 * min(1.0, (step - 0.005) / 1.995)
    assert got.grad_sync_s - ref.grad_sync_s == pytest.approx(want)
    problem = PlanProblem({"cpu": prof}, on(grows), 2 * num_micro)
    mine = stage_prices(problem, [StageSpec(0, 4, (0, 1), LayerChoice())], 2)[0]
    assert mine.sync_s == pytest.approx(got.grad_sync_s + got.optimizer_s)
    plan = make_plan([dp2], num_micro=num_micro, mbs=2)
    assert simulate(plan, {"cpu": prof}, on(grows)).step_time_s == pytest.approx(
        simulate(plan, {"cpu": prof}, on(flat)).step_time_s + want)


def test_fsdp_collectives_are_priced_on_their_own_measured_links() -> None:
    """all_gather/reduce_scatter use the measured gather/scatter α/β of the ring's slowest hop;
    without them, the all-reduce's (the pricing before the sweep)."""
    from pdv.artifacts import Links
    from pdv.cost.comm import all_gather_time, all_reduce_time, reduce_scatter_time, ring_of

    n = 3
    p2p = [[0.0 if i == j else 1e9 for j in range(n)] for i in range(n)]
    lat = [[0.0 if i == j else 1e-5 for j in range(n)] for i in range(n)]
    coll = [[0.0 if i == j else 4e8 for j in range(n)] for i in range(n)]
    gather = [[0.0 if i == j else 2e8 for j in range(n)] for i in range(n)]
    scatter = [[0.0 if i == j else 1e8 for j in range(n)] for i in range(n)]
    scatter[1][2] = 5e7  # the slowest hop of ring 0→1→2→0
    g_lat = [[0.0 if i == j else 3e-5 for j in range(n)] for i in range(n)]
    old = Links(latency_s=lat, bandwidth_Bps=p2p, collective_latency_s=lat,
                collective_bandwidth_Bps=coll)  # fmt: skip
    new = old.model_copy(update={"gather_latency_s": g_lat, "gather_bandwidth_Bps": gather,
                                 "scatter_latency_s": g_lat, "scatter_bandwidth_Bps": scatter})
    s = 6e6
    ring = ring_of(new, [2, 0, 1])
    assert all_gather_time(ring, s) == pytest.approx(2 / 3 * s / 2e8 + 2 * 3e-5)
    assert reduce_scatter_time(ring, s) == pytest.approx(2 / 3 * s / 5e7 + 2 * 3e-5)
    assert all_reduce_time(ring, s) == pytest.approx(4 / 3 * s / 4e8 + 4 * 1e-5)  # unchanged
    before = ring_of(old, [2, 0, 1])
    assert reduce_scatter_time(before, s) == pytest.approx(2 / 3 * s / 4e8 + 2 * 1e-5)
    assert all_gather_time(before, s) == reduce_scatter_time(before, s)
    # Older clusters keep their bytes (the new matrices are left out, not written as null).
    cl = make_cluster(2)
    assert "gather_latency_s" not in json.loads(artifacts.dumps(cl))["links"]


FSDP_OWN = OVER.model_copy(update={
    "fsdp_gather": FsdpUnitCost(a_s=0.003, b_s_per_byte=2e-6),
    "fsdp_reduce_scatter": FsdpUnitCost(a_s=0.005, b_s_per_byte=1e-6)})


def _fsdp_cluster(n: int, ranks: list[int]) -> ClusterArtifact:
    cl = make_cluster(n)
    devices = [d.model_copy(update={"overheads": FSDP_OWN if d.rank in ranks else OVER})
               for d in cl.devices]
    return cl.model_copy(update={"devices": devices})


@pytest.mark.parametrize("num_micro,n_layers", [(1, 2), (3, 2), (4, 5)])
def test_fsdp_own_work_is_paid_per_unit_in_each_backward_and_once_more_per_step(
        num_micro: int, n_layers: int) -> None:
    """step grows by (M + 1)·n·gather-op + n·reduce-scatter, and only where FSDP runs."""
    prof = make_profile(n_layers=n_layers, fwd=0.01, bwd=0.02, params=4000)
    gather = 0.003 + 2e-6 * 4000
    scatter = 0.005 + 1e-6 * 4000  # grads: as many bytes as parameters
    fsdp = make_plan([PlanStage(layers=(0, n_layers), ranks=[0, 1], dp=2, fsdp=True)],
                     mbs=2, num_micro=num_micro)
    plain = _with_overheads(make_cluster(2))
    own = _fsdp_cluster(2, [0, 1])
    before = simulate(fsdp, {"cpu": prof}, plain).step_time_s
    after = simulate(fsdp, {"cpu": prof}, own).step_time_s
    assert after - before == pytest.approx((num_micro + 1) * n_layers * gather
                                           + n_layers * scatter)
    # No FSDP, or FSDP over one replica (nothing sharded): nothing to pay.
    ddp = fsdp.model_copy(update={"stages": [fsdp.stages[0].model_copy(update={"fsdp": False})]})
    assert simulate(ddp, {"cpu": prof}, own).step_time_s == pytest.approx(
        simulate(ddp, {"cpu": prof}, plain).step_time_s)
    alone = make_plan([PlanStage(layers=(0, n_layers), ranks=[0], fsdp=True)], mbs=2,
                      num_micro=num_micro)
    assert simulate(alone, {"cpu": prof}, own).step_time_s == pytest.approx(
        simulate(alone, {"cpu": prof}, plain).step_time_s)


def test_a_layer_without_parameters_is_no_fsdp_unit() -> None:
    prof = make_profile(n_layers=3, params=0)
    fsdp = make_plan([PlanStage(layers=(0, 3), ranks=[0, 1], dp=2, fsdp=True)], mbs=2)
    assert simulate(fsdp, {"cpu": prof}, _fsdp_cluster(2, [0, 1])).step_time_s == pytest.approx(
        simulate(fsdp, {"cpu": prof}, _with_overheads(make_cluster(2))).step_time_s)


def test_the_planner_prices_fsdp_own_work_as_the_simulator_does() -> None:
    """One rank of the kind measured more own work: the DP's worst-of-kind view pays it."""
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, optimizer_s=0.001, params=3000)
    cl = _fsdp_cluster(2, [1])
    problem = PlanProblem({"cpu": prof}, cl, 4)
    choice = LayerChoice(fsdp=True)
    mine = stage_prices(problem, [StageSpec(0, 4, (0, 1), choice)], 2)[0]
    ref = stage_cost({"cpu": prof}, cl, PlanStage(layers=(0, 4), ranks=[0, 1], dp=2, fsdp=True),
                     None, mbs=2, schedule="1F1B", stage_index=0, num_stages=1, num_micro=2)
    assert mine.fwd_s == pytest.approx(ref.fwd_s)
    assert mine.bwd_s == pytest.approx(ref.bwd_s)
    assert mine.sync_s == pytest.approx(ref.grad_sync_s + ref.optimizer_s)
    plain = stage_cost({"cpu": prof}, _with_overheads(make_cluster(2)),
                       PlanStage(layers=(0, 4), ranks=[0, 1], dp=2, fsdp=True), None, mbs=2,
                       schedule="1F1B", stage_index=0, num_stages=1, num_micro=2)
    assert ref.bwd_s - plain.bwd_s == pytest.approx(4 * (0.003 + 2e-6 * 3000))


def test_an_fsdp_plan_on_a_cluster_without_the_fsdp_probe_says_so() -> None:
    prof = make_profile(n_layers=2)
    fsdp = make_plan([PlanStage(layers=(0, 2), ranks=[0, 1], dp=2, fsdp=True)], mbs=2)
    notes = simulate(fsdp, {"cpu": prof}, _fsdp_cluster(2, [1])).notes
    assert any("FSDP's own work" in n and "ranks [0]" in n for n in notes)
    assert not any("FSDP's own work" in n
                   for n in simulate(fsdp, {"cpu": prof}, _fsdp_cluster(2, [0, 1])).notes)
    ddp = make_plan([PlanStage(layers=(0, 2), ranks=[0, 1], dp=2)], mbs=2)
    assert not any("FSDP's own work" in n
                   for n in simulate(ddp, {"cpu": prof}, _with_overheads(make_cluster(2))).notes)


def test_an_fsdp_stage_on_cpu_ranks_warns_of_the_resident_heap() -> None:
    prof = make_profile(n_layers=2)
    fsdp = make_plan([PlanStage(layers=(0, 2), ranks=[0, 1], dp=2, fsdp=True)], mbs=2)
    cpu = _fsdp_cluster(2, [0, 1])

    def heap(plan: Plan, cluster: ClusterArtifact) -> list[str]:
        return [n for n in simulate(plan, {d.kind: prof for d in cluster.devices}, cluster).notes
                if "resident" in n]

    assert len(heap(fsdp, cpu)) == 1 and "ranks [0, 1]" in heap(fsdp, cpu)[0]
    ddp = make_plan([PlanStage(layers=(0, 2), ranks=[0, 1], dp=2)], mbs=2)
    assert heap(ddp, cpu) == []
    alone = make_plan([PlanStage(layers=(0, 2), ranks=[0], fsdp=True)], mbs=2)
    assert heap(alone, cpu) == []
    gpu = cpu.model_copy(update={"devices": [d.model_copy(update={"kind": "h100"})
                                             for d in cpu.devices]})
    assert heap(fsdp, gpu) == []


def test_a_pipeline_message_pays_its_measured_exchange_excess_on_the_critical_path() -> None:
    """Two stages, one micro-batch: the activation and the gradient each lie on the step's
    critical path, so the step grows by the two receivers' excesses exactly; the planner's
    transfer price grows by the same."""
    prof = make_profile(n_layers=2, fwd=0.01, bwd=0.02, out=1000)
    plan = chain_plan(2, num_micro=1, schedule="GPipe")
    plain = make_cluster(2, bw=1e8, lat=1e-4)
    links = plain.links.model_copy(update={"exchange_latency_s": [[0.0, 0.003], [0.005, 0.0]]})
    slow = plain.model_copy(update={"links": links})
    base = simulate(plan, {"cpu": prof}, plain).step_time_s
    got = simulate(plan, {"cpu": prof}, slow).step_time_s
    assert got == pytest.approx(base + 0.003 + 0.005)
    kw = dict(mbs=1, schedule="GPipe", stage_index=0, num_stages=2, num_micro=1)
    a = stage_cost({"cpu": prof}, plain, plan.stages[0], plan.stages[1], **kw)  # type: ignore[arg-type]
    b = stage_cost({"cpu": prof}, slow, plan.stages[0], plan.stages[1], **kw)  # type: ignore[arg-type]
    assert b.send_s == pytest.approx(a.send_s + 0.003)
    assert b.grad_send_s == pytest.approx(a.grad_send_s + 0.005)
    for cl, cost in ((plain, a), (slow, b)):
        mine = stage_prices(PlanProblem({"cpu": prof}, cl, 1),
                            [StageSpec(0, 1, (0,), LayerChoice()),
                             StageSpec(1, 2, (1,), LayerChoice())], 1)[0]
        assert mine.send_s == pytest.approx(cost.send_s + cost.grad_send_s)


def test_a_boundary_of_several_tensors_or_slices_pays_one_excess_per_rank_pair() -> None:
    """activation_transfer_time: α + S/β per message, the exchange excess once per (sender,
    receiver) pair; a dp2 → dp1 boundary's receiver meets two senders, so it pays two."""
    from pdv.cost.stage import activation_transfer_time

    plain = make_cluster(3, bw=1e8, lat=1e-4).links
    ex = [[0.0 if i == j else 0.002 for j in range(3)] for i in range(3)]
    slow = plain.model_copy(update={"exchange_latency_s": ex})
    one, two = PlanStage(layers=(0, 1), ranks=[0]), PlanStage(layers=(1, 2), ranks=[1])
    for tensors in (1, 3):
        a = activation_transfer_time(plain, one, two, 4, 1000.0, tensors)
        assert activation_transfer_time(slow, one, two, 4, 1000.0, tensors) == pytest.approx(
            a + 0.002)
    dp2 = PlanStage(layers=(0, 1), ranks=[0, 2], dp=2)
    a = activation_transfer_time(plain, dp2, two, 4, 1000.0, 3)
    assert activation_transfer_time(slow, dp2, two, 4, 1000.0, 3) == pytest.approx(a + 0.004)


def test_plain_replicas_pay_their_gradient_passes_per_all_reduced_byte() -> None:
    """grad sync += the slowest rank's measured passes rate × the stage's plain gradient bytes
    when dp > 1 (the flat buffer's zero_ and div_); FSDP layers and dp = 1 pay none; the
    planner's price and the simulator's agree."""
    prof = make_profile(n_layers=4, fwd=0.01, bwd=0.02, optimizer_s=0.001)
    grads = sum(layer.grad_bytes for layer in prof.layers)
    assert grads > 0
    slow = OVER.model_copy(update={"grad_passes_s_per_byte": 2e-9})
    quick = OVER.model_copy(update={"grad_passes_s_per_byte": 5e-10})
    base = make_cluster(2)
    devices = [d.model_copy(update={"overheads": slow if d.rank == 1 else quick})
               for d in base.devices]  # fmt: skip
    cl = base.model_copy(update={"devices": devices})
    kw = dict(mbs=2, schedule="1F1B", stage_index=0, num_stages=1, num_micro=2)
    dp2 = PlanStage(layers=(0, 4), ranks=[0, 1], dp=2)
    priced = stage_cost({"cpu": prof}, cl, dp2, None, **kw)  # type: ignore[arg-type]
    without = stage_cost({"cpu": prof}, _with_overheads(base), dp2, None,
                         **kw)  # type: ignore[arg-type]
    assert priced.grad_sync_s == pytest.approx(without.grad_sync_s + 2e-9 * grads)
    assert priced.fwd_s == without.fwd_s and priced.optimizer_s == without.optimizer_s
    one = PlanStage(layers=(0, 4), ranks=[1], dp=1)
    assert stage_cost({"cpu": prof}, cl, one, None,
                      **kw).grad_sync_s == 0.0  # type: ignore[arg-type]
    # FSDP layers' gradients are reduce-scattered, not summed in the flat buffer.
    fsdp = PlanStage(layers=(0, 4), ranks=[0, 1], dp=2, fsdp=True)
    assert stage_cost({"cpu": prof}, cl, fsdp, None, **kw).grad_sync_s == pytest.approx(
        stage_cost({"cpu": prof}, _with_overheads(base), fsdp, None,
                   **kw).grad_sync_s)  # type: ignore[arg-type]
    problem = PlanProblem({"cpu": prof}, cl, 4)
    mine = stage_prices(problem, [StageSpec(0, 4, (0, 1), LayerChoice())], 2)[0]
    assert mine.sync_s == pytest.approx(priced.grad_sync_s + priced.optimizer_s)
    plan = make_plan([dp2], num_micro=2, mbs=2)
    step = simulate(plan, {"cpu": prof}, cl).step_time_s
    assert step == pytest.approx(simulate(plan, {"cpu": prof}, _with_overheads(base)).step_time_s
                                 + 2e-9 * grads)


@pytest.mark.parametrize("batched", [None, 0.002, 0.0])
def test_a_boundarys_tensors_posted_together_pay_the_fixed_cpu_once(batched: float | None) -> None:
    """A boundary of three tensors is posted to its peer at once: each side pays its line's a
    once, the batched a for the second and third, and b on all the bytes; a file without the
    batch probe pays a for each (as before)."""
    from pdv.cost.stage import message_cpu

    send = MessageCost(a_s=0.01, b_s_per_byte=1e-5, batched_a_s=batched)
    recv = MessageCost(a_s=0.02, b_s_per_byte=2e-5, batched_a_s=batched)
    over = OVER.model_copy(update={"send_cpu": send, "recv_cpu": recv})
    cluster = make_cluster(3, bw=1e9)
    cluster = cluster.model_copy(update={"devices": [
        d.model_copy(update={"overheads": over}) for d in cluster.devices]})
    a, b = PlanStage(layers=(0, 2), ranks=[0]), PlanStage(layers=(2, 4), ranks=[1, 2], dp=2)
    cpu = message_cpu(cluster, a, b, 4, 100.0, tensors=3)

    def extra(c: MessageCost) -> float:
        return c.a_s if batched is None else batched

    # rank 0 posts 3 tensors of 2 samples (200 B in all) to each of ranks 1 and 2
    per_peer_send = send.a_s + 2 * extra(send) + send.b_s_per_byte * 200
    assert cpu[0] == pytest.approx(2 * per_peer_send)
    assert cpu[1] == cpu[2] == pytest.approx(recv.a_s + 2 * extra(recv) + recv.b_s_per_byte * 200)
    # one tensor: the line alone, whatever the batched field says
    one = message_cpu(cluster, a, b, 4, 100.0, tensors=1)
    assert one[1] == pytest.approx(recv.a_s + recv.b_s_per_byte * 200)
    # the field is written only when measured: older files keep their bytes
    assert ("batched_a_s" in artifacts.dumps(cluster)) == (batched is not None)
