"""What a profile says about each layer, and how a device scales it."""

from __future__ import annotations

import pytest

from pdv.artifacts import ClusterArtifact, ClusterDevice, TimeFit
from pdv.cost.compute import (
    layer_cost,
    profile_arrays,
    rank_overhead_bytes,
    speed_factor,
    unsteady_note,
    unsteady_ranks,
)
from pdv.cost.schedules import in_flight
from pdv.errors import PdvError
from tests.plan_fixtures import cluster
from tests.test_cost_builders import make_profile


def test_layer_cost_scales_the_reference_linearly() -> None:
    """Without samples or a fit, time and activation bytes scale with the micro-batch size."""
    p = make_profile(fwd=0.01, bwd=0.03, act=500, out=100, ref_mbs=2)
    c = layer_cost(p, 0, 6)
    assert c.fwd_s == pytest.approx(0.01 * 6)
    assert c.bwd_s == pytest.approx(0.03 * 6)
    assert c.activation_bytes == pytest.approx(500 * 6)
    assert c.output_bytes == pytest.approx(100 * 6)
    assert c.param_bytes == 1000


def test_layer_cost_prefers_the_fit() -> None:
    """A fitted a + b·mbs is used where the profile has one."""
    p = make_profile()
    fit = TimeFit(a_s=0.5, b_s=0.25, r2=1.0, max_rel_error=0.0)
    layer = p.layers[0].model_copy(update={"fwd_fit": {"1": fit}, "bwd_fit": {"1": fit}})
    p = p.model_copy(update={"layers": [layer, *p.layers[1:]]})
    assert layer_cost(p, 0, 4).fwd_s == pytest.approx(0.5 + 0.25 * 4)


def test_layer_cost_reads_tp_shard_samples() -> None:
    """At TP k the measured shard sizes are used, and a missing TP degree is a PdvError."""
    p = make_profile(tp_degrees=(1, 2), params=1000, fwd=0.02)
    c = layer_cost(p, 1, 1, 2)
    assert c.param_bytes == 500
    assert c.fwd_s == pytest.approx(0.01)
    with pytest.raises(PdvError, match="TP 4"):
        layer_cost(p, 1, 1, 4)


def test_speed_factor_is_the_matmul_ratio() -> None:
    """A device measured half as fast as the profiled one takes twice as long."""
    p = make_profile(matmul_flops=2e12)
    slow = ClusterDevice(rank=0, host="h", kind="cpu", memory_bytes=1, matmul_flops=1e12)
    unknown = ClusterDevice(rank=1, host="h", kind="cpu", memory_bytes=1)
    assert speed_factor(p, slow) == pytest.approx(2.0)
    assert speed_factor(p, unknown) == 1.0


def test_profile_arrays_are_layer_cost_of_every_layer() -> None:
    """The vectorized reader gives every layer's layer_cost, and the shard's share of state."""
    p = make_profile(n_layers=3, tp_degrees=(1, 2), params=1000, fwd=0.02, act=500, out=100)
    for mbs, tp in ((1, 1), (3, 1), (1, 2)):
        a = profile_arrays(p, mbs, tp)
        for i in range(3):
            c = layer_cost(p, i, mbs, tp)
            assert (a.fwd[i], a.bwd[i], a.params[i]) == (c.fwd_s, c.bwd_s, c.param_bytes)
            assert (a.activations[i], a.outputs[i]) == (c.activation_bytes, c.output_bytes)
            assert a.grads[i] == p.layers[i].grad_bytes * c.param_bytes / 1000
    assert profile_arrays(p, 1, 2) is profile_arrays(p, 1, 2)


def test_in_flight_follows_the_schedule() -> None:
    """GPipe and LoopedBFS hold every micro-batch; 1F1B holds p − s, at least 1, at most M."""
    assert in_flight("GPipe", 4, 8) == 8
    assert in_flight("LoopedBFS", 3, 8) == 8
    assert [in_flight("1F1B", 4 - s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight("1F1B", 4, 2) == 2


@pytest.mark.parametrize(("runtime", "own", "expect"), [
    (None, None, 300),  # not measured: the profile's overhead
    (350, 290, 300 + 60),  # a capped CPU rank: its cgroup also holds the launcher's 60
    (290, 290, 300),  # an uncapped CPU rank: the charge is its own resident set
    (500, None, 500),  # CUDA: device memory in use at init, larger than the profile's
    (200, None, 300),
])
def test_rank_overhead_adds_what_the_cap_counts_beyond_the_rank(runtime, own, expect) -> None:
    dev = ClusterDevice(rank=0, host="h", kind="cpu", memory_bytes=1 << 30,
                        runtime_bytes=runtime, runtime_own_bytes=own)
    assert rank_overhead_bytes(make_profile(overhead=300), dev) == expect


def _windowed(windows: list[list[float] | None]) -> ClusterArtifact:
    """Two ranks on one host; each rank's matmul windows alone as the probe keeps them."""
    cl = cluster(["h"] * len(windows), [[0.0, 1e9], [1e9, 0.0]][: len(windows)],
                 kinds=["cpu"] * len(windows))
    devices = [d.model_copy(update={"details": {"matmul_flops_alone_windows": w}} if w else {})
               for d, w in zip(cl.devices, windows, strict=True)]
    return cl.model_copy(update={"devices": devices})


@pytest.mark.parametrize(("windows", "flagged"), [
    ([[1.0e11, 0.98e11, 1.01e11], [0.99e11, 1.0e11, 1.0e11]], []),
    # /tmp/pz24's file: one window of rank 1 dipped 5%, two agreed: its best stands
    ([[1.006e11, 1.009e11, 1.012e11], [1.012e11, 1.0165e11, 0.965e11]], []),
    # /tmp/pz23's file: rank 0's best confirmed by nothing; rank 1 slow throughout (its own
    # windows cannot say so; the file is flagged by rank 0)
    ([[0.989e11, 0.918e11, 0.861e11], [0.778e11, 0.839e11, 0.817e11]],
     [(0, 0.861e11, 0.989e11)]),
    ([[1.0e11, 1.0e11], [0.8e11, 0.9e11, 0.96e11]], [(1, 0.8e11, 0.96e11)]),
    ([None, None], []),  # declared: no windows, nothing to say
])
def test_a_rank_whose_speed_moved_during_the_probe_is_flagged(
        windows: list[list[float] | None], flagged: list[tuple[int, float, float]]) -> None:
    cl = _windowed(windows)
    assert unsteady_ranks(cl) == flagged
    note = unsteady_note(cl)
    assert (note is None) == (not flagged)
    if flagged:
        worst = max(flagged, key=lambda f: f[2] / f[1])
        assert f"rank {worst[0]}" in note and f"{worst[1] / 1e9:.1f}" in note


def test_the_flag_rides_into_the_simulation_and_the_plan() -> None:
    """Whoever reads a prediction made from a moving file learns it: the simulation's notes
    and the plan's provenance carry the note, a steady file adds nothing."""
    from pdv.artifacts import Plan, PlanStage
    from pdv.cost.simulate import simulate
    from pdv.plan.search import plan_provenance

    moved = _windowed([[1.0e11, 1.0e11, 1.0e11], [0.8e11, 0.9e11, 0.96e11]])
    steady = _windowed([[1.0e11, 1.0e11, 1.0e11], [0.96e11, 0.96e11, 0.95e11]])
    prof = make_profile()
    plan = Plan(stages=[PlanStage(layers=[0, len(prof.layers)], ranks=[0, 1], dp=2, tp=1)],
                micro_batch_size=2, num_micro_batches=2, global_batch_size=4)
    note = unsteady_note(moved)
    assert note is not None and unsteady_note(steady) is None
    assert note in simulate(plan, {"cpu": prof}, moved).notes
    assert not any("speed moved" in n for n in simulate(plan, {"cpu": prof}, steady).notes)
    assert note in plan_provenance({"cpu": prof}, moved).notes
    assert note not in plan_provenance({"cpu": prof}, steady).notes


def _small_op(cluster_steps: list[float | None], kinds: list[str] | None = None
              ) -> ClusterArtifact:  # fmt: skip
    """Ranks on one host, each with its small-op reference step as the probe keeps it."""
    n = len(cluster_steps)
    cl = cluster(["h"] * n, [[0.0 if i == j else 1e9 for j in range(n)] for i in range(n)],
                 kinds=kinds or ["cpu"] * n)
    devices = [d.model_copy(update={"small_op_step_s": s})
               for d, s in zip(cl.devices, cluster_steps, strict=True)]
    return cl.model_copy(update={"devices": devices})


@pytest.mark.parametrize(("profile_s", "cluster_s", "kinds", "ratio", "says"), [
    (650e-6, [660e-6, 650e-6], None, 1.0, None),  # one state of the machine
    (1.06e-3, [700e-6, 650e-6], None, 1.06e-3 / 650e-6, "slower than the cluster"),
    # the quiet rank sets the cluster's reference: a rank in a spell does not hide it
    (1.06e-3, [1.3e-3, 650e-6], None, 1.06e-3 / 650e-6, "slower than the cluster"),
    (650e-6, [1.1e-3, 1.0e-3], None, 0.65, "cluster file was taken in a slow spell"),
    (760e-6, [650e-6, 700e-6], None, 760e-6 / 650e-6, None),  # within 1.2x
    # only the ranks of the profile's kind compare
    (1.06e-3, [1.0e-3, 650e-6], ["cpu", "gpu"], 1.06, None),
    (None, [650e-6, 650e-6], None, None, None),  # an older profile: nothing to say
    (650e-6, [None, None], None, None, None),  # a declared cluster
])
def test_a_profile_taken_in_another_state_of_the_machine_is_flagged(
        profile_s: float | None, cluster_s: list[float | None], kinds: list[str] | None,
        ratio: float | None, says: str | None) -> None:
    """The profile's small-op step over the fastest of its kind's ranks in the cluster file;
    past 1.2x either way, a note names which file was taken in a spell. It rides into the
    simulation's notes and the plan's provenance."""
    from pdv.artifacts import Plan, PlanStage
    from pdv.cost.compute import spell_note, spell_notes, spell_ratio
    from pdv.cost.simulate import simulate
    from pdv.plan.search import plan_provenance

    prof = make_profile()
    prof = prof.model_copy(update={"device": prof.device.model_copy(
        update={"small_op_step_s": profile_s})})
    cl = _small_op(cluster_s, kinds)
    got = spell_ratio(prof, cl)
    assert got == (None if ratio is None else pytest.approx(ratio))
    note = spell_note("the cpu profile", prof, cl)
    assert (note is None) == (says is None)
    if note is None:
        assert spell_notes({"cpu": prof}, cl) == []
        return
    assert says in note and f"{max(got, 1 / got):.2f}x" in note
    assert spell_notes({"cpu": prof}, cl) == [note]
    plan = Plan(stages=[PlanStage(layers=[0, len(prof.layers)], ranks=[0], dp=1, tp=1)],
                micro_batch_size=2, num_micro_batches=2, global_batch_size=4)
    assert note in simulate(plan, {"cpu": prof}, cl).notes
    assert note in plan_provenance({"cpu": prof}, cl).notes
    # The file keeps the reading; a profile without one writes none (older readers).
    assert prof.model_dump()["device"]["small_op_step_s"] == profile_s
    assert "small_op_step_s" not in make_profile().model_dump()["device"]
