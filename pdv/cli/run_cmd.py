"""pdv run: check a plan against this machine, launch torchrun for this host, show the report."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import typer

from pdv import artifacts
from pdv.cli.app import app, console, err_console
from pdv.cli.render import fmt_bytes, fmt_time, render
from pdv.errors import PdvError
from pdv.run.idle import leaves_ranks_idle, renumbered, report_in_plan_ranks, used_ranks
from pdv.run.launch import RunOptions

__all__ = ["run"]


@app.command("run")
def run(
    plan: Path = typer.Argument(..., help="The plan to run (pdv.plan/v1)."),
    steps: int = typer.Option(10, "--steps", min=1, help="Training steps."),
    report: Path | None = typer.Option(None, "--report", help="Write the run report here."),
    model: str | None = typer.Option(
        None, "--model", help="Model factory, when the plan names none (or to override it)."
    ),
    model_arg: list[str] = typer.Option([], "--model-arg", help="Factory argument key=value."),
    split_at: list[str] = typer.Option(
        [], "--split-at", help="With --model returning an nn.Module: start a layer at this "
        "submodule (repeatable)."
    ),
    blocks: list[str] = typer.Option(
        [], "--blocks", help="With --model returning an nn.Module: every child of this "
        "ModuleList is a layer."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the synthetic data."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | sgd."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Steps left out of the timing."),
    data: str | None = typer.Option(
        None, "--data", help="Data hook 'pkg.mod:fn' -> (inputs, targets) of a global batch."
    ),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Checkpoint folder."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0,
                                         help="Save every K steps (0: never)."),
    resume_from: Path | None = typer.Option(
        None, "--resume-from", help="Start from this checkpoint (a --checkpoint-dir, or one of "
        "its step-<k> folders), written under any plan of the same model."
    ),
    slow_margin: float = typer.Option(
        0.5, "--slow-margin", min=0.01, help="A rank is slow at a step when its compute exceeds "
        "its prediction (calibrated on the first timed steps) by more than this fraction."
    ),
    slow_steps: int = typer.Option(3, "--slow-steps", min=1,
                                   help="Steps in a row a rank must be slow to be flagged."),
    elastic: bool = typer.Option(
        False, "--elastic", help="When a rank dies or is slow: re-measure the rest, replan, and "
        "resume from the last checkpoint (needs --checkpoint-dir/--checkpoint-every, --profile)."
    ),
    profile: list[Path] = typer.Option(
        [], "--profile", "-p", help="With --elastic: the model profile(s) to replan with."
    ),
    rank_prefix: str | None = typer.Option(
        None, "--rank-prefix", help="With --elastic: words before each rank's command, "
        "{device} replaced by its device (e.g. 'taskset -c {device}')."
    ),
    max_replans: int = typer.Option(4, "--max-replans", min=1,
                                    help="With --elastic: replans before the run gives up."),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0,
                                     help="torchrun restarts after a failure (resumes from"
                                     " the last checkpoint)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    master_port: int | None = typer.Option(None, "--master-port",
                                           help="Rendezvous port (default: a free one)."),
    print_commands: bool = typer.Option(False, "--print-commands",
                                        help="Print one torchrun command per host and exit."),
    slurm: bool = typer.Option(False, "--slurm", help="Print an sbatch script and exit."),
) -> None:
    """Run a plan under torchrun and report measured against predicted."""
    from pdv.profile.loops import loop_policy
    from pdv.run import launch

    loop_policy()  # a bad PDV_GLOO_LOOPS is one line here, not an error on every rank
    the_plan = artifacts.load_as(plan, "plan")
    opts = launch.RunOptions(
        plan=str(plan), steps=steps, model=model, model_args=tuple(model_arg),
        split_at=tuple(split_at), blocks=tuple(blocks), seed=seed, lr=lr,
        optimizer=optimizer, warmup=warmup, report=str(report) if report else None, data=data,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=checkpoint_every, device=device,
        resume_from=str(resume_from) if resume_from else None, slow_margin=slow_margin,
        slow_steps=slow_steps,
    )
    if elastic:
        _check_elastic(opts, print_commands or slurm, max_restarts, profile)
        _run_elastic(the_plan, opts, profile, rank_prefix, max_replans, report)
        return
    port = master_port or launch.DEFAULT_PORT
    used = used_ranks(the_plan)
    idle = leaves_ranks_idle(the_plan)
    if idle and (print_commands or slurm):
        # The printed commands run elsewhere, later: the renumbered copy must outlive this call.
        runs_path = plan.with_name(f"{plan.stem}.renumbered.json")
        artifacts.write(runs_path, renumbered(the_plan, used))
        err_console.print(
            f"pdv: the plan leaves ranks idle; its ranks {used} run as 0..{len(used) - 1} from "
            f"{runs_path} (reports name those ranks)",
            highlight=False,
        )
        the_plan = artifacts.load_as(runs_path, "plan")
        opts = replace(opts, plan=str(runs_path))
    if print_commands:
        typer.echo(launch.print_commands(the_plan, opts, port, max_restarts), nl=False)
        return
    if slurm:
        typer.echo(launch.sbatch_script(the_plan, opts, port, max_restarts), nl=False)
        return
    from pdv.run.local import check_plan, local_command

    original = the_plan
    with tempfile.TemporaryDirectory(prefix="pdv-run-") as tmp:
        if idle:
            runs_path = Path(tmp) / f"{plan.stem}.renumbered.json"
            artifacts.write(runs_path, renumbered(original, used))
            the_plan = artifacts.load_as(runs_path, "plan")
            opts = replace(opts, plan=str(runs_path), report=str(Path(tmp) / "ranks.json"))
        elif opts.report is None:
            opts = replace(opts, report=str(Path(tmp) / "report.json"))
        check_plan(the_plan, opts)
        argv = local_command(the_plan, opts, dict(os.environ), master_port, max_restarts)
        rc = _launch(argv)
        if rc != 0:
            err_console.print(f"pdv: error: the run failed (torchrun exit code {rc}); the ranks' "
                              "errors are above", highlight=False)
            raise typer.Exit(2 if rc == 2 else 1)
        result = artifacts.load_as(opts.report, "run-report")
        if idle:
            result = report_in_plan_ranks(result, original, used, f"ranks 0..{len(used) - 1}")
            if report:
                artifacts.write(report, result)
    _show(result, report)


def _show(result: artifacts.RunReport, report: Path | None) -> None:
    render(result, console)
    peaks = result.measured.peak_memory_bytes
    predicted = result.predicted.peak_memory_bytes if result.predicted else {}
    for r in sorted(peaks, key=int):
        pred = f"  predicted {fmt_bytes(predicted[r])}" if r in predicted else ""
        console.print(f"rank {r} peak memory {fmt_bytes(peaks[r])}{pred}", highlight=False)
    cpu, compute = result.measured.cpu_s or {}, result.measured.compute_s or {}
    for r in sorted(cpu, key=int):
        ops = f" (compute {fmt_time(compute[r])})" if r in compute else ""
        console.print(f"rank {r} process CPU {fmt_time(cpu[r])} per step{ops}", highlight=False)
    if report:
        console.print(f"report written to {report}", highlight=False)


def _check_elastic(opts: RunOptions, printing: bool, max_restarts: int,
                   profile: list[Path]) -> None:
    if printing:
        raise PdvError("--elastic runs the plan here (it relaunches ranks itself); drop "
                       "--print-commands/--slurm")
    if max_restarts:
        raise PdvError("--elastic replaces --max-restarts (it restarts on a new plan); drop one")
    if not opts.checkpoint_dir or not opts.checkpoint_every:
        raise PdvError("--elastic needs --checkpoint-dir D and --checkpoint-every K: a new plan "
                       "resumes from the last checkpoint")
    if not profile:
        raise PdvError("--elastic needs the model profile(s) to replan with: --profile P.json")


def _run_elastic(plan: artifacts.Plan, opts: RunOptions, profile: list[Path],
                 rank_prefix: str | None, max_replans: int, report: Path | None) -> None:
    from pdv.plan.search import check_plan_dtype
    from pdv.run.elastic import ElasticOptions, run_elastic
    from pdv.run.launch import host_slots

    if len(host_slots(plan)) > 1:
        raise PdvError("--elastic runs every rank on this host; this plan spans several hosts")
    profiles = artifacts.load_profiles(profile)
    check_plan_dtype(plan, profiles)  # before any rank starts: a replan would refuse later
    eopts = ElasticOptions(profiles=profiles, rank_prefix=rank_prefix, max_replans=max_replans)

    def say(msg: str) -> None:
        err_console.print(f"pdv: {msg}", highlight=False)

    result = run_elastic(plan, opts, eopts, say)
    if report is not None:
        artifacts.write(report, result)
    _show(result, report)


def _launch(argv: list[str]) -> int:
    """Run torchrun in its own session and leave no process of it behind, whatever happens."""
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise
    finally:
        _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
