"""pdv check: run a set of plans, compare predicted with measured, fail past tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pdv import artifacts
from pdv.check import (
    SCHEMA,
    Candidate,
    Tolerances,
    default_plans,
    ops_compute,
    predict,
    run_plan,
    steps_for,
    summarize,
    write_json_atomic,
)
from pdv.cli.app import app, console, err_console
from pdv.cli.plan_cmd import _ints
from pdv.cli.render import fmt_time, new_table, print_table
from pdv.cost.compute import spell_apart, spell_note, spell_ratio, unsteady_ranks
from pdv.errors import PdvError
from pdv.plan.problem import PlanProblem
from pdv.plan.search import check_plan_dtype, check_profiles

__all__ = ["check"]


@app.command("check")
def check(
    profiles: list[Path] = typer.Argument(..., help="Model profiles, one per device kind."),
    cluster: Path = typer.Option(..., "--cluster", help="Cluster artifact the runs happen on."),
    global_batch: int | None = typer.Option(
        None, "--global-batch", min=1, help="Samples per step (needed unless --plan is given)."),
    plan: list[Path] = typer.Option(
        [], "--plan", help="Check these plans (repeatable) instead of the default set; each "
        "is priced again on the given profiles and cluster; the first is the pick whose place "
        "is reported."),
    top: int = typer.Option(3, "--top", min=1, help="Default set: pdv's K best plans."),
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines", help="Default set: each baseline planner's pick."),
    shapes: int = typer.Option(
        2, "--shapes", min=0, help="Default set: at most this many plans of other shapes."),
    span: float = typer.Option(
        1.5, "--span", min=1.0, help="Default set: add shapes until slowest/fastest predicted "
        "reaches this (within --shapes)."),
    micro_batch_sizes: str | None = typer.Option(
        None, "--micro-batch-sizes", help="Allowed micro-batch sizes for the default set."),
    fsdp: bool = typer.Option(True, "--fsdp/--no-fsdp", help="Let pdv's search use FSDP."),
    recompute: bool = typer.Option(
        True, "--recompute/--no-recompute", help="Let pdv's search recompute activations."),
    steps: int = typer.Option(10, "--steps", min=1, help="Training steps per plan."),
    warmup: int = typer.Option(4, "--warmup", min=0, help="Steps left out of each median."),
    min_seconds: float = typer.Option(
        1.0, "--min-seconds", min=0.0, help="Run a plan for more than --steps when its "
        "steps after warm-up, at its predicted step time, would measure for less than this "
        "(a median of a few short steps is mostly noise); 0: exactly --steps."),
    repeat: int = typer.Option(
        1, "--repeat", min=1, help="Run the whole set this many times, plan after plan each "
        "round (so a drift in the machine's load reaches every plan alike); a plan's measured "
        "step is the median of its rounds."),
    model: str | None = typer.Option(
        None, "--model", help="Model factory for pdv run (default: the one the plans name)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Factory argument key=value."),
    run_timeout: float = typer.Option(
        600.0, "--run-timeout", min=1.0, help="Seconds one plan's run may take."),
    out: Path = typer.Option(
        Path("pdv-check"), "--out", help="Folder for the plans and the run reports."),
    report: Path | None = typer.Option(
        None, "--report", help="Write the check report JSON here (default: OUT/check.json)."),
    max_median_error: float | None = typer.Option(
        None, "--max-median-error", min=0.0, help="Fail when median |error| exceeds this "
        "(a fraction: 0.05 = 5%)."),
    max_error: float | None = typer.Option(
        None, "--max-error", min=0.0, help="Fail when any plan's |error| exceeds this."),
    min_spearman: float | None = typer.Option(
        None, "--min-spearman", min=-1.0, max=1.0, help="Fail when Spearman(predicted, "
        "measured) is below this."),
    max_pick_gap: float | None = typer.Option(
        None, "--max-pick-gap", min=0.0, help="Fail when pdv's pick measures more than this "
        "fraction slower than the set's measured best."),
    max_failures: int = typer.Option(
        0, "--max-failures", min=0, help="Fail when more plans than this fail to run."),
    max_memory_error: float | None = typer.Option(
        None, "--max-memory-error", min=0.0, help="Fail when any plan's predicted peak memory "
        "is off by more than this fraction on any rank."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run plans for a few steps each; print predicted, measured, error, Spearman, the pick's
    place; exit 1 past the given tolerances."""
    profs = artifacts.load_profiles(profiles)
    clus = artifacts.load_as(cluster, "cluster")
    check_profiles(profs, clus, None, None)
    say = (lambda m: err_console.print(f"[dim]{m}[/]")) if not as_json else (lambda _m: None)
    spells = {kind: spell_ratio(prof, clus) for kind, prof in sorted(profs.items())}
    for kind, prof in sorted(profs.items()):
        if note := spell_note(f"the {kind} profile", prof, clus):
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    if plan:
        pool = []
        for k, path in enumerate(plan, 1):
            p = artifacts.load_as(path, "plan")
            check_plan_dtype(p, profs)
            label = "pdv #1" if k == 1 else f"plan {k}"  # the first given plan is the pick
            pool.append(Candidate(predict(p, profs, clus), [f"{label} ({path.name})"
                                                            if k > 1 else label]))
    else:
        if global_batch is None:
            raise PdvError("--global-batch is needed to search the default plan set "
                           "(or pass --plan files)")
        problem = PlanProblem(profiles=profs, cluster=clus, global_batch=global_batch,
                              micro_batch_sizes=_ints(micro_batch_sizes, "--micro-batch-sizes"),
                              allow_fsdp=fsdp, allow_recompute=recompute)  # fmt: skip
        pool = default_plans(problem, top, baselines, shapes, span, say)
    for cand in pool:
        cand.ops_compute_s = ops_compute(cand.plan, profs, clus)
    run_args = [*(["--model", model] if model else []),
                *(a for kv in model_arg for a in ("--model-arg", kv))]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for round_ in range(1, repeat + 1):
        for i, cand in enumerate(pool, 1):
            if cand.error:
                continue
            each = f" (round {round_}/{repeat})" if repeat > 1 else ""
            say(f"running {i}/{len(pool)}{each}: {', '.join(cand.labels)}")
            n = steps_for(cand.predicted_s, steps, warmup, min_seconds)
            run_plan(cand, out, i, run_args, n, warmup, run_timeout, round_)
            if cand.error:
                say(f"  failed: {cand.error}")
    tol = Tolerances(max_median_error, max_error, min_spearman, max_pick_gap, max_failures,
                     max_memory_error)
    result = summarize(pool, tol)
    doc = {
        "schema": SCHEMA,
        "inputs": {"profiles": {k: artifacts.digest(p) for k, p in sorted(profs.items())},
                   "cluster": artifacts.digest(clus)},
        "steps": steps,
        "warmup": warmup,
        "min_seconds": min_seconds,
        "repeat": repeat,
        "tolerances": {k: v for k, v in vars(tol).items()},
        # Ranks whose speed moved during the cluster probe: an error that follows the
        # compute column then says more about the file than about the pricing.
        "cluster_unsteady": [{"rank": r, "matmul_flops_alone_min": lo,
                              "matmul_flops_alone_max": hi}
                             for r, lo, hi in unsteady_ranks(clus)],
        # Each profile's small-op reference step over the cluster's (pdv.cost.compute
        # .spell_ratio; null where either lacks it): far from 1, one of the two files was
        # taken in a spell of the machine, and errors follow it.
        "small_op_ratio": spells,
        **result,
    }
    target = report or out / "check.json"
    write_json_atomic(target, doc)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print(doc, target)
    if not doc["passed"]:
        raise typer.Exit(1)


def _print(doc: dict, target: Path) -> None:
    t = new_table("predicted against measured (median step after warm-up)",
                  ("plan", "predicted", "measured", "IQR", "± rounds", "error", "compute",
                   "memory", "load", "stages", "mbs x M", "steps"),
                  left={"plan", "stages"})  # fmt: skip
    for r in doc["rows"]:
        meas = r["measured_s"]
        t.add_row(
            ", ".join(r["labels"]),
            fmt_time(r["predicted_s"]),
            fmt_time(meas) if meas is not None else "failed",
            fmt_time(r["measured_spread_s"]) if r["measured_spread_s"] is not None else "-",
            f"{r['measured_stderr']:.1%}" if r["measured_stderr"] is not None else "-",
            f"{r['error']:+.1%}" if r["error"] is not None else "-",
            f"{r['compute_drift']:+.1%}" if r["compute_drift"] is not None else "-",
            f"{r['memory_error']:+.1%}" if r["memory_error"] is not None else "-",
            f"{r['load']:.1f}" if r["load"] is not None else "-",
            " ".join(r["layout"]),
            f"{r['micro_batch_size']} x {r['num_micro_batches']}",
            str(r["steps"]) if r["steps"] is not None else "-",
        )
    print_table(console, t)
    s = doc["summary"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    rho = "-" if s["spearman"] is None else f"{s['spearman']:.2f}"
    span = "-" if s["predicted_span"] is None else f"{s['predicted_span']:.2f}x"
    console.print(f"{s['ran']} of {s['plans']} plans ran; predicted span {span}; median |error| "
                  f"{pct(s['median_abs_error'])}, max {pct(s['max_abs_error'])}, mean signed "
                  f"{pct(s['mean_signed_error'])}; Spearman {rho}; peak memory median |error| "
                  f"{pct(s['memory_median_abs_error'])}, max {pct(s['memory_max_abs_error'])}",
                  highlight=False)
    if s["compute_drift_median"] is not None:
        lo, hi = s["compute_drift_range"]
        console.print(f"the ranks' own compute ran {s['compute_drift_median']:+.1%} against "
                      f"its profile at the median plan ({lo:+.1%} .. {hi:+.1%}; the compute "
                      "column): an error that follows it is the ops' speed in the run, not the "
                      "pricing of what lies between them (on CPU ranks the backend's message "
                      "work on the ops' cores reads as compute too)", highlight=False)
    if s["measured_stderr_median"] is not None:
        console.print(f"the measurement's own noise: its rounds' standard error is "
                      f"{pct(s['measured_stderr_median'])} of the measured step at the median "
                      f"plan, {pct(s['measured_stderr_max'])} at most; errors of that size say "
                      "as much about the runs as about the prediction", highlight=False)
    p = s["pick"]
    if p:
        console.print(f"pdv's pick ranked {p['measured_rank']} of {p['of']} measured "
                      f"({p['vs_best']:.2f}x the measured best; predicted rank "
                      f"{p['predicted_rank']})", highlight=False)
    for u in doc["cluster_unsteady"]:
        console.print(f"[yellow]note:[/] the cluster file's rank {u['rank']} read "
                      f"{u['matmul_flops_alone_min'] / 1e9:.1f} .. "
                      f"{u['matmul_flops_alone_max'] / 1e9:.1f} GFLOP/s alone over its probe: "
                      "the machine's speed moved while the file was taken, and every "
                      "prediction on that rank carries the rate kept", highlight=False)
    for kind, ratio in doc["small_op_ratio"].items():
        if spell_apart(ratio):
            console.print(f"[yellow]note:[/] the {kind} profile ran the small-op reference "
                          f"{ratio:.2f}x the cluster file's time: one of the two was taken in "
                          "a spell of the machine, and the errors carry it", highlight=False)
    load, cpus = s["max_load"], s["cpus"]
    if load is not None and cpus and load > cpus + s["ranks"]:  # the runs' own ranks add theirs
        console.print(f"[yellow]note:[/] the 1-min load average reached {load:.1f} on {cpus} "
                      "CPUs around the runs: other work shared the cores, and the measured "
                      "times hold it (the profiles cannot)", highlight=False)
    for row in doc["rows"]:
        if row["failure"]:
            console.print(f"failed: {', '.join(row['labels'])}: {row['failure']}",
                          highlight=False)
    for miss in doc["misses"]:
        console.print(f"[red]outside tolerance:[/] {miss}", highlight=False)
    console.print(f"report written to {target}", highlight=False)
