"""Rich rendering of artifacts, and the human units that appear only at the CLI edge."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pdv.artifacts import ClusterArtifact, ModelProfile, Plan, RunReport

__all__ = ["fmt_bytes", "fmt_time", "fmt_rate", "new_table", "print_table", "render", "RENDERERS"]

_UNBOUNDED = 1 << 16


def new_table(title: str, columns: Sequence[str], *, left: Collection[str] = ()) -> Table:
    """A compact table whose cells never wrap or get cut; print it with `print_table`."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    return t


def print_table(console: Console, table: Table) -> None:
    """Print a table whole: as is where it fits, at full width when piped, else a record per row.

    Rich would squeeze a wide table into the console's width with ellipses in headers and
    numbers; a report is useless that way. Piped output (a file, grep) keeps one line per row.
    """
    wide = console.options.update(max_width=_UNBOUNDED)
    natural = console.measure(table, options=wide).maximum
    if natural <= console.width:
        console.print(table)
    elif not console.is_terminal:
        # Console.print clamps its width= to the console's own, so widen the console itself
        width = console.width
        console.width = natural
        try:
            console.print(table, crop=False)
        finally:
            console.width = width
    else:
        _print_records(console, table)


def _print_records(console: Console, table: Table) -> None:
    # One block per row: "header  value" lines, which fit any terminal wider than a header.
    if table.title:
        console.print(table.title, style="bold")
    columns = table.columns
    heads = [str(c.header) for c in columns]
    cells = [list(c.cells) for c in columns]
    for r in range(table.row_count):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(overflow="fold")
        for head, col in zip(heads[1:], cells[1:], strict=True):
            grid.add_row(head, col[r])
        first = cells[0][r]
        label = first.plain if isinstance(first, Text) else str(first)
        console.print(f"── {heads[0]} {label}".rstrip(), highlight=False, markup=False)
        console.print(grid)


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_time(s: float) -> str:
    """Seconds in the unit that keeps 3 significant digits: 12.3 ms."""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_rate(bps: float) -> str:
    """Bytes per second as bits per second, as links are sold: 94.1 Mbit/s."""
    bits = bps * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def _provenance(a: Any, console: Console) -> None:
    p = a.provenance
    console.print(f"[bold]{a.schema_}[/]  method: {p.method}  pdv {p.pdv_version}")
    for note in p.notes:
        console.print(f"  [dim]{note}[/]")


def _model_profile(a: ModelProfile, console: Console) -> None:
    _provenance(a, console)
    console.print(
        f"model {a.model.spec} {a.model.kwargs}  device {a.device.kind} ({a.device.name})  "
        f"mbs {a.micro_batch_sizes}  tp {a.tp_degrees}  ref mbs {a.reference_micro_batch_size}"
    )
    t = new_table(
        "layers (reference micro-batch, TP 1)",
        ("#", "name", "fwd", "bwd", "opt step", "params", "activations", "output", "fit r²"),
        left={"name"},
    )
    for i, layer in enumerate(a.layers):
        fit = layer.fwd_fit.get("1")
        t.add_row(
            str(i),
            layer.name,
            fmt_time(layer.fwd_s),
            fmt_time(layer.bwd_s),
            "-" if layer.optimizer_s is None else fmt_time(layer.optimizer_s),
            fmt_bytes(layer.param_bytes),
            fmt_bytes(layer.activation_bytes),
            fmt_bytes(layer.output_bytes),
            f"{fit.r2:.3f}" if fit else "-",
        )
    print_table(console, t)
    total_f = sum(x.fwd_s for x in a.layers)
    total_b = sum(x.bwd_s for x in a.layers)
    steps = [x.optimizer_s for x in a.layers if x.optimizer_s is not None]
    console.print(
        f"total fwd {fmt_time(total_f)}  bwd {fmt_time(total_b)}  "
        + (f"optimizer step {fmt_time(sum(steps))}  " if steps else "")
        + f"params {fmt_bytes(a.model_param_bytes())}"
    )
    for s in a.shared:
        console.print(f"shared by layers {', '.join(map(str, s.layers))}: "
                      f"{fmt_bytes(s.param_bytes)} of parameters, counted once in the total "
                      "(a stage holding several of these layers holds one copy)")
    w = a.whole_model
    if w is not None and w.fwd_bwd_s > 0:
        console.print(f"whole model fwd+bwd {fmt_time(w.fwd_bwd_s)} (IQR "
                      f"{fmt_time(w.fwd_bwd_spread_s)}) at micro-batch {w.micro_batch_size}; "
                      f"sum of layers / whole = {(total_f + total_b) / w.fwd_bwd_s:.2f}")


def _cluster(a: ClusterArtifact, console: Console) -> None:
    _provenance(a, console)
    t = new_table(
        "devices",
        ("rank", "host", "kind", "name", "memory", "matmul"),
        left={"host", "kind", "name"},
    )
    for d in a.devices:
        flops = f"{d.matmul_flops / 1e9:.1f} GFLOP/s" if d.matmul_flops else "-"
        t.add_row(str(d.rank), d.host, d.kind, d.name or "-", fmt_bytes(d.memory_bytes), flops)
    print_table(console, t)
    n = len(a.devices)
    if n > 16:
        console.print(f"links: {n}x{n} matrix (too large to print; see the JSON)")
        return
    for title, m, fmt in (
        ("bandwidth row→col", a.links.bandwidth_Bps, fmt_rate),
        ("latency row→col", a.links.latency_s, fmt_time),
    ):
        t = new_table(title, ["", *(str(j) for j in range(n))])
        for i in range(n):
            t.add_row(str(i), *("-" if i == j else fmt(m[i][j]) for j in range(n)))
        print_table(console, t)


def _ranks_text(ranks: list[int]) -> str:
    # Runs of consecutive ranks as a-b, so a 64-rank stage fits in a cell.
    if len(ranks) <= 4:
        return str(ranks)
    runs, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None], strict=True):
        if cur != prev + 1 if cur is not None else True:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return f"{len(ranks)}: " + ",".join(runs)


def _plan(a: Plan, console: Console) -> None:
    _provenance(a, console)
    p = a.planner
    gap = "-" if p.optimality_gap is None else f"{p.optimality_gap:.2%}"
    console.print(
        f"planner {p.name}  status {p.status}  gap {gap}  candidates {p.candidates}",
        highlight=False,
    )
    for note in p.notes:
        console.print(f"  {note}", highlight=False)
    cols = ["stage", "layers", "ranks", "devices", "dp", "tp", "fsdp", "recompute"]
    if a.predicted and a.predicted.stages:
        cols += ["compute", "p2p", "collective", "peak mem"]
    t = new_table(
        f"plan ({a.planner.name}, {a.schedule}, mbs {a.micro_batch_size} x "
        f"{a.num_micro_batches} = {a.global_batch_size}, {a.dtype})",
        cols,
        left={"layers", "ranks", "devices", "fsdp", "recompute"},
    )
    by_rank = {d.rank: d for d in a.devices or ()}
    for i, s in enumerate(a.stages):
        devices = "-"
        listed = [by_rank[r] for r in s.ranks if r in by_rank]
        if listed:
            kinds: dict[str, int] = {}
            for d in listed:
                kinds[d.kind] = kinds.get(d.kind, 0) + 1
            hosts = sorted({d.host for d in listed})
            where = hosts[0] if len(hosts) == 1 else f"{len(hosts)} hosts"
            devices = ", ".join(f"{n}x {k}" for k, n in kinds.items()) + f" on {where}"
        row = [
            str(i),
            f"[{s.layers[0]}, {s.layers[1]})",
            _ranks_text(s.ranks),
            devices,
            str(s.dp),
            str(s.tp),
            str(s.fsdp),
            str(s.recompute) + (" (per layer)" if s.layer_sharding else ""),
        ]
        if a.predicted and len(a.predicted.stages) == len(a.stages):
            sp = a.predicted.stages[i]
            row += [
                fmt_time(sp.compute_s),
                fmt_time(sp.p2p_s),
                fmt_time(sp.collective_s),
                fmt_bytes(sp.peak_memory_bytes),
            ]
        t.add_row(*row)
    print_table(console, t)
    if not a.predicted:
        console.print("no prediction (run pdv simulate to fill it in)")
        return
    bubble = a.predicted.bubble_fraction
    console.print(
        f"predicted step time {fmt_time(a.predicted.step_time_s)}"
        + (f"  bubble {bubble:.1%}" if bubble is not None else "")
    )
    # A text timeline of the step: each stage's busy time (# compute, = p2p, ~ collectives)
    # against the step time; the rest of the row is the stage's idle (bubble) time.
    width = 60
    step = a.predicted.step_time_s
    for i, sp in enumerate(a.predicted.stages):
        cells = [
            ("#", sp.compute_s),
            ("=", sp.p2p_s),
            ("~", sp.collective_s),
        ]
        bar = "".join(ch * round(width * v / step) for ch, v in cells if step > 0)[:width]
        console.print(f"  stage {i:<3d}|{bar.ljust(width, '.')}|", highlight=False)
    console.print("  # compute  = p2p  ~ collectives  . idle", highlight=False)


def _run_report(a: RunReport, console: Console) -> None:
    _provenance(a, console)
    m = a.measured
    pred = a.predicted.step_time_s if a.predicted else None
    line = f"measured step {fmt_time(m.step_time_s)} (IQR {fmt_time(m.step_time_spread_s)})"
    if pred:
        line += (
            f"  predicted {fmt_time(pred)}  error {abs(pred - m.step_time_s) / m.step_time_s:.1%}"
        )
    console.print(line)
    console.print(f"loss {[round(x, 5) for x in a.loss]}")
    for slow in a.slow_ranks:
        console.print(f"flagged: {slow.reason}", highlight=False)
    for k, r in enumerate(a.replans, 1):
        def _t(v: float | None) -> str:
            return fmt_time(v) if v is not None else "-"

        console.print(
            f"replan {k} at {r.detected_at_s:.1f}s (after step {r.last_step}, resumed from "
            f"{r.resumed_from_step}): {r.reason}\n  devices {r.devices_before} -> "
            f"{r.devices_after}; predicted {_t(r.old_predicted_step_s)} -> "
            f"{_t(r.new_predicted_step_s)}, measured {_t(r.old_measured_step_s)} -> "
            f"{_t(r.new_measured_step_s)}; state moved {fmt_bytes(r.state_moved_bytes)} "
            f"(est. {fmt_time(r.switch_estimate_s)}); re-measure {r.remeasure_s:.1f}s, "
            f"search {r.replan_s:.1f}s; plans {r.old_plan_digest[7:19]} -> "
            f"{r.new_plan_digest[7:19]}",
            highlight=False,
        )


RENDERERS: dict[type, Callable[[Any, Console], None]] = {
    ModelProfile: _model_profile,
    ClusterArtifact: _cluster,
    Plan: _plan,
    RunReport: _run_report,
}


def render(artifact: Any, console: Console) -> None:
    """Print an artifact as rich tables."""
    RENDERERS[type(artifact)](artifact, console)
