"""Restart: a worker killed after step k; torchrun restarts the run, which resumes and finishes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_pdv
from tests.test_run_loss import MODEL, PLANS, write_plan

ARGS = ("--steps", "5", "--model", MODEL, "--model-arg", "n_layer=2")


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_to_the_same_loss(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", PLANS["pp2xdp2"])
    plain = tmp_path / "plain.json"
    res = run_pdv("run", str(plan), *ARGS, "--report", str(plain))
    assert res.returncode == 0, res.stderr[-2000:]

    marker, ckpt, resumed = tmp_path / "crashed", tmp_path / "ckpt", tmp_path / "resumed.json"
    res = run_pdv("run", str(plan), *ARGS, "--report", str(resumed), "--checkpoint-dir",
                  str(ckpt), "--checkpoint-every", "2", "--max-restarts", "1",
                  env={"PDV_TEST_CRASH_AT_STEP": f"2:1:{marker}"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists(), "the worker was not killed"
    assert (ckpt / "step-2").is_dir() and (ckpt / "latest").read_text() == "step-4\n"
    want = json.loads(plain.read_text())["loss"]
    got = json.loads(resumed.read_text())["loss"]
    assert len(got) == 5
    assert got[-1] == pytest.approx(want[-1], rel=1e-6)
    assert got == pytest.approx(want, rel=1e-6)


def test_checkpoint_every_needs_a_folder(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", PLANS["pp2xdp2"])
    res = run_pdv("run", str(plan), *ARGS, "--checkpoint-every", "2")
    assert res.returncode == 2
    assert "--checkpoint-every needs --checkpoint-dir" in res.stderr
