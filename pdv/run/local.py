"""Check a plan against this machine and build this host's torchrun command.

Everything a user can get wrong is caught here, before any process starts: a plan of another
schema (at load), no model, a model whose layers the stages do not cover, a stage boundary
that carries what cannot be sent (the shape probe), a TP degree the model
lacks, a world size the plan's devices contradict, more hosts than this allocation has, more
ranks than this host has GPUs, a checkpoint to resume from that another model (or another
data order, or another optimizer) wrote.
"""

from __future__ import annotations

import socket
import sys

from pdv.artifacts import ModelSpec, Plan
from pdv.boundaries import probe_for_stages
from pdv.errors import PdvError
from pdv.models import build_model, cast_model, load_factory
from pdv.run.checkpoint import state_shapes
from pdv.run.dims import ParallelDims, checkpoint_blocker
from pdv.run.launch import HostSlot, RunOptions, host_slots, slurm_node, torchrun_argv
from pdv.run.reference import OPTIMIZERS
from pdv.run.resume import check_resume, read_meta, resume_source
from pdv.run.runtime import plan_dtype, resolve_model
from pdv.run.stage import check_sparse_grads, check_tp_support
from pdv.run.widths import check_separable

__all__ = ["check_plan", "local_command", "free_port"]


def check_plan(plan: Plan, opts: RunOptions) -> ParallelDims:
    """Every check that needs no process group; a PdvError names the fix."""
    spec, kwargs, split_at, blocks = resolve_model(plan, opts.model, list(opts.model_args),
                                                   list(opts.split_at), list(opts.blocks))
    model = cast_model(build_model(spec, kwargs, opts.seed, split_at=split_at, blocks=blocks),
                       plan_dtype(plan))  # the boundary probe in the dtype the ranks run
    dims = ParallelDims.from_plan(plan, len(model.layers))
    check_tp_support(model, list(plan.stages), spec)
    check_separable(dims, probe_for_stages(model, [s.layers for s in dims.stages]))
    host_slots(plan)
    if opts.optimizer not in OPTIMIZERS:
        raise PdvError(f"--optimizer {opts.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    check_sparse_grads(model, list(plan.stages), opts.optimizer)
    if opts.data:
        load_factory(opts.data)
    if opts.checkpoint_every and not opts.checkpoint_dir:
        raise PdvError("--checkpoint-every needs --checkpoint-dir")
    source = resume_source(opts.checkpoint_dir, opts.resume_from)
    if opts.checkpoint_dir or source is not None:
        blocker = checkpoint_blocker(dims.stages)
        if blocker:
            raise PdvError(blocker)
    if source is not None:
        check_resume(read_meta(source), source,
                     ModelSpec(spec=spec, kwargs=kwargs, split_at=split_at, blocks=blocks),
                     state_shapes(model), global_batch_size=plan.global_batch_size,
                     seed=opts.seed, data=opts.data, optimizer=opts.optimizer, steps=opts.steps)
    return dims


def free_port() -> int:
    """A TCP port free on this host right now (the rendezvous binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _this_slot(plan: Plan, env: dict[str, str],
               master_port: int | None) -> tuple[HostSlot, int, str, int]:
    slots = host_slots(plan)
    inside = slurm_node(env, slots)
    if inside is not None:
        node, master, port = inside
        return slots[node], len(slots), master, master_port or port
    if len(slots) > 1:
        hosts = ", ".join(s.host for s in slots)
        raise PdvError(
            f"the plan spans {len(slots)} hosts ({hosts}); run `pdv run PLAN --print-commands` "
            "and start each host's command there, or `--slurm` for an sbatch script"
        )
    return slots[0], 1, "127.0.0.1", master_port or free_port()


def local_command(plan: Plan, opts: RunOptions, env: dict[str, str],
                  master_port: int | None = None, max_restarts: int = 0) -> list[str]:
    """This host's torchrun argv (inside Slurm: the node SLURM_NODEID names)."""
    slot, nnodes, master, port = _this_slot(plan, env, master_port)
    if opts.device == "cuda" or opts.device == "auto":
        import torch

        gpus = torch.cuda.device_count()
        if opts.device == "cuda" and gpus == 0:
            raise PdvError("--device cuda but this host has no CUDA device; use --device cpu")
        if gpus and slot.nproc > gpus:
            raise PdvError(
                f"the plan puts {slot.nproc} ranks on this host but it has {gpus} GPUs; "
                f"re-plan for {gpus} ranks per host or use --device cpu"
            )
    return torchrun_argv(slot, nnodes, master, port, opts, python=sys.executable,
                         max_restarts=max_restarts)
