"""Plans that leave ranks idle, run on the ranks they use.

A planner may find fewer ranks faster (a memory-capped or slow rank kept out, or cores shared by
too many ranks). torchrun numbers its workers 0..k-1, so such a plan runs as a copy whose used
ranks are renumbered 0..k-1 in order, and the run report is mapped back to the plan's own ranks.
No torch here: the CLI and the testbed both call it before any process starts.
"""

from __future__ import annotations

from pdv.artifacts import Plan, RunReport, digest

__all__ = ["used_ranks", "leaves_ranks_idle", "renumbered", "report_in_plan_ranks"]


def used_ranks(plan: Plan) -> list[int]:
    """The ranks some stage of the plan names, ascending."""
    return sorted({r for s in plan.stages for r in s.ranks})


def leaves_ranks_idle(plan: Plan) -> bool:
    """Whether some rank of the plan's cluster is in no stage (torchrun cannot run it as is)."""
    used = used_ranks(plan)
    more_devices = plan.devices is not None and len(plan.devices) > len(used)
    return used != list(range(len(used))) or more_devices


def renumbered(plan: Plan, used: list[int]) -> Plan:
    """The plan on ranks 0..k-1: rank used[i] -> i in stages, devices and predicted memory."""
    new = {r: i for i, r in enumerate(used)}
    data = plan.model_dump(mode="json", by_alias=True)
    for stage in data["stages"]:
        stage["ranks"] = [new[r] for r in stage["ranks"]]
    if plan.devices is not None:
        # Launching reads one device per rank the stages use, so the idle ones go. Taken from
        # the typed devices: the plan's JSON writes them as runs of alike ranks.
        by_rank = {d.rank: d for d in plan.devices}
        data["devices"] = [by_rank[r].model_copy(update={"rank": new[r]}).model_dump(
            mode="json", by_alias=True) for r in used if r in by_rank]
    pred = data.get("predicted")
    if pred is not None:
        pred["peak_memory_bytes"] = {
            str(new[int(k)]): v for k, v in pred["peak_memory_bytes"].items() if int(k) in new
        }
    out = Plan.model_validate(data)
    out.provenance.notes.append(f"ranks {used} renumbered 0..{len(used) - 1} for torchrun")
    return out


def report_in_plan_ranks(report: RunReport, plan: Plan, used: list[int], ran_as: str) -> RunReport:
    """A renumbered run's report in the plan's own rank numbers, against the plan's digest."""
    peaks = {str(used[int(k)]): v for k, v in report.measured.peak_memory_bytes.items()}
    compute = report.measured.compute_s
    if compute is not None:
        compute = {str(used[int(k)]): v for k, v in compute.items()}
    measured = report.measured.model_copy(update={"peak_memory_bytes": peaks,
                                                  "compute_s": compute})
    slow = [s.model_copy(update={"rank": used[s.rank]}) for s in report.slow_ranks]
    provenance = report.provenance.model_copy(deep=True)
    provenance.inputs["plan"] = digest(plan)
    provenance.notes.append(f"ran as {ran_as}: torchrun rank i was plan rank {used}[i]")
    return report.model_copy(
        update={
            "measured": measured,
            "plan_digest": digest(plan),
            "predicted": plan.predicted,
            "provenance": provenance,
            "slow_ranks": slow,
        }
    )
