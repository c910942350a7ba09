"""pdv simulate: replay a plan's schedule on the measured devices and links, event by event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, ModelProfile, Plan
from pdv.cli.app import app, console, err_console
from pdv.cli.render import fmt_bytes, fmt_time, new_table, print_table
from pdv.cost.simulate import Simulation, simulate, to_predicted
from pdv.cost.trace import chrome_trace, ranks_label, text_timeline
from pdv.errors import PdvError
from pdv.plan.search import check_plan_dtype

_MAX_RANK_ROWS = 32
_MAX_TIMELINE_ROWS = 32


def _summary(sim: Simulation, plan: Plan, cluster: ClusterArtifact) -> dict[str, Any]:
    return {
        "schedule": sim.schedule,
        "step_time_s": sim.step_time_s,
        "bubble_fraction": sim.bubble_fraction,
        "stages": [
            {"index": i, "layers": list(st.layers), "ranks": st.ranks, **pred.model_dump()}
            for i, (st, pred) in enumerate(zip(plan.stages, sim.stages, strict=True))
        ],
        "peak_memory_bytes": {str(r): int(b) for r, b in sim.peak_memory_bytes.items()},
        "memory_bytes": {str(r): cluster.devices[r].memory_bytes for r in sim.peak_memory_bytes},
        "notes": list(sim.notes),
    }


def _render(sim: Simulation, plan: Plan, cluster: ClusterArtifact, out: Console) -> None:
    out.print(
        f"[bold]{sim.schedule}[/]  {len(plan.stages)} stages  mbs {plan.micro_batch_size} x "
        f"{plan.num_micro_batches} micro-batches = {plan.global_batch_size}"
    )
    out.print(
        f"step time [bold]{fmt_time(sim.step_time_s)}[/]  bubble {sim.bubble_fraction:.1%}",
        highlight=False,
    )
    t = new_table(
        "per stage, one step",
        ("stage", "layers", "ranks", "dp×tp", "fwd/mb", "bwd/mb", "compute", "p2p", "collective",
         "peak memory"),  # fmt: skip
        left={"layers", "ranks"},
    )
    for i, (st, pred, c) in enumerate(zip(plan.stages, sim.stages, sim.costs, strict=True)):
        t.add_row(
            str(i),
            f"[{st.layers[0]}, {st.layers[1]})",
            ranks_label(st.ranks),
            f"{st.dp}×{st.tp}",
            fmt_time(c.fwd_s),
            fmt_time(c.bwd_s),
            fmt_time(pred.compute_s),
            fmt_time(pred.p2p_s),
            fmt_time(pred.collective_s),
            fmt_bytes(pred.peak_memory_bytes),
        )
    print_table(out, t)
    ranks = list(sim.peak_memory_bytes)
    title = "peak memory per rank"
    if len(ranks) > _MAX_RANK_ROWS:
        # A large cluster: the fullest ranks are the ones a reader needs; --json has them all.
        ranks.sort(key=lambda r: -sim.peak_memory_bytes[r] / cluster.devices[r].memory_bytes)
        ranks = sorted(ranks[:_MAX_RANK_ROWS])
        title += f" (the {_MAX_RANK_ROWS} fullest of {len(sim.peak_memory_bytes)}; --json: all)"
    m = new_table(
        title, ("rank", "host", "kind", "peak", "capacity", "use"), left={"rank", "host", "kind"}
    )
    for r in ranks:
        peak = sim.peak_memory_bytes[r]
        d = cluster.devices[r]
        use = peak / d.memory_bytes
        style = "red" if use > 1 else ""
        m.add_row(str(r), d.host, d.kind, fmt_bytes(peak), fmt_bytes(d.memory_bytes),
                  f"[{style}]{use:.0%}[/]" if style else f"{use:.0%}")  # fmt: skip
    print_table(out, m)
    out.print("timeline (F forward, B backward, I/W input/weight grad, ~ grad sync, . idle)")
    lines = text_timeline(sim, width=max(20, out.width - 22))
    for line in lines[:_MAX_TIMELINE_ROWS]:
        out.print(line, markup=False, highlight=False)
    if len(lines) > _MAX_TIMELINE_ROWS:
        out.print(f"... {len(lines) - _MAX_TIMELINE_ROWS} more rank groups (see --trace)")
    for note in sim.notes:
        out.print(f"[dim]note: {note}[/]")


def _inputs(profiles: dict[str, ModelProfile], cluster: ClusterArtifact) -> dict[str, str]:
    # The same names pdv plan records, so a re-simulated plan says what its prediction used.
    out = {f"profile:{k}": artifacts.digest(p) for k, p in sorted(profiles.items())}
    out["cluster"] = artifacts.digest(cluster)
    return out


def _with_prediction(plan: Plan, sim: Simulation, inputs: dict[str, str]) -> Plan:
    notes = list(plan.provenance.notes)
    for note in ("predicted by pdv simulate on the cluster's links", *sim.notes):
        if note not in notes:
            notes.append(note)
    prov = plan.provenance.model_copy(
        update={"inputs": {**plan.provenance.inputs, **inputs}, "notes": notes}
    )
    return plan.model_copy(update={"predicted": to_predicted(sim), "provenance": prov})


def _write_trace(path: Path, trace: dict[str, Any]) -> None:
    # Same atomic pattern as artifacts.write: a reader never sees half a trace.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(trace) + "\n")
    tmp.replace(path)


@app.command("simulate")
def simulate_command(
    plan_path: Path = typer.Argument(
        ...,
        metavar="PLAN",
        help="A plan (only its contract fields are needed; hand-written plans are fine).",
    ),  # fmt: skip
    profile: list[Path] = typer.Option(
        [], "--profile", "-p", help="Model profile, one per device kind of the cluster."
    ),
    cluster_path: Path | None = typer.Option(
        None, "--cluster", "-c", help="Cluster artifact (measured or declared)."
    ),
    trace: Path | None = typer.Option(
        None, "--trace", help="Write a Chrome/Perfetto trace (one process per rank)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the plan with `predicted` filled in."
    ),
) -> None:
    """Simulate one training step of a plan: step time, bubble, breakdown, memory, trace."""
    plan = artifacts.load_as(plan_path, "plan")
    if not profile:
        raise PdvError("no model profile: pass --profile PROFILE.json (one per device kind)")
    if cluster_path is None:
        raise PdvError("no cluster: pass --cluster CLUSTER.json")
    profiles = artifacts.load_profiles(profile)
    cluster = artifacts.load_as(cluster_path, "cluster")
    check_plan_dtype(plan, profiles)
    sim = simulate(plan, profiles, cluster)
    inputs = _inputs(profiles, cluster)
    differ = sorted(k for k, v in plan.provenance.inputs.items() if inputs.get(k, v) != v)
    if differ and not as_json:
        err_console.print(
            f"note: the plan was made from other {', '.join(differ)} artifacts than these "
            f"(a what-if simulation)",
            highlight=False,
        )
    if trace is not None:
        _write_trace(trace, chrome_trace(sim, plan))
    if output is not None:
        artifacts.write(output, _with_prediction(plan, sim, inputs))
    if as_json:
        typer.echo(json.dumps(_summary(sim, plan, cluster), indent=2, sort_keys=True))
        return
    _render(sim, plan, cluster, console)
    if trace is not None:
        console.print(f"trace written to {trace} (open in ui.perfetto.dev)")
    if output is not None:
        console.print(f"plan with predictions written to {output}")
