"""pdv profile cluster (measure devices and links) and pdv cluster declare (describe them)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdv import artifacts
from pdv.cli.app import cluster_app, console, profile_app
from pdv.cli.render import fmt_bytes, fmt_rate, fmt_time, render
from pdv.cluster_spec import declare_cluster, load_spec, parse_bytes
from pdv.cost.compute import unsteady_note
from pdv.errors import PdvError

# Above this many ranks the declared artifact is written unindented (two N×N matrices).
_COMPACT_ABOVE = 64


def _sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    sizes = tuple(parse_bytes(s.strip(), "--sizes") for s in text.split(",") if s.strip())
    if not sizes or any(s < 1 for s in sizes):
        raise PdvError(f"--sizes: give positive message sizes like 4KiB,64KiB,1MiB (got {text!r})")
    return tuple(sorted(set(sizes)))


@profile_app.command("cluster")
def profile_cluster(
    out: Path = typer.Option(..., "-o", "--out", help="Where rank 0 writes the cluster JSON."),
    nproc_per_node: int | None = typer.Option(
        None, "--nproc-per-node", min=1,
        help="Start this many ranks on this host under torchrun (else run as one torchrun rank).",
    ),
    timeout: float = typer.Option(
        120.0, "--timeout", min=1,
        help="Seconds a rank may take to join, or all ranks may go without progress, "
        "before the command names the stuck rank and ends (exit 2).",
    ),
    sizes: str | None = typer.Option(
        None, "--sizes", help="Message sizes of the sweep, e.g. 4KiB,64KiB,1MiB,4MiB."
    ),
    max_size: str = typer.Option(
        "64MiB", "--max-size",
        help="Fast links: the sweep grows x4 past --sizes while a message takes < 10 ms, "
        "up to this size. Set it to the largest of --sizes to keep the sweep fixed.",
    ),
    iters: int = typer.Option(5, "--iters", min=1, help="Timed messages per size (median)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed messages per size first."),
    backend: str = typer.Option(
        "auto", "--backend", help="auto (nccl on CUDA, else gloo), gloo, or nccl."
    ),
    collectives: bool = typer.Option(
        True, "--collectives/--no-collectives",
        help="Also time a 2-rank all-reduce of every pair of ranks (collective α/β, which the "
        "cost model prices gradient sync and TP with); --no-collectives skips it.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the artifact as JSON when done."),
) -> None:
    """Measure every rank's device and the α/β of every ordered pair of ranks."""
    from pdv.profile.loops import loop_policy
    from pdv.profile.network import DEFAULT_SIZES, SweepConfig

    loop_policy()  # a bad PDV_GLOO_LOOPS is one line here, not an error on every rank
    cfg = SweepConfig(sizes=_sizes(sizes) or DEFAULT_SIZES, iters=iters, warmup=warmup,
                      max_size=parse_bytes(max_size, "--max-size"))
    if nproc_per_node is None:
        _run_rank(out, cfg, timeout, backend, as_json, collectives)
        return
    rank_args = ["profile", "cluster", "-o", str(out.resolve()), "--timeout", f"{timeout:g}",
                 "--sizes", ",".join(map(str, cfg.sizes)), "--max-size", str(cfg.max_size),
                 "--iters", str(iters), "--warmup", str(warmup), "--backend", backend,
                 "--collectives" if collectives else "--no-collectives"]
    _launch(nproc_per_node, rank_args, timeout, collectives)
    _summary(artifacts.load_as(out, "cluster"), out, as_json)


def _run_rank(
    out: Path, cfg: Any, timeout: float, backend: str, as_json: bool, collectives: bool
) -> None:
    """One torchrun rank: measure; rank 0 prints the summary unless a launcher watches."""
    from pdv.profile.cluster import LinkFailure, profile_cluster_rank, rank_env
    from pdv.profile.launch_local import heartbeat_from_env

    env = rank_env()
    if env is None:
        raise PdvError("pdv profile cluster runs under torchrun (RANK/WORLD_SIZE unset): use "
                       "`torchrun ... pdv profile cluster -o c.json` or pass --nproc-per-node N")
    beat = heartbeat_from_env(env[0])
    try:
        artifact = profile_cluster_rank(out, cfg, timeout, backend, beat, collectives)
    except PdvError as exc:
        if beat:
            # A transfer that failed without a known peer lets the launcher name the rank
            # that vanished (a socket reset from a dead peer does not say which one it was).
            unknown = isinstance(exc, LinkFailure) and exc.peer is None
            beat({"phase": "error", "error": str(exc), "peer_unknown": unknown})
        raise
    if artifact is not None and beat is None:
        _summary(artifact, out, as_json)
    # The measurement is written and every rank is past the last barrier: leave without
    # gloo's teardown, which was seen to abort a rank at this point (pdv.profile.cluster).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(nproc: int, rank_args: list[str], timeout: float, collectives: bool) -> None:
    from pdv.profile.cluster import describe_event
    from pdv.profile.launch_local import launch_local
    from pdv.profile.network import tournament_rounds

    rounds = len(tournament_rounds(nproc))
    total = 2 * rounds if collectives else rounds  # the all-reduce tournament follows the p2p one
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        joined = bar.add_task("ranks joined", total=nproc)
        done = bar.add_task("tournament rounds", total=total)

        def finished(e: dict[str, Any]) -> int:
            phase = str(e.get("phase", ""))
            if phase in ("gathered", "written"):
                return total
            if "round" not in e:
                return 0
            base = rounds if phase.startswith("all-reduce") else 0
            return base + e["round"] + (1 if phase.endswith("round-done") else 0)

        def show(states: dict[int, dict[str, Any]]) -> None:
            events = [s["event"] for s in states.values()]
            bar.update(joined, completed=sum(e.get("phase") != "joining" for e in events))
            counts = [finished(e) for e in events]
            bar.update(done, completed=min(counts) if len(counts) == nproc else 0)

        launch_local(nproc, rank_args, timeout, show, describe_event)


def _summary(artifact: Any, out: Path, as_json: bool) -> None:
    if as_json:
        typer.echo(artifacts.dumps(artifact), nl=False)
        return
    render(artifact, console)
    n = len(artifact.devices)
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    if off:
        bws = [artifact.links.bandwidth_Bps[i][j] for i, j in off]
        lats = [artifact.links.latency_s[i][j] for i, j in off]
        r2 = artifact.measurement.get("r2_min")
        console.print(
            f"{len(off)} ordered pairs: bandwidth {fmt_rate(min(bws))} .. {fmt_rate(max(bws))}, "
            f"latency {fmt_time(min(lats))} .. {fmt_time(max(lats))}"
            + (f", fit r² >= {r2:.3f}" if r2 is not None else ""),
            highlight=False,
        )
        links = artifact.links
        coll_bw, coll_lat = links.collective_bandwidth_Bps, links.collective_latency_s
        if coll_bw is not None and coll_lat is not None:
            pairs = [(i, j) for i, j in off if i < j]
            cbw = [coll_bw[i][j] for i, j in pairs]
            clat = [coll_lat[i][j] for i, j in pairs]
            r2c = artifact.measurement.get("collective", {}).get("r2_min")
            console.print(
                f"{len(pairs)} pairs' all-reduce: bandwidth {fmt_rate(min(cbw))} .. "
                f"{fmt_rate(max(cbw))}, latency {fmt_time(min(clat))} .. {fmt_time(max(clat))}"
                + (f", fit r² >= {r2c:.3f}" if r2c is not None else ""),
                highlight=False,
            )
            for kind, what in (("gather", "all-gather"), ("scatter", "reduce-scatter")):
                kbw = getattr(links, f"{kind}_bandwidth_Bps")
                if kbw is not None:
                    vals = [kbw[i][j] for i, j in pairs]
                    console.print(f"{len(pairs)} pairs' {what} (FSDP): bandwidth "
                                  f"{fmt_rate(min(vals))} .. {fmt_rate(max(vals))}",
                                  highlight=False)
        for ring in links.host_rings or ():
            host = artifact.devices[ring.ranks[0]].host
            console.print(f"host {host}: all-reduce over its {len(ring.ranks)} ranks as one ring: "
                          f"bandwidth {fmt_rate(ring.bandwidth_Bps)}, latency "
                          f"{fmt_time(ring.alpha_s)} per ring step", highlight=False)
    _after_compute_summary(artifact)
    unsteady = unsteady_note(artifact)
    if unsteady:
        console.print(f"[yellow]note:[/] {unsteady}", highlight=False)
    runtime = [d.runtime_bytes for d in artifact.devices if d.runtime_bytes is not None]
    if runtime:
        console.print(f"rank runtime memory (before any model): {fmt_bytes(min(runtime))} .. "
                      f"{fmt_bytes(max(runtime))}", highlight=False)
    console.print(f"wrote {out}", highlight=False)


def _after_compute_summary(artifact: Any) -> None:
    """One line on what a sync and a message pay after compute, where they were probed."""
    n = len(artifact.devices)
    sync = [d.overheads.sync_after_compute_s for d in artifact.devices
            if d.overheads is not None and d.overheads.sync_after_compute_s is not None]
    ex = artifact.links.exchange_latency_s
    parts = []
    if sync:
        line = f"gradient sync +{fmt_time(min(sync))} .. +{fmt_time(max(sync))} per step"
        grows = [d.overheads.sync_after_long_compute for d in artifact.devices
                 if d.overheads is not None and d.overheads.sync_after_long_compute is not None]
        if grows:
            line += (f" after {fmt_time(min(g.burst_s for g in grows))} of compute, "
                     f"+{fmt_time(min(g.long_excess_s for g in grows))} .. "
                     f"+{fmt_time(max(g.long_excess_s for g in grows))} after "
                     f"{fmt_time(max(g.long_burst_s for g in grows))}")
        parts.append(line)
    if ex is not None and n > 1:
        vals = [ex[i][j] for i in range(n) for j in range(n) if i != j]
        line = f"pipeline message +{fmt_time(min(vals))} .. +{fmt_time(max(vals))}"
        quiet = artifact.links.exchange_latency_alone_s
        if quiet is not None:
            q = [quiet[i][j] for i in range(n) for j in range(n) if i != j]
            line += (f" with the host's ranks all at work, +{fmt_time(min(q))} .. "
                     f"+{fmt_time(max(q))} with the others idle")
        parts.append(line)
    if parts:
        console.print("after compute, beyond the sweeps' prices: " + "; ".join(parts),
                      highlight=False)


@cluster_app.command("declare")
def declare(
    spec: Path = typer.Argument(..., help="Cluster description (JSON; TOML on Python >= 3.11)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the cluster JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of tables."),
) -> None:
    """Make a cluster artifact (provenance 'declared') from a JSON or TOML spec of hosts, device
    kinds and link classes."""
    start = time.perf_counter()
    data, raw = load_spec(spec)
    artifact = declare_cluster(data, str(spec), raw)
    n = len(artifact.devices)
    artifacts.write(out, artifact, compact=n > _COMPACT_ABOVE)
    if as_json:
        kinds: dict[str, int] = {}
        for d in artifact.devices:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        typer.echo(json.dumps({"out": str(out), "ranks": n,
                               "hosts": len({d.host for d in artifact.devices}),
                               "kinds": kinds, "seconds": round(time.perf_counter() - start, 3)}))
        return
    if n <= 16:
        render(artifact, console)
    else:
        hosts = len({d.host for d in artifact.devices})
        console.print(f"{n} ranks on {hosts} hosts; kinds: "
                      + ", ".join(sorted({d.kind for d in artifact.devices})), highlight=False)
    console.print(f"wrote {out}", highlight=False)
