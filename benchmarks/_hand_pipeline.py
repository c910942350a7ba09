"""A minimal hand-written torch.distributed.pipelining run: the baseline of run_overhead.py.

    torchrun --nproc-per-node 4 benchmarks/_hand_pipeline.py SPLITS STEPS NMB MBS OUT.json

Same model, seed, data, optimizer and schedule (1F1B) as `pdv run`, without pdv: one stage per
rank on the default group, layers cut at SPLITS (e.g. 0,4,8,11,14).
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

sys.path.insert(0, ".")
from pdv.sample_models.gpt import gpt_small  # noqa: E402


def main() -> None:
    splits = [int(v) for v in sys.argv[1].split(",")]
    steps, nmb, mbs, out = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = gpt_small()
    layers = model.layers[splits[rank]:splits[rank + 1]]
    module = nn.Sequential(OrderedDict(layers))
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    schedule = Schedule1F1B(stage, n_microbatches=nmb, loss_fn=model.loss_fn)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=False)
    times = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = model.make_batch(nmb * mbs, gen)
        t0 = time.perf_counter()
        opt.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        opt.step()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step_times_s": t.tolist()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
