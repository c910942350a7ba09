"""pdv replan: a plan for a changed cluster, old against new, and what the switch costs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from pdv import artifacts
from pdv.artifacts import ModelProfile
from pdv.cli.app import app, console, err_console
from pdv.cli.render import fmt_bytes, fmt_time, new_table, print_table
from pdv.errors import PdvError
from pdv.plan.replan import ReplanResult, match_devices, replan

__all__ = ["replan_command"]


def _profiles(paths: list[Path]) -> dict[str, ModelProfile]:
    if not paths:
        raise PdvError("no model profile: pass --profile PROFILE.json (one per device kind; "
                       "the plan names no profile files, only their digests)")
    return artifacts.load_profiles(paths)


def _kept(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PdvError(f"--kept takes comma-separated old ranks, got {text!r}") from None


def _layout(plan: artifacts.Plan) -> str:
    return "  ".join(f"{s.layers[0]}-{s.layers[1]}:dp{s.dp}tp{s.tp}{list(s.ranks)}"
                     for s in plan.stages) + f"  {plan.micro_batch_size}x{plan.num_micro_batches}"


def _summary(res: ReplanResult, out: Path | None, seconds: float) -> dict:
    new = res.plan.predicted
    return {
        "changes": res.changes,
        "mapping": {str(o): n for o, n in sorted(res.mapping.items())},
        "old_predicted_step_s": res.old_predicted_s,
        "old_on_new_cluster_step_s": res.old_on_new_s,
        "new_predicted_step_s": new.step_time_s if new else None,
        "new_layout": _layout(res.plan),
        "switch": {
            "held_bytes": res.cost.held_bytes,
            "moved_bytes": res.cost.moved_bytes,
            "checkpoint_only_bytes": res.cost.checkpoint_only_bytes,
            "estimate_s": res.cost.estimate_s,
            "transfers": [list(t) for t in res.cost.transfers],
        },
        "new_plan_digest": artifacts.digest(res.plan),
        "out": str(out) if out else None,
        "search_time_s": round(seconds, 4),
    }


@app.command("replan")
def replan_command(
    plan_path: Path = typer.Argument(..., metavar="PLAN", help="The plan that ran (pdv.plan/v1)."),
    cluster_path: Path = typer.Option(..., "--cluster", "-c",
                                      help="The changed cluster (measured or declared)."),
    profile: list[Path] = typer.Option(
        [], "--profile", "-p", help="Model profile, one per device kind of the new cluster."
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="Write the new plan here."),
    kept: str | None = typer.Option(
        None, "--kept", help="Old rank of each new rank, in order (e.g. 0,1,3: rank 2 is gone); "
        "default: by host and position on the host."
    ),
    old_cluster: Path | None = typer.Option(
        None, "--old-cluster", help="The cluster the plan was made for, to report link changes."
    ),
    memory_margin: float = typer.Option(
        0.1, "--memory-margin", min=0.0, max=0.9, help="Fraction of device memory kept free."
    ),
    time_limit: float = typer.Option(10.0, "--time-limit", min=0.01,
                                     help="CP-SAT limit per stage (deterministic seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Plan again for a changed cluster; print old vs new step time and the switch's cost."""
    plan = artifacts.load_as(plan_path, "plan")
    cluster = artifacts.load_as(cluster_path, "cluster")
    profiles = _profiles(profile)
    old_links = None
    if old_cluster is not None:
        old = artifacts.load_as(old_cluster, "cluster")
        if plan.provenance.inputs.get("cluster") not in (None, artifacts.digest(old)):
            err_console.print(f"note: the plan was made on another cluster than {old_cluster}",
                              highlight=False)
        old_links = old.links
        if plan.devices is None:
            plan = plan.model_copy(update={"devices": list(old.devices)})
    if plan.devices is None and kept is None:
        raise PdvError("the plan lists no devices, so its ranks cannot be matched to the new "
                       "cluster's; say which old rank each new rank is with --kept 0,1,...")
    mapping = match_devices(plan.devices or [], cluster.devices, _kept(kept))
    started = time.perf_counter()
    res = replan(plan, profiles, cluster, mapping, memory_margin=memory_margin,
                 time_limit_s=time_limit, old_links=old_links)
    seconds = time.perf_counter() - started
    if out is not None:
        artifacts.write(out, res.plan)
    if as_json:
        typer.echo(json.dumps(_summary(res, out, seconds), indent=2, sort_keys=True))
        return
    _print(res, out)


def _print(res: ReplanResult, out: Path | None) -> None:
    console.print("what changed:", highlight=False)
    for line in res.changes:
        console.print(f"  {line}", highlight=False)
    pairs = ", ".join(f"{o}->{n}" for o, n in sorted(res.mapping.items()))
    console.print(f"same devices (old rank -> new rank): {pairs or 'none'}", highlight=False)
    t = new_table("predicted step time", ("plan", "cluster", "step time"), left={"plan",
                                                                                "cluster"})
    dash = "-"
    t.add_row("old", "old", fmt_time(res.old_predicted_s) if res.old_predicted_s else dash)
    t.add_row("old", "new", fmt_time(res.old_on_new_s) if res.old_on_new_s is not None
              else "cannot run (ranks gone)")
    new = res.plan.predicted
    t.add_row("new", "new", fmt_time(new.step_time_s) if new else dash)
    print_table(console, t)
    console.print(f"  new layout: {_layout(res.plan)}", highlight=False)
    c = res.cost
    console.print(
        f"switch: the new ranks hold {fmt_bytes(c.held_bytes)} of model and optimizer state; "
        f"{fmt_bytes(c.moved_bytes)} of it their devices did not hold, "
        f"{fmt_bytes(c.moved_bytes - c.checkpoint_only_bytes)} of that from surviving ranks in "
        f"est. {fmt_time(c.estimate_s)} on the new cluster's links, "
        f"{fmt_bytes(c.checkpoint_only_bytes)} only in the checkpoint (its holders are gone)",
        highlight=False,
    )
    if out is not None:
        console.print(f"wrote {out}", highlight=False)
