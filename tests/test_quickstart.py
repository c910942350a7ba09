"""The README's main job, end to end: profile, plan, run on this machine's CPU ranks."""

from __future__ import annotations

import pytest

from pdv import artifacts
from pdv.cli.quickstart_cmd import reading_notes
from pdv.cost.compute import spell_note, unsteady_note

from .conftest import run_pdv
from .test_cost_builders import make_profile
from .test_cost_compute import _small_op, _windowed


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
    # and whether the profile and the cluster file were taken in different states of it
    spell = spell_note("the cpu profile", loaded["profile.json"], loaded["cluster.json"])
    assert ("slow spell of the machine" in after) == (spell is not None)


def _with_small_op(seconds: float):
    prof = make_profile()
    return prof.model_copy(update={"device": prof.device.model_copy(
        update={"small_op_step_s": seconds})})


def test_quickstart_notes_where_the_prediction_is_read():
    """Under its predicted-vs-measured table, quickstart says when the cluster file was taken
    while the machine's speed moved, and when the profile was taken in a slow spell the cluster
    file missed (or the other way round); nothing when both were taken in one quiet state."""
    quiet = _small_op([650e-6, 660e-6])
    assert reading_notes(quiet, _with_small_op(655e-6)) == []
    slow_profile = reading_notes(quiet, _with_small_op(2 * 650e-6))
    assert len(slow_profile) == 1 and "the cpu profile" in slow_profile[0]
    assert "2.00x slower than the cluster" in slow_profile[0]
    slow_cluster = reading_notes(_small_op([1.3e-3, 1.4e-3]), _with_small_op(650e-6))
    assert len(slow_cluster) == 1 and "cluster file was taken in a slow spell" in slow_cluster[0]
    # A moving cluster file comes first; the profile's spell is said besides it.
    moved = _windowed([[1.0e11, 1.0e11, 1.0e11], [0.8e11, 0.9e11, 0.96e11]])
    moved = moved.model_copy(update={"devices": [
        d.model_copy(update={"small_op_step_s": 650e-6}) for d in moved.devices]})
    both = reading_notes(moved, _with_small_op(1.3e-3))
    assert len(both) == 2 and both[0] == unsteady_note(moved) and "2.00x" in both[1]


def test_quickstart_bad_model_is_one_line(tmp_path):
    result = run_pdv("quickstart", "-o", str(tmp_path), "--model", "nope.py:f")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
