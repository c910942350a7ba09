"""`pdv run` at the command line: help, bad input (one line, exit 2, no processes left)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from pdv import artifacts
from pdv.run.local import free_port
from pdv.run.reference import reference_losses
from tests.conftest import run_pdv
from tests.test_run_loss import MBS, MODEL, NMB, assert_close, write_plan

PP2 = [{"layers": [0, 2], "ranks": [0]}, {"layers": [2, 4], "ranks": [1]}]


def leftovers(marker: str) -> list[str]:
    """Processes whose command line mentions marker (the test's own tmp folder)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd:
            found.append(cmd)
    return found


def assert_one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pdv: error:"), res.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help() -> None:
    res = run_pdv("run", "--help")
    assert res.returncode == 0
    for opt in ("--steps", "--report", "--model", "--print-commands", "--slurm",
                "--checkpoint-dir", "--checkpoint-every", "--data", "--resume-from", "--elastic",
                "--rank-prefix", "--slow-margin", "--slow-steps"):
        assert opt in res.stdout


@pytest.mark.parametrize("case", ["devices", "missing-model", "bad-model", "schema",
                                  "layers", "tp", "slurm-nodes", "hosts", "few-micro-batches"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    plan = write_plan(tmp_path / "plan.json", PP2)
    data = json.loads(plan.read_text())
    args = ["--model", MODEL, "--model-arg", "n_layer=2"]
    env = None
    needle = ""
    if case == "devices":  # world size: 2 ranks in stages, 1 device
        data["devices"] = [{"rank": 0, "host": "h", "kind": "cpu", "memory_bytes": 1}]
        needle = "use 2 ranks but its devices list 1"
    elif case == "missing-model":
        args = []
        needle = "names no model"
    elif case == "bad-model":
        args = ["--model", str(tmp_path / "nope.py") + ":gpt"]
        needle = "no such file"
    elif case == "schema":
        data["schema"] = "pdv.plan/v3"
        needle = "pdv.plan/v3 is not supported"
    elif case == "layers":
        args = ["--model", MODEL]  # 6 layers, the plan covers 4
        needle = "has 6 layers"
    elif case == "tp":
        data["stages"][0] = {"layers": [0, 2], "ranks": [0, 2], "tp": 2}
        data["stages"][1] = {"layers": [2, 4], "ranks": [1, 3], "tp": 2}
        args = ["--model", "mlp", "--model-arg", "n_layer=2",
                "--model-arg", "expansion=3", "--model-arg", "dim=3"]
        needle = "supports TP degrees"
    elif case == "slurm-nodes":
        env = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "0", "SLURM_NNODES": "2"}
        needle = "allocate 1 nodes"
    elif case == "hosts":
        data["devices"] = [{"rank": i, "host": f"h{i}", "kind": "cpu", "memory_bytes": 1}
                           for i in range(2)]
        needle = "--print-commands"
    elif case == "few-micro-batches":  # torch's 1F1B needs at least one micro-batch per stage
        data["num_micro_batches"] = 1
        data["global_batch_size"] = data["micro_batch_size"]
        needle = "at least as many micro-batches as stages"
    plan.write_text(json.dumps(data))
    res = run_pdv("run", str(plan), "--steps", "2", *args, env=env)
    assert_one_line_error(res, needle)
    assert leftovers(str(tmp_path)) == []


@pytest.mark.e2e
def test_a_plan_that_leaves_ranks_idle_runs_on_the_ranks_it_uses(tmp_path: Path) -> None:
    # A planner may keep ranks out (fewer ranks were faster): ranks 1 and 3 of 4 run the plan,
    # as torchrun ranks 0 and 1, and the report speaks of the plan's own ranks 1 and 3.
    plan = write_plan(tmp_path / "plan.json", [{"layers": [0, 2], "ranks": [3]},
                                               {"layers": [2, 4], "ranks": [1]}])
    data = json.loads(plan.read_text())
    data["devices"] = [{"rank": i, "host": "localhost", "kind": "cpu", "memory_bytes": 1 << 34}
                       for i in range(4)]
    plan.write_text(json.dumps(data))
    report = tmp_path / "report.json"
    res = run_pdv("run", str(plan), "--steps", "3", "--model", MODEL, "--model-arg", "n_layer=2",
                  "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    got = artifacts.load_as(report, "run-report")
    assert got.plan_digest == artifacts.digest(artifacts.load_as(plan, "plan"))
    assert set(got.measured.peak_memory_bytes) == {"1", "3"}
    want = reference_losses(MODEL, {"n_layer": 2}, steps=3, global_batch_size=NMB * MBS,
                            num_micro_batches=NMB)
    assert_close(got.loss, want)
    printed = run_pdv("run", str(plan), "--print-commands")
    assert printed.returncode == 0 and "0-1" in printed.stdout and "renumbered" in printed.stderr
    assert (tmp_path / "plan.renumbered.json").exists()


def test_plan_of_another_kind(tmp_path: Path) -> None:
    other = tmp_path / "report.json"
    other.write_text(json.dumps({"schema": "pdv.cluster/v1"}))
    assert_one_line_error(run_pdv("run", str(other)), "expected a pdv.plan/v2")


def test_print_commands_from_the_cli(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", PP2)
    res = run_pdv("run", str(plan), "--steps", "3", "--print-commands", "--master-port", "29999")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "# on localhost (node 0, ranks 0-1)"
    assert "--nproc-per-node 2 --master-addr localhost --master-port 29999" in lines[1]
    res = run_pdv("run", str(plan), "--slurm")
    assert res.returncode == 0 and res.stdout.startswith("#!/bin/bash\n#SBATCH")


@pytest.mark.e2e
def test_worker_crash_fails_the_run_and_leaves_nothing(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", PP2)
    marker = tmp_path / "crashed"
    res = run_pdv("run", str(plan), "--steps", "3", "--model", MODEL, "--model-arg", "n_layer=2",
                  env={"PDV_TEST_CRASH_AT_STEP": f"0:1:{marker}"})
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("pdv: error: the run failed")
    assert marker.exists()
    assert leftovers(str(tmp_path)) == []


@pytest.mark.e2e
def test_inside_a_slurm_allocation_reads_slurm_env(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", PP2)
    report = tmp_path / "r.json"
    env = {"SLURM_JOB_ID": "31337", "SLURM_NODEID": "0", "SLURM_NNODES": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    res = run_pdv("run", str(plan), "--steps", "2", "--model", MODEL, "--model-arg", "n_layer=2",
                  "--report", str(report), env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(json.loads(report.read_text())["loss"]) == 2
