"""Acceptance: `pdv run` trains to the same per-step losses as one process, whatever the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdv.run.reference import reference_losses
from tests.conftest import run_pdv

MODEL = "gpt_tiny"
ARGS = {"n_layer": 2}
STEPS = 5
NMB, MBS = 4, 4


def write_plan(path: Path, stages: list[dict], schedule: str = "1F1B", nmb: int = NMB,
               mbs: int = MBS) -> Path:
    """A hand-written plan with only the contract fields."""
    plan = {"schema": "pdv.plan/v1", "stages": stages, "micro_batch_size": mbs,
            "num_micro_batches": nmb, "global_batch_size": mbs * nmb, "schedule": schedule}
    path.write_text(json.dumps(plan))
    return path


PLANS = {
    "pp2xdp2": [{"layers": [0, 2], "ranks": [0, 1], "dp": 2},
                {"layers": [2, 4], "ranks": [2, 3], "dp": 2}],
    "pp4": [{"layers": [i, i + 1], "ranks": [i]} for i in range(4)],
    "pp2xtp2": [{"layers": [0, 2], "ranks": [0, 1], "tp": 2},
                {"layers": [2, 4], "ranks": [2, 3], "tp": 2}],
}


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return reference_losses(MODEL, ARGS, steps=STEPS, global_batch_size=NMB * MBS,
                            num_micro_batches=NMB)


def run_losses(tmp_path: Path, plan: Path, *extra: str,
               env: dict[str, str] | None = None) -> list[float]:
    report = tmp_path / "report.json"
    args = [f"--model-arg={k}={v}" for k, v in ARGS.items()]
    res = run_pdv("run", str(plan), "--steps", str(STEPS), "--model", MODEL, *args,
                  "--report", str(report), *extra, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["schema"] == "pdv.run-report/v1"
    ranks = {r for stage in json.loads(plan.read_text())["stages"] for r in stage["ranks"]}
    assert len(data["measured"]["peak_memory_bytes"]) == len(ranks)
    assert all(v > 0 for v in data["measured"]["peak_memory_bytes"].values())
    # Every rank's process CPU per step: it ran its ops, so it is above zero, and a step's
    # worth of a few threads at most.
    cpu, compute = data["measured"]["cpu_s"], data["measured"]["compute_s"]
    assert set(cpu) == set(compute) == {str(r) for r in ranks}
    step = data["measured"]["step_time_s"]
    assert all(0 < cpu[r] < 8 * step for r in cpu), (cpu, step)
    # Its compute (the stage modules' spans) lies within its step.
    assert all(0 < compute[r] < step for r in compute), (compute, step)
    assert "process CPU" in res.stdout
    # The report says which policy gloo's loop threads ran under (pdv.profile.loops).
    policy = "SCHED_BATCH" if (env or {}).get("PDV_GLOO_LOOPS") == "batch" else "as torch"
    assert any(f"gloo event-loop threads {policy}" in n for n in data["provenance"]["notes"]), data
    return data["loss"]


def assert_close(got: list[float], want: list[float], rel: float = 1e-5) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= rel * abs(w), f"step {step}: {g} vs single-process {w}"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLANS))
def test_losses_match_single_process(tmp_path: Path, reference: list[float], name: str) -> None:
    plan = write_plan(tmp_path / f"{name}.json", PLANS[name])
    assert_close(run_losses(tmp_path, plan), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_fsdp_gpipe_matches_too(tmp_path: Path, reference: list[float]) -> None:
    stages = [{**s, "fsdp": True} for s in PLANS["pp2xdp2"]]
    plan = write_plan(tmp_path / "fsdp.json", stages, schedule="GPipe")
    assert_close(run_losses(tmp_path, plan), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_interleaved_matches_too(tmp_path: Path, reference: list[float]) -> None:
    # Two ranks, four stages: rank 0 holds stages 0 and 2, rank 1 holds 1 and 3 (looped).
    stages = [{"layers": [i, i + 1], "ranks": [i % 2]} for i in range(4)]
    plan = write_plan(tmp_path / "interleaved.json", stages, schedule="Interleaved1F1B")
    assert_close(run_losses(tmp_path, plan), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_gloo_loop_threads_as_batch_change_no_loss(tmp_path: Path,
                                                   reference: list[float]) -> None:
    # Only when the backend's threads run changes (pdv.profile.loops); what is computed not.
    stages = [{"layers": [i, i + 1], "ranks": [i % 2]} for i in range(4)]
    plan = write_plan(tmp_path / "interleaved.json", stages, schedule="Interleaved1F1B")
    assert_close(run_losses(tmp_path, plan, env={"PDV_GLOO_LOOPS": "batch"}), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_layer_sharding_matches_too(tmp_path: Path, reference: list[float]) -> None:
    # Stage 0: embed replicated inside the TP group with recompute, block0 TP-sharded.
    stages = [dict(s) for s in PLANS["pp2xtp2"]]
    stages[0]["layer_sharding"] = [{"tp": 1, "recompute": True}, {"tp": 2}]
    stages[1]["layer_sharding"] = [{"recompute": True}, {}]
    plan = write_plan(tmp_path / "ls.json", stages)
    assert_close(run_losses(tmp_path, plan), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_stages_on_ranks_in_any_order(tmp_path: Path, reference: list[float]) -> None:
    # Stage 0 on rank 1, stage 1 on rank 0: peers come from the plan, not from rank order.
    stages = [{"layers": [0, 2], "ranks": [1]}, {"layers": [2, 4], "ranks": [0]}]
    plan = write_plan(tmp_path / "rev.json", stages, schedule="GPipe")
    assert_close(run_losses(tmp_path, plan), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_data_hook(tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import torch\n"
        "def batches(step, batch_size, seed):\n"
        "    g = torch.Generator().manual_seed(1000 + step + seed)\n"
        "    t = torch.randint(7, (batch_size, 33), generator=g)\n"
        "    return t[:, :-1].contiguous(), t[:, 1:].contiguous()\n"
    )
    spec = f"{hook}:batches"
    want = reference_losses(MODEL, ARGS, steps=3, global_batch_size=NMB * MBS,
                            num_micro_batches=NMB, data=spec)
    stages = [{"layers": [0, 2], "ranks": [0]}, {"layers": [2, 4], "ranks": [1]}]
    plan = write_plan(tmp_path / "p.json", stages)
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "3", "--model", MODEL, "--model-arg", "n_layer=2",
                  "--data", spec, "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(report.read_text())["loss"]
    assert_close(got, want)
    # Tokens from a 7-word alphabet: the loss is not that of the synthetic data.
    assert abs(got[0] - reference_losses(MODEL, ARGS, steps=1, global_batch_size=16,
                                         num_micro_batches=4)[0]) > 1e-3


@pytest.mark.e2e
@pytest.mark.slow
def test_replicas_with_two_micro_batches(tmp_path: Path) -> None:
    # Two micro-batches broke DDP under the 1F1B schedule; replicas now all-reduce themselves.
    want = reference_losses(MODEL, ARGS, steps=3, global_batch_size=8, num_micro_batches=2)
    plan = write_plan(tmp_path / "p.json", PLANS["pp2xdp2"], nmb=2, mbs=4)
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "3", "--model", MODEL, "--model-arg", "n_layer=2",
                  "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_close(json.loads(report.read_text())["loss"], want)


BATCH_NORM = '''
import torch, torch.nn as nn, torch.nn.functional as F
def net(): return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
def make_batch(mbs, gen):
    return torch.randn(mbs, 6, generator=gen), torch.randint(3, (mbs,), generator=gen)
def loss_fn(out, y): return F.cross_entropy(out, y)
'''


@pytest.mark.e2e
@pytest.mark.slow
def test_batch_norm_under_replicas_is_noted_and_differs_as_the_note_says(tmp_path: Path) -> None:
    """Each replica normalizes over its own rows: the run says so in its report, and the losses
    show it (a pipeline without replicas still trains as one process)."""
    src = tmp_path / "bn.py"
    src.write_text(BATCH_NORM)
    model = f"{src}:net"
    want = reference_losses(model, {}, steps=3, global_batch_size=16, num_micro_batches=2)
    runs = {"replicas": [{"layers": [0, 2], "ranks": [0, 1], "dp": 2},
                         {"layers": [2, 4], "ranks": [2]}],
            "pipeline": [{"layers": [0, 2], "ranks": [0]}, {"layers": [2, 4], "ranks": [1]}]}
    got = {}
    for name, stages in runs.items():
        plan = write_plan(tmp_path / f"{name}.json", stages, "GPipe", nmb=2, mbs=8)
        report = tmp_path / f"{name}.report.json"
        res = run_pdv("run", str(plan), "--steps", "3", "--model", model, "--report", str(report))
        assert res.returncode == 0, res.stderr[-3000:]
        got[name] = json.loads(report.read_text())
    notes = [n for n in got["replicas"]["provenance"]["notes"] if "BatchNorm" in n]
    assert notes == [notes[0]] and notes[0].startswith("stage 0: BatchNorm in layers 1 ")
    assert "2 replicas' 4 rows" in notes[0]
    assert not [n for n in got["pipeline"]["provenance"]["notes"] if "BatchNorm" in n]
    assert_close(got["pipeline"]["loss"], want)
    apart = [abs(a - b) / abs(b) for a, b in zip(got["replicas"]["loss"], want, strict=True)]
    assert max(apart) > 1e-4


@pytest.mark.e2e
@pytest.mark.slow
def test_a_module_at_every_place_of_one_fsdp_stage_with_recompute(tmp_path: Path) -> None:
    # The shared Linear fills layers 1, 3 and 5, all in stage 0: not tied, so FSDP shards it,
    # and each place's recompute wrapper runs it (the conformance plans split its places).
    model = "tests/models/shared_in_place.py:net"
    want = reference_losses(model, {}, steps=3, global_batch_size=NMB * MBS,
                            num_micro_batches=NMB, lr=0.05)
    plan = write_plan(tmp_path / "p.json", [
        {"layers": [0, 6], "ranks": [0, 1], "dp": 2, "fsdp": True, "recompute": True},
        {"layers": [6, 8], "ranks": [2, 3], "dp": 2, "fsdp": True, "recompute": True}])
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "3", "--model", model, "--lr", "0.05",
                  "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_close(json.loads(report.read_text())["loss"], want)
