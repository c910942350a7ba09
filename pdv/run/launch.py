"""Plan -> torchrun commands: pure functions, testable by their exact output.

torchrun's static rendezvous numbers global ranks host by host: node n's workers get ranks
``sum(nproc of nodes < n) + local_rank``. So a plan is launchable as is when each host's ranks
form one contiguous block; hosts are ordered by their first rank (node rank 0 holds rank 0), and
the master address is node 0's host. Plans without ``devices`` run on one host.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from pdv.artifacts import Plan
from pdv.errors import PdvError

__all__ = [
    "HostSlot",
    "RunOptions",
    "host_slots",
    "runtime_argv",
    "torchrun_argv",
    "print_commands",
    "sbatch_script",
    "slurm_node",
]

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class HostSlot:
    """One host of the plan: its node rank and the block of global ranks it runs."""

    host: str
    node_rank: int
    first_rank: int
    nproc: int


@dataclass(frozen=True)
class RunOptions:
    """What every rank's runtime is told (the same on every host)."""

    plan: str
    steps: int = 10
    model: str | None = None
    model_args: tuple[str, ...] = ()
    split_at: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    seed: int = 0
    lr: float = 1e-3
    optimizer: str = "adamw"
    warmup: int = 2
    report: str | None = None
    data: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume_from: str | None = None
    device: str = "auto"
    slow_margin: float = 0.5
    slow_steps: int = 3
    stop_when_slow: bool = False
    extra: tuple[str, ...] = field(default=())


def host_slots(plan: Plan) -> list[HostSlot]:
    """The plan's hosts in node-rank order, each with its contiguous block of ranks."""
    world = len({r for s in plan.stages for r in s.ranks})
    if plan.devices is None:
        return [HostSlot("localhost", 0, 0, world)]
    if len(plan.devices) != world:
        raise PdvError(
            f"the plan's stages use {world} ranks but its devices list {len(plan.devices)}; "
            "re-plan on a cluster with exactly the ranks the plan uses"
        )
    slots: list[HostSlot] = []
    for dev in sorted(plan.devices, key=lambda d: d.rank):
        if slots and slots[-1].host == dev.host:
            last = slots[-1]
            slots[-1] = HostSlot(last.host, last.node_rank, last.first_rank, last.nproc + 1)
            continue
        if any(s.host == dev.host for s in slots):
            raise PdvError(
                f"host {dev.host}'s ranks are not contiguous (rank {dev.rank} comes after "
                f"another host's); torchrun numbers ranks host by host, so renumber the "
                "cluster's ranks so each host holds one block"
            )
        slots.append(HostSlot(dev.host, len(slots), dev.rank, 1))
    return slots


def runtime_argv(opts: RunOptions) -> list[str]:
    """Arguments of ``python -m pdv.run.runtime`` for these options (defaults left out)."""
    argv = ["-m", "pdv.run.runtime", opts.plan, "--steps", str(opts.steps)]
    if opts.model:
        argv += ["--model", opts.model]
    for pair in opts.model_args:
        argv += ["--model-arg", pair]
    for name in opts.split_at:
        argv += ["--split-at", name]
    for name in opts.blocks:
        argv += ["--blocks", name]
    defaults = RunOptions(plan=opts.plan)
    for name in ("seed", "lr", "optimizer", "warmup", "device", "slow_margin", "slow_steps"):
        value = getattr(opts, name)
        if value != getattr(defaults, name):
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for name in ("report", "data", "checkpoint_dir", "resume_from"):
        value = getattr(opts, name)
        if value:
            argv += [f"--{name.replace('_', '-')}", value]
    if opts.checkpoint_every:
        argv += ["--checkpoint-every", str(opts.checkpoint_every)]
    if opts.stop_when_slow:
        argv.append("--stop-when-slow")
    return argv + list(opts.extra)


def torchrun_argv(slot: HostSlot, nnodes: int, master_addr: str, master_port: int,
                  opts: RunOptions, python: str = "python", max_restarts: int = 0) -> list[str]:
    """One host's torchrun command line with a static rendezvous at master_addr:master_port."""
    argv = [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes),
        "--node-rank", str(slot.node_rank),
        "--nproc-per-node", str(slot.nproc),
        "--master-addr", master_addr,
        "--master-port", str(master_port),
    ]
    if max_restarts:
        argv += ["--max-restarts", str(max_restarts)]
    return argv + runtime_argv(opts)


def print_commands(plan: Plan, opts: RunOptions, master_port: int = DEFAULT_PORT,
                   max_restarts: int = 0) -> str:
    """One shell line per host, prefixed by a comment naming the host and its ranks."""
    slots = host_slots(plan)
    master = slots[0].host
    lines = []
    for slot in slots:
        last = slot.first_rank + slot.nproc - 1
        lines.append(f"# on {slot.host} (node {slot.node_rank}, ranks {slot.first_rank}-{last})")
        argv = torchrun_argv(slot, len(slots), master, master_port, opts,
                             max_restarts=max_restarts)
        lines.append("OMP_NUM_THREADS=1 " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def _shell(argv: list[str], raw: dict[int, str]) -> str:
    """Quote every word except those at the given positions, which are shell expansions."""
    return " ".join(raw.get(i, shlex.quote(w)) for i, w in enumerate(argv))


def sbatch_script(plan: Plan, opts: RunOptions, master_port: int = DEFAULT_PORT,
                  max_restarts: int = 0, job_name: str = "pdv-run") -> str:
    """An sbatch script: one srun task per node, each running torchrun for its node.

    Node n (SLURM_NODEID) runs the n-th host's block of ranks, so the nodes' order in the
    allocation takes the place of the plan's host names.
    """
    slots = host_slots(plan)
    argv = torchrun_argv(slots[0], len(slots), slots[0].host, master_port, opts,
                         max_restarts=max_restarts)
    # Per-node values come from srun's environment on each node.
    raw = {
        argv.index("--node-rank") + 1: '"$SLURM_NODEID"',
        argv.index("--nproc-per-node") + 1: '"${NPROC[$SLURM_NODEID]}"',
        argv.index("--master-addr") + 1: '"$MASTER_ADDR"',
    }
    cmd = _shell(argv, raw)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={len(slots)}",
        "#SBATCH --ntasks-per-node=1",
    ]
    named = [s.host for s in slots if s.host not in ("localhost", "127.0.0.1")]
    if len(named) == len(slots):
        lines.append(f"#SBATCH --nodelist={','.join(named)}")
    inner = f"NPROC=({' '.join(str(s.nproc) for s in slots)}); exec {cmd}"
    lines += [
        "set -euo pipefail",
        "# node n (SLURM_NODEID) runs the n-th host's ranks: hosts in order of their first rank",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR OMP_NUM_THREADS=1",
        "srun --kill-on-bad-exit=1 bash -c " + shlex.quote(inner),
    ]
    return "\n".join(lines) + "\n"


def slurm_node(env: dict[str, str], slots: list[HostSlot]) -> tuple[int, str, int] | None:
    """Inside a Slurm allocation: (node rank, master address, master port); None outside.

    The node rank is SLURM_NODEID; the master is MASTER_ADDR when set, else the plan's first
    host; the port is MASTER_PORT, else one derived from SLURM_JOB_ID so every node agrees.
    """
    if "SLURM_JOB_ID" not in env or "SLURM_NODEID" not in env:
        return None
    nnodes = int(env.get("SLURM_NNODES", "1"))
    if nnodes != len(slots):
        raise PdvError(
            f"this Slurm allocation has {nnodes} nodes but the plan spans {len(slots)} hosts "
            f"({', '.join(s.host for s in slots)}); allocate {len(slots)} nodes"
        )
    node = int(env["SLURM_NODEID"])
    master = env.get("MASTER_ADDR") or slots[0].host
    port = int(env.get("MASTER_PORT") or DEFAULT_PORT + int(env["SLURM_JOB_ID"]) % 1000)
    return node, master, port
