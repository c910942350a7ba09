"""pdv run --elastic: when a rank dies or is slow, re-measure what is left, replan, resume.

The control loop lives in the launcher, never in a rank (a dying rank cannot be trusted to
report anything). Each *segment* runs one plan on this host as one process per rank
(pdv.run.workers) until the group ends:

- done: the run finished the requested steps;
- lost: a rank was ended by a signal from outside (SIGKILL, the OOM killer): its device leaves
  the pool; the others are killed (they would block on it);
- replan: the ranks found a rank slow (pdv.run.slow), saved a checkpoint at that step and
  stopped (exit EXIT_REPLAN); the pool is unchanged, the slow device is re-measured slow;
- failed: anything else (a Python error, a PdvError) ends the run: replanning does not fix it.

After lost or replan, the pool's devices re-measure their links and speed quickly (pdv profile
cluster with a short sweep, on the pool only), the planner plans the same training on that
cluster (pdv.plan.replan: same global batch, so the same data order), and the next segment
resumes from the latest checkpoint in --checkpoint-dir (DCP reshards it to the new plan):
nothing past that checkpoint is lost, and the run still ends at the requested step. Every switch
is recorded in the run report (pdv.artifacts.Replan); the plans and clusters of each segment are
kept in ``<checkpoint-dir>/elastic/``. A device is the rank it had in the first plan's cluster;
a plan that leaves pool devices idle runs on the ones it uses (pdv.run.idle), and the idle ones
stay in the pool for the next replan.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, ModelProfile, Plan, Replan, RunReport, SlowRank, digest
from pdv.errors import PdvError
from pdv.plan.replan import replan
from pdv.run.idle import leaves_ranks_idle, renumbered, report_in_plan_ranks, used_ranks
from pdv.run.launch import RunOptions, runtime_argv
from pdv.run.resume import META_NAME, read_meta, resume_source
from pdv.run.workers import GroupEnd, Workers

__all__ = ["ElasticOptions", "run_elastic"]

Say = Callable[[str], None]


@dataclass(frozen=True)
class ElasticOptions:
    """What the elastic loop needs beyond a plain run's options."""

    profiles: Mapping[str, ModelProfile]
    rank_prefix: str | None = None
    max_replans: int = 4
    sizes: str = "64KiB,1MiB"
    """the survivors' quick link sweep (largest size = the sweep's end)"""
    iters: int = 3
    remeasure_timeout_s: float = 120.0
    memory_margin: float = 0.1
    time_limit_s: float = 10.0


@dataclass
class _Segment:
    plan: Plan
    """in its cluster's rank numbers"""
    devices: list[int]
    """device of each rank of the plan's cluster"""
    start_step: int
    measured_s: float | None = None
    report: RunReport | None = None


def _last_step(progress: Path) -> int:
    steps = [0]
    for f in progress.glob("rank-*.json"):
        try:
            steps.append(int(json.loads(f.read_text())["event"].get("step", 0)))
        except (OSError, ValueError, KeyError):
            continue
    return max(steps)


def _checkpoint_step(opts: RunOptions) -> tuple[int, list[float]]:
    """(step, step times so far) of the checkpoint the next segment resumes from."""
    source = resume_source(opts.checkpoint_dir, opts.resume_from)
    if source is None:
        return 0, []
    meta = read_meta(source)
    return meta.step, list(meta.step_times_s)


def _median(times: list[float], warmup: int) -> float | None:
    timed = times[warmup:] or times
    return statistics.median(timed) if timed else None


def _launch(seg: _Segment, opts: RunOptions, eopts: ElasticOptions, folder: Path,
            stop_when_slow: bool) -> tuple[GroupEnd, Path, list[int], Plan]:
    """Run one segment; (how it ended, its progress folder, devices by run rank, run plan)."""
    from pdv.run.local import check_plan

    used = used_ranks(seg.plan)
    run_plan = renumbered(seg.plan, used) if leaves_ranks_idle(seg.plan) else seg.plan
    plan_path = folder / "run-plan.json"
    artifacts.write(plan_path, run_plan)
    seg_opts = replace(opts, plan=str(plan_path), report=str(folder / "report.json"),
                       stop_when_slow=stop_when_slow)
    check_plan(run_plan, seg_opts)
    progress = folder / "progress"
    progress.mkdir(parents=True, exist_ok=True)
    devices = [seg.devices[r] for r in used]
    workers = Workers(runtime_argv(seg_opts), devices, folder / "logs", eopts.rank_prefix,
                      env={"PDV_PROGRESS_DIR": str(progress)})
    return workers.wait(), progress, devices, run_plan


def _remeasure(pool: list[int], eopts: ElasticOptions, folder: Path, say: Say,
               ) -> tuple[ClusterArtifact, list[int]]:
    """The pool's cluster, measured quickly; a device lost meanwhile leaves the pool too."""
    out = folder / "cluster.json"
    largest = eopts.sizes.split(",")[-1]
    argv = ["-m", "pdv", "profile", "cluster", "-o", str(out), "--timeout",
            f"{eopts.remeasure_timeout_s:g}", "--sizes", eopts.sizes, "--max-size", largest,
            "--iters", str(eopts.iters), "--warmup", "1"]
    while pool:
        say(f"re-measuring the links of {len(pool)} ranks (devices {pool})")
        out.unlink(missing_ok=True)  # only this attempt's measurement counts
        end = Workers(argv, pool, folder / "measure-logs", eopts.rank_prefix).wait()
        if end.kind == "done":
            return artifacts.load_as(out, "cluster"), pool
        measured = _written(out, len(pool))
        if end.kind == "failed" and measured is not None:
            # Rank 0 writes only after every rank's results are gathered, and the ranks leave
            # together after it: a rank that then dies in gloo's teardown (SIGABRT, seen in
            # CI) took nothing from the measurement.
            say(f"a rank failed after the measurement was written ({end.message}); using it")
            return measured, pool
        if end.kind != "lost":
            raise PdvError(f"re-measuring the {len(pool)} remaining ranks failed: "
                           f"{end.message or end.kind}")
        gone = {pool[i] for i in end.lost}
        say(f"device(s) {sorted(gone)} vanished while measuring")
        pool = [d for d in pool if d not in gone]
    raise PdvError("every rank is gone; nothing to continue on")


def _written(out: Path, ranks: int) -> ClusterArtifact | None:
    """The cluster file of a measurement that completed (all `ranks` in it), else None."""
    try:
        measured = artifacts.load_as(out, "cluster")
    except (OSError, PdvError):
        return None
    return measured if len(measured.devices) == ranks else None


def run_elastic(plan: Plan, opts: RunOptions, eopts: ElasticOptions, say: Say) -> RunReport:
    """Run the plan to opts.steps, replanning on what is left after each loss or slow rank."""
    assert opts.checkpoint_dir is not None and opts.checkpoint_every > 0
    work = Path(opts.checkpoint_dir) / "elastic"
    started = time.monotonic()
    n = len(plan.devices) if plan.devices else max(used_ranks(plan)) + 1
    seg = _Segment(plan, list(range(n)), _checkpoint_step(opts)[0])
    records: list[Replan] = []
    slow: list[SlowRank] = []
    noop_slow = False
    for k in range(eopts.max_replans + 1):
        folder = work / f"segment-{k}"
        stop = not noop_slow and len(records) < eopts.max_replans
        end, progress, run_devices, run_plan = _launch(seg, opts, eopts, folder, stop)
        detected = time.monotonic() - started
        report_path = folder / "report.json"
        seg.report = artifacts.load_as(report_path, "run-report") if end.kind in (
            "done", "replan") and report_path.is_file() else None
        ckpt_step, ckpt_times = _checkpoint_step(opts)
        if seg.report is not None:
            slow += [f.model_copy(update={"reason": f"{f.reason} (device {run_devices[f.rank]})"})
                     for f in seg.report.slow_ranks]
            seg.measured_s = seg.report.measured.step_time_s
        else:  # killed: its steps up to the checkpoint are what is known of it
            seg.measured_s = _median(ckpt_times[seg.start_step:ckpt_step], opts.warmup)
        if records:
            records[-1] = records[-1].model_copy(update={"new_measured_step_s": seg.measured_s})
        if end.kind == "done":
            assert seg.report is not None
            return _final(seg, run_plan, records, slow)
        if end.kind == "failed":
            raise PdvError(f"the run failed (not a lost rank, so no replan): {end.message}")
        if ckpt_step >= opts.steps:
            raise PdvError(f"all {opts.steps} steps are done and checkpointed in "
                           f"{opts.checkpoint_dir}, but a rank ended ({end.kind}) before the "
                           f"report was written; the checkpoint's {META_NAME} holds the losses")
        if len(records) >= eopts.max_replans:
            raise PdvError(f"rank(s) lost after {len(records)} replans (--max-replans); the "
                           f"checkpoint in {opts.checkpoint_dir} resumes it")
        last = _last_step(progress)
        lost = [run_devices[i] for i in end.lost]
        if end.kind == "lost":
            reason = "; ".join(f"rank {i} (device {run_devices[i]}) vanished: exit by signal "
                               f"{-(end.codes[i] or 0)}" for i in end.lost)
        else:
            flags = seg.report.slow_ranks if seg.report else []
            reason = "; ".join(f"{f.reason} (device {run_devices[f.rank]})" for f in flags)
        say(f"{reason}; after step {last}")
        pool = [d for d in seg.devices if d not in lost]
        if not pool:
            raise PdvError("every rank is gone; nothing to continue on")
        t0 = time.monotonic()
        cluster, pool = _remeasure(pool, eopts, folder, say)
        t1 = time.monotonic()
        mapping = {r: pool.index(d) for r, d in enumerate(seg.devices) if d in pool}
        res = replan(seg.plan, eopts.profiles, cluster, mapping,
                     memory_margin=eopts.memory_margin, time_limit_s=eopts.time_limit_s)
        t2 = time.monotonic()
        artifacts.write(folder / "new-plan.json", res.plan)
        # The same layout on the same devices: stopping for this rank again would change nothing.
        noop_slow = end.kind == "replan" and pool == seg.devices and (
            res.plan.stages, res.plan.micro_batch_size) == (seg.plan.stages,
                                                             seg.plan.micro_batch_size)
        new_pred = res.plan.predicted.step_time_s if res.plan.predicted else None
        records.append(Replan(
            kind="lost" if end.kind == "lost" else "slow", reason=reason,
            detected_at_s=round(detected, 3), last_step=last, resumed_from_step=ckpt_step,
            old_plan_digest=digest(seg.plan), new_plan_digest=digest(res.plan),
            devices_before=[seg.devices[r] for r in used_ranks(seg.plan)],
            devices_after=[pool[r] for r in used_ranks(res.plan)],
            cluster_digest=digest(cluster),
            old_predicted_step_s=res.old_predicted_s, new_predicted_step_s=new_pred,
            old_measured_step_s=seg.measured_s, new_measured_step_s=None,
            state_moved_bytes=res.cost.moved_bytes,
            state_only_in_checkpoint_bytes=res.cost.checkpoint_only_bytes,
            switch_estimate_s=res.cost.estimate_s,
            remeasure_s=round(t1 - t0, 3), replan_s=round(t2 - t1, 3),
        ))
        say(f"replanned on devices {records[-1].devices_after}: predicted "
            f"{new_pred if new_pred is not None else float('nan'):.4f}s a step; resuming from "
            f"step {ckpt_step}" + (" (the same plan: it continues without stopping for slow "
                                   "ranks)" if noop_slow else ""))
        seg = _Segment(res.plan, pool, ckpt_step)
    raise AssertionError("the loop returns or raises")


def _final(seg: _Segment, run_plan: Plan, records: list[Replan],
           slow: list[SlowRank]) -> RunReport:
    assert seg.report is not None
    report = seg.report
    if run_plan is not seg.plan:
        used = used_ranks(seg.plan)
        report = report_in_plan_ranks(report, seg.plan, used, f"ranks 0..{len(used) - 1}")
    provenance = report.provenance.model_copy(deep=True)
    provenance.notes.append(
        f"elastic: {len(records)} replan(s); the last plan ran on devices "
        f"{[seg.devices[r] for r in used_ranks(seg.plan)]}; measured and predicted are its own")
    return report.model_copy(update={"replans": records, "slow_ranks": slow,
                                     "provenance": provenance})
