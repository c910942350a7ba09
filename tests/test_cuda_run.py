"""The CUDA path end to end on one device: cluster probe (nccl), layer profile, plan, run.

Skipped where torch sees no CUDA device; benchmarks/cuda_check.py is the measuring twin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdv import artifacts
from tests.conftest import run_pdv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_profile_plan_run_on_one_gpu(tmp_path: Path) -> None:
    cluster, prof = tmp_path / "cluster.json", tmp_path / "prof.json"
    plan, report = tmp_path / "plan.json", tmp_path / "report.json"
    r = run_pdv("profile", "cluster", "--nproc-per-node", "1", "-o", str(cluster))
    assert r.returncode == 0, r.stderr
    c = artifacts.load_as(cluster, "cluster")
    assert len(c.devices) == 1 and c.devices[0].kind.startswith("nvidia-")
    assert c.devices[0].memory_bytes > 2**30
    r = run_pdv("profile", "model", "gpt_tiny", "--device", "cuda", "--micro-batch-sizes", "2,4",
                "-o", str(prof))
    assert r.returncode == 0, r.stderr
    assert artifacts.load_as(prof, "model-profile").device.kind == c.devices[0].kind
    r = run_pdv("plan", str(prof), "--cluster", str(cluster), "--global-batch", "8",
                "-o", str(plan))
    assert r.returncode == 0, r.stderr
    r = run_pdv("run", str(plan), "--device", "cuda", "--steps", "4", "--warmup", "1",
                "--report", str(report))
    assert r.returncode == 0, r.stderr
    doc = json.loads(report.read_text())
    m = doc["measured"]
    assert "cuda" in m["memory_method"].lower()
    # The device's own peak, which is at least the parameters and their Adam state.
    params = sum(layer["param_bytes"] for layer in json.loads(prof.read_text())["layers"])
    assert int(m["peak_memory_bytes"]["0"]) >= 3 * params
    assert m["step_time_s"] > 0 and all(x == x for x in doc["loss"])
