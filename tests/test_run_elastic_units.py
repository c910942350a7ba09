"""The elastic run's pure parts: slow-rank detection, how a group of ranks ended, what a
checkpoint accepts, the per-device command prefix."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pdv.artifacts import ModelSpec
from pdv.errors import PdvError
from pdv.run.resume import (
    META_NAME,
    CheckpointMeta,
    check_resume,
    checkpoint_step_dir,
    resume_source,
)
from pdv.run.slow import SlowDetector, rank_predictions
from pdv.run.workers import EXIT_REPLAN, classify, rank_command

# --------------------------------------------------------------------------- slow ranks


def _detector(n: int = 3, **kw: float) -> SlowDetector:
    return SlowDetector([0.1] * n, [(r,) for r in range(n)], **kw)  # type: ignore[arg-type]


def test_rank_predictions_sum_the_stages_a_rank_runs() -> None:
    assert rank_predictions([1.0, 2.0, 3.0], [[0, 1], [2], [0]], 3) == [4.0, 1.0, 2.0]


def test_a_rank_is_flagged_after_steps_in_a_row_against_the_calibration() -> None:
    det = _detector(3, margin=0.5, steps=3, baseline_steps=2)
    # the machine runs everything 2x the prediction: that is the calibration, not slowness
    assert det.observe(0, [0.2, 0.21, 0.19]) == [] and det.normal_ratio is None
    assert det.observe(1, [0.2, 0.2, 0.2]) == []
    assert det.normal_ratio == pytest.approx(2.0)
    assert det.observe(2, [0.2, 0.5, 0.2]) == []
    assert det.observe(3, [0.2, 0.5, 0.2]) == []
    assert det.observe(4, [0.2, 0.2, 0.2]) == []  # a normal step breaks the run
    assert det.observe(5, [0.2, 0.5, 0.2]) == []
    assert det.observe(6, [0.2, 0.5, 0.2]) == []
    flags = det.observe(7, [0.2, 0.5, 0.2])
    assert [(f.rank, f.step, f.consecutive_steps) for f in flags] == [(1, 7, 3)]
    assert flags[0].ratio == pytest.approx(2.5)
    assert "rank 1 (stage 1) slow" in flags[0].reason()
    # still slow: flagged once per run of slow steps, not every step
    assert det.observe(8, [0.2, 0.5, 0.2]) == []
    assert det.flagged == flags


def test_the_margin_is_strict_and_a_rank_slow_from_the_start_is_found() -> None:
    det = _detector(4, margin=1.0, steps=1, baseline_steps=1)
    det.observe(0, [0.1, 0.1, 0.1, 0.5])  # rank 3 is slow from the first step
    assert det.normal_ratio == pytest.approx(1.0)
    assert [f.rank for f in det.observe(1, [0.2, 0.1, 0.1, 0.5])] == [3]  # 2.0x: not > 2.0x


def test_ranks_without_a_prediction_are_not_judged() -> None:
    det = SlowDetector([0.1, 0.0], [(0,), ()], margin=0.5, steps=1, baseline_steps=1)
    det.observe(0, [0.1, 5.0])
    assert det.observe(1, [0.1, 50.0]) == []


# --------------------------------------------------------------------------- group ends


def test_how_a_group_of_ranks_ended() -> None:
    kill, abort = -int(signal.SIGKILL), -int(signal.SIGABRT)
    assert classify([0, 0, 0], set()).kind == "done"
    assert classify([0, EXIT_REPLAN, EXIT_REPLAN], set()).kind == "replan"
    lost = classify([1, kill, None], {2})
    assert (lost.kind, lost.lost) == ("lost", (1,))
    # the ones the launcher killed itself are not lost; a rank that aborted itself failed
    assert classify([1, kill, kill], {1, 2}).kind == "failed"
    assert classify([abort, 1, 0], set()).kind == "failed"
    assert classify([2, 0], set()).kind == "failed"


def test_rank_prefix_names_the_device() -> None:
    argv = ["python", "-m", "x"]
    assert rank_command(None, 3, argv) == argv
    assert rank_command("taskset -c {device}", 3, argv) == ["taskset", "-c", "3", *argv]
    assert rank_command("sh -c 'echo {device} && exec \"$@\"' sh", 1, argv)[:4] == [
        "sh", "-c", 'echo 1 && exec "$@"', "sh"]


# --------------------------------------------------------------------------- checkpoints


def _meta(**kw: object) -> CheckpointMeta:
    base: dict = dict(step=4, model=ModelSpec(spec="gpt_tiny"),
                      tensors={"a.weight": [4, 4], "b.bias": [4]}, global_batch_size=8,
                      num_micro_batches=4, seed=0, optimizer="adamw", lr=1e-3,
                      plan_digest="sha256:x", loss=[1.0] * 4, step_times_s=[0.1] * 4)
    return CheckpointMeta(**{**base, **kw})


def _check(meta: CheckpointMeta, **kw: object) -> None:
    args: dict = dict(global_batch_size=8, seed=0, data=None, optimizer="adamw", steps=10)
    tensors = kw.pop("tensors", {"a.weight": [4, 4], "b.bias": [4]})
    check_resume(meta, Path("ck/step-4"), ModelSpec(spec="gpt_tiny", kwargs={"n": 1}),
                 tensors, **{**args, **kw})  # type: ignore[arg-type]


def test_what_a_checkpoint_accepts() -> None:
    _check(_meta())
    with pytest.raises(PdvError, match=r"another model .*a.weight is \[4, 4\] there, \[4, 8\]"):
        _check(_meta(), tensors={"a.weight": [4, 8], "b.bias": [4]})
    with pytest.raises(PdvError, match="another model .*c.weight is only here"):
        _check(_meta(), tensors={"a.weight": [4, 4], "b.bias": [4], "c.weight": [1]})
    with pytest.raises(PdvError, match="global batch of 8.*--global-batch 8"):
        _check(_meta(), global_batch_size=16)
    with pytest.raises(PdvError, match="--seed 0"):
        _check(_meta(), seed=1)
    with pytest.raises(PdvError, match="--optimizer adamw"):
        _check(_meta(), optimizer="sgd")
    with pytest.raises(PdvError, match="nothing to run"):
        _check(_meta(), steps=4)


def test_where_a_run_resumes_from(tmp_path: Path) -> None:
    with pytest.raises(PdvError, match="does not exist"):
        checkpoint_step_dir(tmp_path / "none")
    with pytest.raises(PdvError, match="holds no pdv checkpoint"):
        checkpoint_step_dir(tmp_path)
    own, other = tmp_path / "own", tmp_path / "other"
    for folder, step in ((own, 6), (other, 4)):
        (folder / f"step-{step}").mkdir(parents=True)
        (folder / f"step-{step}" / META_NAME).write_text(_meta(step=step).model_dump_json())
    assert checkpoint_step_dir(other / "step-4") == other / "step-4"
    (other / "latest").write_text("step-4\n")
    assert resume_source(own, other) == other / "step-4"  # own has no latest yet
    (own / "latest").write_text("step-6\n")
    assert resume_source(own, other) == own / "step-6"  # a restart continues its own run
    assert resume_source(None, None) is None
    (own / "latest").write_text("step-9\n")
    with pytest.raises(PdvError, match="incomplete"):
        checkpoint_step_dir(own)


# --------------------------------------------------------------------------- real processes


def _group(tmp_path: Path, script: str, devices: list[int], prefix: str | None = None):
    from pdv.run.workers import Workers

    return Workers(["-c", script], devices, tmp_path / "logs", prefix).wait()


def test_workers_name_the_rank_that_failed_first(tmp_path: Path) -> None:
    script = ("import os, sys, time; r = int(os.environ['RANK'])\n"
              "time.sleep(0.6 if r == 0 else 0.1); print('pdv: error: rank', r, flush=True)\n"
              "sys.exit(17 if r == 1 else 1)")
    end = _group(tmp_path, script, [0, 1])
    assert end.kind == "failed" and end.message.startswith("rank 1 exited with code 17: "
                                                           "pdv: error: rank 1")


def test_workers_see_a_rank_killed_from_outside(tmp_path: Path) -> None:
    script = ("import os, signal, time\n"
              "if os.environ['RANK'] == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
              "time.sleep(60)")
    end = _group(tmp_path, script, [4, 7])
    assert (end.kind, end.lost) == ("lost", (1,))
    assert end.codes[0] is None  # the survivor was still running: killed, not lost


def test_workers_run_on_their_device(tmp_path: Path) -> None:
    script = ("import os, sys\n"
              "ok = os.environ['PDV_DEVICE'] == os.environ['WANT'] and "
              "os.environ['CUDA_VISIBLE_DEVICES'] == '5,2' and os.environ['WORLD_SIZE'] == '2'\n"
              f"sys.exit({EXIT_REPLAN} if ok else 1)")
    end = _group(tmp_path, script, [5, 2], prefix="env WANT={device}")
    assert end.kind == "replan", end
