"""Per-rank entry of ``pdv run``: torchrun starts ``python -m pdv.run.runtime plan.json ...``.

Each rank: joins the process group (gloo on CPU, nccl on CUDA), builds the model with the run's
seed (every rank gets the same weights), keeps its stage's layers, parallelizes them (TP, then
recompute, then FSDP2 over the stage's replicas, or a gradient all-reduce for plain replicas),
and trains on the plan's schedule: with torch.distributed.pipelining when every stage has the
same width, with pdv's split/merge executor (pdv.run.widths) when widths differ. Rank 0 gathers
step times, peak memory and losses and writes the run report.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  (loaded before the peak-memory window opens)
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.pipelining  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401

from pdv.artifacts import ModelSpec, Plan, digest, load_as, write
from pdv.boundaries import in_place_writers, input_values, probe_for_stages
from pdv.errors import PdvError
from pdv.models import build_model, cast_model, parse_model_args
from pdv.profile.allocator import keep_freed_memory
from pdv.profile.compute import DTYPES
from pdv.profile.loops import settle_gloo_loops
from pdv.run.checkpoint import Checkpointer, state_shapes
from pdv.run.data import BatchSource
from pdv.run.dims import ParallelDims, build_meshes
from pdv.run.reference import OPTIMIZERS, make_optimizer
from pdv.run.report import PeakMemory, make_report
from pdv.run.resume import CheckpointMeta, read_meta, resume_source
from pdv.run.stage import build_stage_module, check_tp_support, replica_norm_notes
from pdv.run.tied import TiedGrads
from pdv.run.watch import SlowOptions, StepWatch
from pdv.run.workers import EXIT_REPLAN

__all__ = ["main", "resolve_model", "parse_args", "plan_dtype"]

CRASH_ENV = "PDV_TEST_CRASH_AT_STEP"
"""Test hook: "STEP:RANK:MARKER" makes RANK exit after STEP once (MARKER file remembers)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The runtime's arguments (mirrors pdv.run.launch.runtime_argv)."""
    p = argparse.ArgumentParser(prog="python -m pdv.run.runtime")
    p.add_argument("plan")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model")
    p.add_argument("--model-arg", action="append", default=[])
    p.add_argument("--split-at", action="append", default=[])
    p.add_argument("--blocks", action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--report")
    p.add_argument("--data")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume-from")
    p.add_argument("--slow-margin", type=float, default=SlowOptions.margin)
    p.add_argument("--slow-steps", type=int, default=SlowOptions.steps)
    p.add_argument("--stop-when-slow", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def resolve_model(plan: Plan, model: str | None, model_args: list[str],
                  split_at: list[str] | None = None, blocks: list[str] | None = None,
                  ) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """(spec, kwargs, split_at, blocks): --model wins over the plan's model (and its cut
    points); --model-arg overrides its kwargs; --split-at/--blocks replace its cut points."""
    own = plan.model if plan.model and not model else None
    kwargs = dict(own.kwargs) if own else {}
    spec = model or (plan.model.spec if plan.model else None)
    if spec is None:
        raise PdvError(
            "the plan names no model; pass --model path/file.py:factory (and --model-arg)"
        )
    kwargs.update(parse_model_args(model_args))
    cut = bool(split_at or blocks)
    return (spec, kwargs, list(split_at or []) if cut or not own else list(own.split_at),
            list(blocks or []) if cut or not own else list(own.blocks))


def plan_dtype(plan: Plan) -> torch.dtype:
    """The dtype the plan trains in: the one its profiles were taken in (float32 when the plan
    records none)."""
    if plan.dtype not in DTYPES:
        raise PdvError(f"the plan's dtype {plan.dtype!r}: pdv trains in {', '.join(DTYPES)}")
    return DTYPES[plan.dtype]


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _maybe_crash(step: int, rank: int) -> None:
    hook = os.environ.get(CRASH_ENV)
    if not hook:
        return
    at, who, marker = hook.split(":", 2)
    if int(at) == step and int(who) == rank and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"crashed after step {step}\n")
        os._exit(17)


def train(args: argparse.Namespace) -> bool:
    """Run the plan on this rank (process group already initialized); True when it stopped
    early, checkpointed, because a rank was slow (--stop-when-slow)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    plan: Plan = load_as(args.plan, "plan")
    spec, kwargs, split_at, blocks = resolve_model(plan, args.model, args.model_arg,
                                                   args.split_at, args.blocks)
    dims = ParallelDims.from_plan(plan)
    if dims.world_size != world:
        raise PdvError(f"the plan uses {dims.world_size} ranks but torchrun started {world}")
    meshes = build_meshes(dims, device.type, rank)
    memory = PeakMemory(device.type)
    model = build_model(spec, kwargs, args.seed, split_at=split_at, blocks=blocks)
    model = cast_model(model, plan_dtype(plan))  # what the profile timed and the plan priced
    dims = ParallelDims.from_plan(plan, len(model.layers))
    check_tp_support(model, list(plan.stages), spec)
    boundaries = probe_for_stages(model, [s.layers for s in dims.stages])
    if model.prepare is not None:
        model.prepare(sorted({dims.replica_rows(i) for i in range(dims.num_stages)}))
    uniform = dims.uniform
    tied = TiedGrads(model, dims, rank, dims.stages[0].dp if uniform else 1)
    writers = in_place_writers(boundaries)
    modules = {
        i: build_stage_module(model, dims.stages[i], meshes.stage_mesh[i], device, tied.params,
                              writers)
        for i in dims.stages_of(rank)
    }
    tied.check()
    slow = SlowOptions(args.slow_margin, args.slow_steps, stop=args.stop_when_slow)
    watch = StepWatch(plan, dims, modules, rank, world, args.warmup, slow, device)
    loss_fn = watch.clock.timed_loss(model.loss_fn)
    source = BatchSource(model, plan.global_batch_size, args.seed, args.data)
    spec_used = ModelSpec(spec=spec, kwargs=kwargs, split_at=split_at, blocks=blocks)
    # Checkpoint keys and shapes of the whole model, read before the other stages are freed.
    shapes = state_shapes(model) if rank == 0 else {}
    model_notes = replica_norm_notes(model, dims) if rank == 0 else []
    model.layers = []  # the other stages' layers are freed; this rank keeps its own
    if uniform:
        from pdv.run.pipeline import ChainPipeline

        first = input_values(source.global_batch(0)[0])
        executor: Any = ChainPipeline(dims, meshes, modules, rank, device, plan.schedule,
                                      loss_fn, boundaries, first)
    else:
        from pdv.run.widths import WidthPipeline

        executor = WidthPipeline(dims, meshes, modules, rank, device, plan.schedule, loss_fn,
                                 boundaries)
    # A parameter two of this rank's stages share (tied, interleaved) is stepped once.
    params = list({id(p): p for m in modules.values() for p in m.parameters()}.values())
    # A stage may have no parameters (a reshape); torch's optimizers refuse an empty list.
    params = params or [torch.nn.Parameter(torch.zeros(0, device=device))]
    opt = make_optimizer(params, args.optimizer, args.lr)
    ckpt = Checkpointer(args.checkpoint_dir, args.checkpoint_every, modules, opt)
    start, prior_losses, prior_times = 0, [], []
    source_dir = resume_source(args.checkpoint_dir, args.resume_from)
    if source_dir is not None:
        meta = read_meta(source_dir)
        ckpt.load(source_dir)
        start, prior_losses, prior_times = meta.step, list(meta.loss), list(meta.step_times_s)
    losses: list[float] = []  # this run's steps (this rank's part of each loss)
    times: list[float] = []
    stopped = False
    settle_gloo_loops()  # every group of the run exists by now
    memory.start()
    # PDV_OP_TRACE (ChainPipeline only): the loop opens each step's record and writes it.
    recorder = getattr(executor, "recorder", None)
    for step in range(start, args.steps):
        if recorder is not None:
            recorder.begin_step()
        x, y = source.global_batch(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        watch.before_step()
        t0 = time.perf_counter()
        opt.zero_grad()
        micro_losses = executor.step(x, y)
        tied.reduce()
        t_opt = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if recorder is not None:
            recorder.mark("optimizer_end")
            recorder.write()
        times.append(t1 - t0)
        losses.append(sum(micro_losses) / len(micro_losses) if micro_losses else 0.0)
        stopped = bool(watch.after_step(step, t1 - t_opt)) and slow.stop
        if ckpt.due(step) or (stopped and ckpt.folder is not None):
            run_losses, run_times = _history(losses, times, executor, dims, device)
            ckpt.save(step + 1, CheckpointMeta(
                step=step + 1, model=spec_used, tensors=shapes,
                global_batch_size=plan.global_batch_size,
                num_micro_batches=plan.num_micro_batches, seed=args.seed, data=args.data,
                optimizer=args.optimizer, lr=args.lr, plan_digest=digest(plan),
                loss=prior_losses + run_losses, step_times_s=prior_times + run_times))
        if stopped:
            break
        _maybe_crash(step, rank)
    _finish(plan, dims, args, rank, world, device, memory, (prior_losses, prior_times),
            losses, times, executor, watch, model_notes)
    return stopped


def _history(losses: list[float], times: list[float], executor: Any, dims: ParallelDims,
             device: torch.device) -> tuple[list[float], list[float]]:
    """Every rank's (step losses, step times) of this run: the loss as one process computes it,
    the time of the slowest rank (collective: every rank calls it)."""
    # Each replica of the last stage (shard 0 only: TP shards hold the same loss) adds its mean
    # over micro-batches; replicas saw equal slices, so the step loss is their average.
    comm = device if device.type == "cuda" else torch.device("cpu")
    loss_t = torch.tensor(losses if executor.reports_loss else [0.0] * len(losses),
                          dtype=torch.float64, device=comm)
    time_t = torch.tensor(times, dtype=torch.float64, device=comm)
    dist.all_reduce(loss_t)
    dist.all_reduce(time_t, op=dist.ReduceOp.MAX)
    return (loss_t / dims.stages[-1].dp).tolist(), time_t.tolist()


def _finish(plan: Plan, dims: ParallelDims, args: argparse.Namespace, rank: int, world: int,
            device: torch.device, memory: PeakMemory, prior: tuple[list[float], list[float]],
            losses: list[float], times: list[float], executor: Any, watch: StepWatch,
            model_notes: list[str]) -> None:
    run_losses, run_times = _history(losses, times, executor, dims, device)
    peak_t = torch.zeros(world, dtype=torch.int64)
    peak_t[rank] = memory.peak()
    peak_t = peak_t.to(device if device.type == "cuda" else torch.device("cpu"))
    dist.all_reduce(peak_t)
    if rank != 0 or not args.report:
        return
    _check_finite(prior[0] + run_losses, plan.dtype, args.optimizer)
    resumed = len(prior[0])
    notes = [
        f"device {device.type}, backend {dist.get_backend()}, world {world}, "
        f"dtype {plan.dtype}",
        f"schedule {plan.schedule}, {dims.num_micro_batches} micro-batches of "
        f"{dims.pipeline_micro_batch}, executor {type(executor).__name__}",
        f"steps {args.steps}, warm-up {args.warmup}, seed {args.seed}, optimizer "
        f"{args.optimizer} lr {args.lr}; step time = max over ranks",
    ]
    notes += model_notes
    if resumed:
        notes.append(f"resumed after step {resumed}: losses and step times of steps "
                     f"0..{resumed - 1} come from the checkpoint; the median is of this run's")
    malloc_note = keep_freed_memory() if device.type == "cpu" else None
    if malloc_note:
        notes.append(malloc_note)
    loops_note = settle_gloo_loops()
    if loops_note:
        notes.append(loops_note)
    if device.type == "cuda":
        notes.append(f"rank 0 max_memory_allocated {torch.cuda.max_memory_allocated()} bytes")
    warmup = resumed + min(args.warmup, max(len(run_times) - 1, 0))
    report = make_report(plan, prior[1] + run_times, warmup, peak_t.tolist(), memory.method,
                         prior[0] + run_losses, notes)
    measured = report.measured.model_copy(update={"compute_s": watch.median_compute() or None,
                                                  "cpu_s": watch.median_cpu() or None})
    write(args.report, report.model_copy(
        update={"measured": measured, "slow_ranks": watch.slow_ranks()}))


def _check_finite(losses: list[float], dtype: str, optimizer: str) -> None:
    """A report holds finite losses only: a step that diverged is an error naming it."""
    bad = [(k, v) for k, v in enumerate(losses) if not math.isfinite(v)]
    if not bad:
        return
    step, value = bad[0]
    hint = ""
    if dtype == "float16" and optimizer == "adamw":
        hint = ("; float16 parameters under adamw underflow (its eps 1e-8 is 0 in float16, "
                "and nothing scales the loss): plan from a bfloat16 profile, or run with "
                "--optimizer sgd")
    raise PdvError(f"the loss of step {step} is {value} (training in {dtype}){hint}")


def _init_process_group(backend: str) -> None:
    """Join the run; after a torchrun restart, under a fresh store prefix.

    With a static rendezvous the agent's store outlives a restart, and the previous attempt's
    keys (old gloo addresses) would be read again; a prefix per attempt keeps attempts apart.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend)
        return
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=300))
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"pdv/attempt{attempt}", store),
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry under torchrun; a PdvError is one line on stderr and exit code 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not use_cuda:  # allocate as the model profile timed the layers (pdv.profile.allocator)
        keep_freed_memory()
    _init_process_group("nccl" if use_cuda else "gloo")
    try:
        if train(args):
            return EXIT_REPLAN
    except PdvError as exc:
        print(f"pdv: error: rank {dist.get_rank()}: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
