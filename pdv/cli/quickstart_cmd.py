"""pdv quickstart: the whole loop on this machine — profile, plan, run, compare.

Each step is the real pdv command run as a child process, exactly as a user would type it, so
the quickstart exercises the same code paths and prints the commands to repeat any step.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, ModelProfile
from pdv.cli.app import app, console
from pdv.cli.render import fmt_bytes, fmt_time, new_table, print_table
from pdv.cost.compute import spell_notes, unsteady_note
from pdv.errors import PdvError


def _default_ranks() -> int:
    return max(2, min(4, os.cpu_count() or 2))


def _step(title: str, args: list[str], env: dict[str, str]) -> None:
    console.print(f"[bold]▶ {title}[/]  [dim]pdv {shlex.join(args)}[/]", highlight=False)
    done = subprocess.run([sys.executable, "-m", "pdv", *args], env=env)
    if done.returncode != 0:
        raise PdvError(
            f"quickstart step '{title}' failed (exit {done.returncode}); "
            f"rerun it alone: pdv {shlex.join(args)}"
        )


def reading_notes(cluster: ClusterArtifact, profile: ModelProfile) -> list[str]:
    """What the user should know where the prediction is read: the cluster file was taken while
    the machine's speed moved, or one of the two files in a slow spell the other missed."""
    unsteady = unsteady_note(cluster)
    return ([unsteady] if unsteady else []) + spell_notes({profile.device.kind: profile}, cluster)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("pdv-out"), "--out", "-o", help="Folder for every artifact."),
    model: str = typer.Option(
        "gpt_tiny", help="Model: a sample name, file.py:factory or pkg.mod:factory."
    ),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Factory argument key=value."),
    nproc: int = typer.Option(
        _default_ranks(),
        "--nproc-per-node",
        min=2,
        help="CPU ranks to profile, plan for and run on.",
    ),
    global_batch: int = typer.Option(8, "--global-batch", min=1, help="Samples per step."),
    steps: int = typer.Option(6, "--steps", min=2, help="Training steps of the run."),
) -> None:
    """Profile this machine's CPU ranks and a sample GPT, plan, run, print predicted vs measured."""
    from pdv.models import load_factory

    load_factory(model)  # a bad model spec fails here, before minutes of link measurement
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    margs = [a for pair in model_arg for a in ("--model-arg", pair)]
    cluster, profile = out / "cluster.json", out / "profile.json"
    plan, report = out / "plan.json", out / "report.json"
    _step(
        "measure links and devices",
        ["profile", "cluster", "--nproc-per-node", str(nproc), "-o", str(cluster)],
        env,
    )
    _step(
        "measure layers",
        [
            "profile",
            "model",
            model,
            *margs,
            "--device",
            "cpu",
            "--micro-batch-sizes",
            "1,2,4",
            "--tp-degrees",
            "1,2",
            "-o",
            str(profile),
        ],
        env,
    )
    _step(
        "plan",
        [
            "plan",
            str(profile),
            "--cluster",
            str(cluster),
            "--global-batch",
            str(global_batch),
            "-o",
            str(plan),
        ],
        env,
    )
    _step("run the plan", ["run", str(plan), "--steps", str(steps), "--report", str(report)], env)

    result = artifacts.load_as(report, "run-report")
    measured = result.measured
    table = new_table(
        f"predicted vs measured ({model}, {nproc} CPU ranks)",
        ("", "predicted", "measured", "error"),
    )
    if result.predicted is not None:
        pred = result.predicted.step_time_s
        err = abs(pred - measured.step_time_s) / measured.step_time_s
        table.add_row("step time", fmt_time(pred), fmt_time(measured.step_time_s), f"{err:.0%}")
        for rank, used in sorted(measured.peak_memory_bytes.items(), key=lambda kv: int(kv[0])):
            want = result.predicted.peak_memory_bytes.get(rank)
            err_m = f"{abs(want - used) / used:.0%}" if want and used else "-"
            table.add_row(
                f"peak memory rank {rank}", fmt_bytes(want) if want else "-", fmt_bytes(used), err_m
            )
    print_table(console, table)
    # The unsteady note was said by the cluster step too, but this is where the prediction is
    # read; a profile taken in a spell prices its layers slow and the error above carries it.
    for note in reading_notes(artifacts.load_as(cluster, "cluster"),
                              artifacts.load_as(profile, "model-profile")):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(
        f"loss {result.loss[0]:.4f} → {result.loss[-1]:.4f}; memory measured as "
        f"{measured.memory_method}"
    )
    console.print(f"artifacts in {out}/: cluster.json profile.json plan.json report.json")
