"""pdv profile model: per-layer time and memory of a model on this device (or estimated)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pdv.cli.app import console, err_console, profile_app
from pdv.cli.render import render


@profile_app.command("model")
def profile_model_cmd(
    model: str = typer.Argument(
        ..., help="Model: 'path/to/file.py:factory', 'package.module:factory', a sample's name "
        "(gpt_tiny) or a HuggingFace family built from a config (hf:llama, hf:gpt2)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the profile JSON."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:index]."),
    micro_batch_sizes: str = typer.Option(
        "1,2,4", "--micro-batch-sizes", help="Comma-separated micro-batch sizes; the smallest "
        "is the reference point."
    ),
    tp_degrees: str = typer.Option(
        "1", "--tp-degrees", help="Comma-separated TP degrees, timed at the local shard shapes "
        "(needs a model with a TP plan); 1 is always included."
    ),
    model_arg: list[str] = typer.Option(
        [], "--model-arg", help="Factory keyword argument key=value (repeatable)."
    ),
    split_at: list[str] = typer.Option(
        [], "--split-at", help="For a factory returning an nn.Module: start a layer at this "
        "submodule, e.g. layers.4 (repeatable)."
    ),
    blocks: list[str] = typer.Option(
        [], "--blocks", help="For a factory returning an nn.Module: every child of this "
        "ModuleList is a layer, e.g. model.layers (repeatable)."
    ),
    estimate: bool = typer.Option(
        False, "--estimate", help="Do not run the layers: count FLOPs and bytes on the meta "
        "device and price them at this device's measured rates (each GEMM shape timed), or "
        "at a declared device's (marked 'estimated')."
    ),
    device_flops: float | None = typer.Option(
        None, "--device-flops", help="With --estimate: FLOP/s of a device not at hand, "
        "instead of measuring this one."
    ),
    device_bandwidth: float | None = typer.Option(
        None, "--device-bandwidth", help="With --estimate: memory bandwidth (bytes/s) of a "
        "device not at hand."
    ),
    device_spec: Path | None = typer.Option(
        None, "--device-spec", help="With --estimate: a declared device (JSON: datasheet peaks, "
        "achievable GEMM and memory efficiency, GEMM tiling, a source for each; see devices/). "
        "GEMMs are priced by shape at those rates."
    ),
    device_kind: str | None = typer.Option(
        None, "--device-kind", help="Record this device kind (to match a cluster's kind)."
    ),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds before timing."),
    repeat: int = typer.Option(10, "--repeat", help="Timed rounds; the median is kept."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    optimizer: str = typer.Option(
        "adam", "--optimizer", help="adam or sgd: its state bytes, and its step timed per "
        "layer (adam steps as pdv run's AdamW)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for weights and synthetic batches."),
    as_json: bool = typer.Option(False, "--json", help="Print a short JSON summary."),
) -> None:
    """Measure every layer's forward/backward time and memory (or estimate them)."""
    from pdv import artifacts
    from pdv.models import parse_model_args
    from pdv.profile.layers import profile_model
    from pdv.profile.request import ProfileRequest, parse_sizes

    req = ProfileRequest(
        spec=model,
        kwargs=parse_model_args(model_arg),
        split_at=tuple(split_at),
        blocks=tuple(blocks),
        device=device,
        micro_batch_sizes=parse_sizes(micro_batch_sizes, "--micro-batch-sizes"),
        tp_degrees=parse_sizes(tp_degrees, "--tp-degrees"),
        warmup=warmup,
        repeat=repeat,
        dtype=dtype,
        optimizer=optimizer,
        estimate=estimate,
        device_flops=device_flops,
        device_bandwidth=device_bandwidth,
        device_spec=None if device_spec is None else str(device_spec),
        device_kind=device_kind,
        seed=seed,
    )
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=err_console, transient=True,
    )
    task = None

    def progress(what: str, done: int, total: int) -> None:
        nonlocal task
        # Started on the first report, so an input error before any work is one clean line.
        if task is None:
            bar.start()
            task = bar.add_task(what, total=total)
        bar.update(task, description=what, completed=done, total=total)

    try:
        profile = profile_model(req, progress)
    finally:
        if task is not None:
            bar.stop()
    artifacts.write(output, profile)

    layers = profile.layers
    fwd = sum(x.fwd_s for x in layers)
    bwd = sum(x.bwd_s for x in layers)
    whole = profile.whole_model
    if as_json:
        summary = {
            "output": str(output),
            "method": profile.provenance.method,
            "device_kind": profile.device.kind,
            "layers": len(layers),
            "reference_micro_batch_size": profile.reference_micro_batch_size,
            "layer_fwd_s": fwd,
            "layer_bwd_s": bwd,
            "whole_model_fwd_bwd_s": whole.fwd_bwd_s if whole else None,
            "optimizer_s": sum(x.optimizer_s or 0.0 for x in layers),
            "param_bytes": profile.model_param_bytes(),
        }
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    render(profile, console)
    console.print(f"wrote {output}", highlight=False)
