"""The README's main job, end to end: profile, plan, run on this machine's CPU ranks."""

from __future__ import annotations

import pytest

from pdv import artifacts
from pdv.cost.compute import unsteady_note

from .conftest import run_pdv


@pytest.mark.e2e
@pytest.mark.slow
def test_quickstart_writes_every_artifact_and_compares(tmp_path):
    # From a folder that is not the repository, as a pip-installed tool runs: the sample model
    # comes from the installed package and the artifacts land in ./pdv-out.
    out = tmp_path / "pdv-out"
    result = run_pdv("quickstart", "--nproc-per-node", "2", "--steps", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    kinds = {
        "cluster.json": "cluster",
        "profile.json": "model-profile",
        "plan.json": "plan",
        "report.json": "run-report",
    }
    loaded = {name: artifacts.load_as(out / name, kind) for name, kind in kinds.items()}
    report, plan = loaded["report.json"], loaded["plan.json"]
    assert report.plan_digest == artifacts.digest(plan)
    assert report.predicted == plan.predicted and report.predicted is not None
    assert len(report.loss) == 3 and all(x > 0 for x in report.loss)
    # the planner may keep a rank idle (fewer ranks were faster); the run reports the ones used
    used = {str(r) for stage in plan.stages for r in stage.ranks}
    assert set(report.measured.peak_memory_bytes) == used and used <= {"0", "1"}
    # The runtime a CPU rank holds is most of a small model's peak: the profile measured it on a
    # run rank (pdv.profile.memory.cpu_runtime_bytes), so predicted and measured agree closely.
    # When it was read off the profiling process (other modules imported), gpt_tiny read +10%.
    for r in used:
        predicted, measured = report.predicted.peak_memory_bytes[r], \
            report.measured.peak_memory_bytes[r]  # fmt: skip
        assert abs(predicted - measured) <= 0.06 * measured, (r, predicted, measured)
    assert "predicted vs measured" in result.stdout
    # Where the prediction is read, the user learns whether the cluster file was taken while
    # the machine's speed moved (and only then).
    after = " ".join(result.stdout.split("predicted vs measured")[-1].split())
    assert ("speed moved during the cluster probe" in after) == \
        (unsteady_note(loaded["cluster.json"]) is not None)  # fmt: skip


def test_quickstart_bad_model_is_one_line(tmp_path):
    result = run_pdv("quickstart", "-o", str(tmp_path), "--model", "nope.py:f")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
