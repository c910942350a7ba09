"""pdv plan: search stages, device groups and sharding on the measured matrix; write the plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from pdv import artifacts
from pdv.artifacts import Plan
from pdv.cli.app import app, console, err_console
from pdv.cli.render import fmt_bytes, fmt_time, new_table, print_table
from pdv.errors import PdvError
from pdv.plan.problem import DEFAULT_VIRTUAL_STAGES, PlanProblem
from pdv.plan.search import PLANNERS, check_profiles, plan_provenance, search


def _ints(text: str | None, flag: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PdvError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _row(plan: Plan, seconds: float) -> dict:
    pred = plan.predicted
    assert pred is not None
    return {
        "planner": plan.planner.name,
        "step_time_s": pred.step_time_s,
        "bubble_fraction": pred.bubble_fraction,
        "stages": len(plan.stages),
        "micro_batch_size": plan.micro_batch_size,
        "num_micro_batches": plan.num_micro_batches,
        "max_peak_memory_bytes": max(pred.peak_memory_bytes.values()),
        "status": plan.planner.status,
        "optimality_gap": plan.planner.optimality_gap,
        "search_time_s": round(seconds, 4),
        "layout": [f"{s.layers[0]}-{s.layers[1]}:dp{s.dp}tp{s.tp}" for s in plan.stages],
    }


@app.command()
def plan(
    profiles: list[Path] = typer.Argument(..., help="Model profiles, one per device kind."),
    cluster: Path = typer.Option(..., "--cluster", help="Cluster artifact (measured/declared)."),
    global_batch: int = typer.Option(..., "--global-batch", min=1, help="Samples per step."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Write the best plan here."),
    micro_batch_sizes: str | None = typer.Option(
        None,
        "--micro-batch-sizes",
        help="Allowed micro-batch sizes, e.g. 1,2,4 (default: "
        "the profiled ones that divide the global batch).",
    ),
    optimizer: str | None = typer.Option(None, "--optimizer", help="Must match the profile."),
    dtype: str | None = typer.Option(None, "--dtype", help="Must match the profile."),
    memory_margin: float = typer.Option(
        0.1, "--memory-margin", min=0.0, max=0.9, help="Fraction of device memory kept free."
    ),
    schedule: str = typer.Option("1F1B", "--schedule", help="GPipe or 1F1B."),
    virtual_stages: str = typer.Option(
        ",".join(str(v) for v in (1, *DEFAULT_VIRTUAL_STAGES)), "--virtual-stages",
        help="Model chunks per rank group tried as interleaved forms of pdv's 1F1B pipelines "
        "(Interleaved1F1B); 1 alone for plain pipelines only.",
    ),
    time_limit: float = typer.Option(
        10.0,
        "--time-limit",
        min=0.01,
        help="CP-SAT limit per stage, in its deterministic time (about seconds).",
    ),
    fsdp: bool = typer.Option(
        True, "--fsdp/--no-fsdp", help="Let the search shard replicas' state with FSDP."
    ),
    recompute: bool = typer.Option(
        True, "--recompute/--no-recompute", help="Let the search recompute activations."
    ),
    planner: str = typer.Option("pdv", "--planner", help="pdv | hierarchy | uniform | pipedream"),
    compare: bool = typer.Option(False, "--compare", help="Run every planner, side by side."),
    top: int = typer.Option(1, "--top", min=1, help="Write the K best distinct plans."),
    top_dir: Path | None = typer.Option(None, "--top-dir", help="Folder for --top K plans."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Plan hybrid-parallel training on the measured devices and links."""
    the_schedule = artifacts.canonical_schedule(schedule)
    if the_schedule not in ("1F1B", "GPipe"):
        raise PdvError(f"--schedule {schedule!r}: the planner supports 1F1B and GPipe")
    if planner not in PLANNERS:
        raise PdvError(f"--planner {planner!r}: choose one of {', '.join(PLANNERS)}")
    if top > 1 and top_dir is None:
        raise PdvError("--top K needs --top-dir DIR to write the K plans into")
    profs = artifacts.load_profiles(profiles)
    clus = artifacts.load_as(cluster, "cluster")
    check_profiles(profs, clus, dtype, optimizer)
    problem = PlanProblem(
        profiles=profs,
        cluster=clus,
        global_batch=global_batch,
        micro_batch_sizes=_ints(micro_batch_sizes, "--micro-batch-sizes"),
        memory_margin=memory_margin,
        schedule=the_schedule,
        time_limit_s=time_limit,
        allow_fsdp=fsdp,
        allow_recompute=recompute,
        virtual_stages=tuple(v for v in _ints(virtual_stages, "--virtual-stages") if v > 1),
    )

    def say(msg: str) -> None:
        if not as_json and err_console.is_terminal:  # progress is for people, not pipes
            err_console.print(f"[dim]{msg}[/]")

    provenance = plan_provenance(profs, clus)
    off = [flag for flag, on in (("--no-fsdp", fsdp), ("--no-recompute", recompute)) if not on]
    if off:  # a plan says what its search was not allowed to try
        provenance = provenance.model_copy(
            update={"notes": [*provenance.notes, f"searched with {' '.join(off)}"]})
    # With --compare the baselines search first, so each row's search time is its own; pdv's
    # search then reuses their plans (memoized per problem) rather than searching them again.
    names = [n for n in PLANNERS if n != planner] + [planner] if compare else [planner]
    results, rows = {}, []
    for name in names:
        started = time.perf_counter()
        try:
            res = search(problem, name, top if name == planner else 1, say, provenance)
        except PdvError as exc:
            if not compare or name == planner:
                raise
            rows.append({"planner": name, "error": str(exc)})
            continue
        seconds = time.perf_counter() - started
        results[name] = res
        rows.append(_row(res.plans[0], seconds))
    rows.sort(key=lambda r: list(PLANNERS).index(r["planner"]))
    best = results[planner].plans
    if out is not None:
        artifacts.write(out, best[0])
    written = []
    if top_dir is not None:
        for k, p in enumerate(best, 1):
            path = top_dir / f"plan-{k}.json"
            artifacts.write(path, p)
            written.append({"rank": k, "file": str(path), "step_time_s": p.predicted.step_time_s})
    if as_json:
        summary = {
            "planner": planner,
            "plans": rows,
            "out": str(out) if out else None,
            "top": written,
        }
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    _print(rows, planner, out, written)


def _print(rows: list[dict], planner: str, out: Path | None, written: list[dict]) -> None:
    t = new_table(
        "planners (predicted by the simulator on the measured links)",
        ("planner", "step time", "vs pdv", "bubble", "stages", "mbs x M", "peak mem", "solver",
         "gap", "search"),  # fmt: skip
        left={"planner", "solver"},
    )
    ref = next((r["step_time_s"] for r in rows if r["planner"] == "pdv" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            t.add_row(r["planner"], "infeasible", *[""] * 8)
            continue
        t.add_row(
            r["planner"] + (" *" if r["planner"] == planner else ""),
            fmt_time(r["step_time_s"]),
            f"{r['step_time_s'] / ref:.2f}x" if ref else "-",
            f"{r['bubble_fraction']:.1%}" if r["bubble_fraction"] is not None else "-",
            str(r["stages"]),
            f"{r['micro_batch_size']} x {r['num_micro_batches']}",
            fmt_bytes(r["max_peak_memory_bytes"]),
            r["status"],
            "-" if r["optimality_gap"] is None else f"{r['optimality_gap']:.2%}",
            fmt_time(r["search_time_s"]),
        )
    print_table(console, t)
    for r in rows:
        if "layout" in r:
            console.print(f"  {r['planner']}: {'  '.join(r['layout'])}", highlight=False)
    if out is not None:
        console.print(f"wrote {out}", highlight=False)
    for w in written:
        console.print(f"  #{w['rank']} {fmt_time(w['step_time_s'])}  {w['file']}", highlight=False)
