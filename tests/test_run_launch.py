"""Plan -> torchrun commands and sbatch scripts: pure functions, checked by exact output."""

from __future__ import annotations

import pytest

from pdv.artifacts import Plan
from pdv.errors import PdvError
from pdv.run.launch import (
    HostSlot,
    RunOptions,
    host_slots,
    print_commands,
    runtime_argv,
    sbatch_script,
    slurm_node,
)


def two_host_plan(hosts: list[str]) -> Plan:
    return Plan.model_validate({
        "stages": [{"layers": [0, 3], "ranks": [0, 1, 2], "dp": 3},
                   {"layers": [3, 6], "ranks": [3], "dp": 1}],
        "micro_batch_size": 6, "num_micro_batches": 2, "global_batch_size": 12,
        "devices": [{"rank": i, "host": h, "kind": "cpu", "memory_bytes": 1 << 30}
                    for i, h in enumerate(hosts)],
    })


OPTS = RunOptions(plan="plan.json", steps=5, model="gpt_tiny",
                  model_args=("n_layer=2",), seed=3, report="out/report.json")


def test_host_slots_pin_rank_blocks_in_host_order() -> None:
    slots = host_slots(two_host_plan(["b", "b", "a", "a"]))
    assert slots == [HostSlot("b", 0, 0, 2), HostSlot("a", 1, 2, 2)]
    assert host_slots(two_host_plan(["a", "a", "a", "b"]))[1] == HostSlot("b", 1, 3, 1)


def test_non_contiguous_hosts_are_refused() -> None:
    with pytest.raises(PdvError, match="not contiguous"):
        host_slots(two_host_plan(["a", "b", "a", "b"]))


def test_runtime_argv_leaves_defaults_out() -> None:
    assert runtime_argv(RunOptions(plan="p.json")) == ["-m", "pdv.run.runtime", "p.json",
                                                       "--steps", "10"]


def test_print_commands_exact() -> None:
    text = print_commands(two_host_plan(["n0", "n0", "n1", "n1"]), OPTS, master_port=29511)
    tail = ("-m pdv.run.runtime plan.json --steps 5 --model gpt_tiny "
            "--model-arg n_layer=2 --seed 3 --report out/report.json")
    assert text == (
        "# on n0 (node 0, ranks 0-1)\n"
        "OMP_NUM_THREADS=1 python -m torch.distributed.run --nnodes 2 --node-rank 0 "
        f"--nproc-per-node 2 --master-addr n0 --master-port 29511 {tail}\n"
        "# on n1 (node 1, ranks 2-3)\n"
        "OMP_NUM_THREADS=1 python -m torch.distributed.run --nnodes 2 --node-rank 1 "
        f"--nproc-per-node 2 --master-addr n0 --master-port 29511 {tail}\n"
    )


def test_sbatch_script_exact() -> None:
    text = sbatch_script(two_host_plan(["n0", "n0", "n0", "n1"]), OPTS, master_port=29511,
                         max_restarts=2)
    assert text == (
        "#!/bin/bash\n"
        "#SBATCH --job-name=pdv-run\n"
        "#SBATCH --nodes=2\n"
        "#SBATCH --ntasks-per-node=1\n"
        "#SBATCH --nodelist=n0,n1\n"
        "set -euo pipefail\n"
        "# node n (SLURM_NODEID) runs the n-th host's ranks: hosts in order of their first rank\n"
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        "export MASTER_ADDR OMP_NUM_THREADS=1\n"
        "srun --kill-on-bad-exit=1 bash -c 'NPROC=(3 1); exec python -m torch.distributed.run "
        '--nnodes 2 --node-rank "$SLURM_NODEID" --nproc-per-node "${NPROC[$SLURM_NODEID]}" '
        '--master-addr "$MASTER_ADDR" --master-port 29511 --max-restarts 2 -m pdv.run.runtime '
        "plan.json --steps 5 --model gpt_tiny --model-arg n_layer=2 "
        "--seed 3 --report out/report.json'\n"
    )


def test_slurm_environment_is_read() -> None:
    slots = host_slots(two_host_plan(["n0", "n0", "n1", "n1"]))
    assert slurm_node({}, slots) is None
    env = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", "SLURM_NNODES": "2"}
    assert slurm_node(env, slots) == (1, "n0", 29500 + 242)
    assert slurm_node({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}, slots) == (
        1, "10.0.0.1", 1234)
    with pytest.raises(PdvError, match="allocate 2 nodes"):
        slurm_node({**env, "SLURM_NNODES": "3"}, slots)
