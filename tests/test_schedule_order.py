"""The simulator's op order against the one torch executes under torchrun + gloo.

`pdv run` with PDV_OP_TRACE set makes each rank log the compute ops torch's schedule ran in the
last step (pdv.run.pipeline.OpRecorder). The simulator prices a plan by walking
pdv.cost.schedules.rank_orders; if that order differs from torch's, every interleaved
prediction is priced on a schedule that never runs. Waiting layers (benchmarks/sleepy.py) keep
each run short; the timing comparison lives in benchmarks/schedule_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdv import artifacts
from pdv.cost.schedules import rank_orders, stage_layout
from tests.conftest import run_pdv

SPEC = "benchmarks/sleepy.py:sleepy"


def _plan(path: Path, groups: int, chunks: int, schedule: str, micro: int, layers: int) -> Path:
    n = groups * chunks
    per = layers // n
    stages = [{"layers": [i * per, (i + 1) * per], "ranks": [i % groups]} for i in range(n)]
    path.write_text(json.dumps({
        "schema": "pdv.plan/v1", "stages": stages, "micro_batch_size": 2,
        "num_micro_batches": micro, "global_batch_size": 2 * micro, "schedule": schedule,
        "model": {"spec": SPEC, "kwargs": {"n_layer": layers, "fwd_ms": 1, "bwd_ms": 2}}}))
    return path


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(
    ("groups", "chunks", "schedule", "micro"),
    [(2, 3, "Interleaved1F1B", 6), (3, 2, "Interleaved1F1B", 3)],
)
def test_torch_runs_the_simulated_order(tmp_path: Path, groups: int, chunks: int,
                                        schedule: str, micro: int) -> None:
    plan_path = _plan(tmp_path / "plan.json", groups, chunks, schedule, micro, 12)
    trace = tmp_path / "trace" / "ops"  # not there yet: the recorder makes it
    r = run_pdv("run", str(plan_path), "--steps", "2", "--warmup", "1",
                "--report", str(tmp_path / "report.json"), env={"PDV_OP_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr[-3000:]
    plan = artifacts.load_as(plan_path, "plan")
    layout = stage_layout([s.ranks for s in plan.stages], plan.schedule)
    simulated = rank_orders(layout, plan.schedule, plan.num_micro_batches)
    for g, ranks in enumerate(layout.group_ranks):
        ran = json.loads((trace / f"ops-rank{ranks[0]}.json").read_text())["ops"]
        executed = [(kind, stage, micro) for kind, stage, micro, _t0, _t1 in ran]
        assert executed == simulated[g], (g, executed, simulated[g])
        # One compute op at a time on a rank: the simulator's lane model.
        assert all(a[4] <= b[3] for a, b in zip(ran, ran[1:], strict=False))
    for rank in range(groups):
        doc = json.loads((trace / f"ops-rank{rank}.json").read_text())
        # The step's marks, in loop order and on the ops' clock: the ops lie between the
        # step's start and the schedule's end.
        marks = doc["marks"]
        assert list(marks) == ["loop_top", "step_start", "schedule_end", "sync_end",
                               "optimizer_end"]
        times = list(marks.values())
        assert times == sorted(times)
        assert list(doc["cpu_marks"]) == list(marks)
        assert list(doc["cpu_marks"].values()) == sorted(doc["cpu_marks"].values())
        # Every step's marks, the warm-up's too, one step after the other; the last is the
        # step whose ops the file holds.
        steps = doc["step_marks"]
        assert len(steps) == 2 and steps[-1] == marks
        assert all(list(m) == list(marks) for m in steps)
        flat = [t for m in steps for t in m.values()]
        assert flat == sorted(flat)
        ops = doc["ops"]
        assert marks["step_start"] <= ops[0][3] and ops[-1][4] <= marks["schedule_end"]
        # The layers sleep, so an op's CPU time is a small part of its wall time: the CPU
        # column is what separates waiting (a sleep here; on a shared host, a rank with no
        # core) from computing.
        cpu = doc["op_cpu_s"]
        assert len(cpu) == len(ops) and min(cpu) >= 0
        assert sum(cpu) < 0.5 * sum(t1 - t0 for *_, t0, t1 in ops)


@pytest.mark.e2e
@pytest.mark.slow
def test_planner_offers_an_interleaved_plan_and_pdv_runs_it(tmp_path: Path) -> None:
    """profile → plan → run: with as many micro-batches as ranks the plain 1F1B bubble is
    large, the planner's best plan is interleaved, and `pdv run` executes it in the simulated
    order."""
    # (the profile, the cluster probe, a plan and a run of two ranks: about a minute). Layers
    # of 4 + 8 ms: interleaving saves half a stage's bubble (about 36 ms a step) against the
    # extra boundaries' messages, which a cluster probe taken on a loaded CI host priced at a
    # few ms each (at 2 + 4 ms the planner once chose plain 1F1B there).
    model = ["--model-arg", "n_layer=12", "--model-arg", "fwd_ms=4", "--model-arg", "bwd_ms=8"]
    prof, clus = tmp_path / "profile.json", tmp_path / "cluster.json"
    r = run_pdv("profile", "model", SPEC, *model, "--micro-batch-sizes", "1", "--warmup", "1",
                "--repeat", "3", "-o", str(prof))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_pdv("profile", "cluster", "--nproc-per-node", "2", "-o", str(clus))
    assert r.returncode == 0, r.stderr[-2000:]
    # Waiting is not computing: the ranks do not slow each other down (as in
    # benchmarks/schedule_check.py), so every rank runs at the profile's speed.
    speed = artifacts.load_as(prof, "model-profile").device.matmul_flops
    cluster = artifacts.load_as(clus, "cluster")
    artifacts.write(clus, cluster.model_copy(update={"devices": [
        d.model_copy(update={"matmul_flops": speed, "matmul_flops_alone": speed})
        for d in cluster.devices]}))
    plan_path = tmp_path / "plan.json"
    # Micro-batches of one sample: no room for data parallelism, so the ranks pipeline.
    r = run_pdv("plan", str(prof), "--cluster", str(clus), "--global-batch", "2",
                "--micro-batch-sizes", "1", "--no-fsdp", "--no-recompute", "--time-limit", "1",
                "--virtual-stages", "2,3,4", "-o", str(plan_path))
    assert r.returncode == 0, r.stderr[-2000:]
    plan = artifacts.load_as(plan_path, "plan")
    assert plan.schedule == "Interleaved1F1B", (plan.schedule, len(plan.stages))
    trace = tmp_path / "ops"
    trace.mkdir()
    r = run_pdv("run", str(plan_path), "--steps", "2", "--warmup", "1",
                "--report", str(tmp_path / "report.json"), env={"PDV_OP_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr[-3000:]
    layout = stage_layout([s.ranks for s in plan.stages], plan.schedule)
    simulated = rank_orders(layout, plan.schedule, plan.num_micro_batches)
    for g, ranks in enumerate(layout.group_ranks):
        ran = json.loads((trace / f"ops-rank{ranks[0]}.json").read_text())["ops"]
        assert [tuple(op[:3]) for op in ran] == simulated[g]
