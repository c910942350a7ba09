"""The simulator's transfer rule, checked on the real backend: a send completes only once its
receive is posted (pdv.cost.simulate: a transfer starts when its receiver posts it)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pdv.run.local import free_port

LATE_S = 0.3
"""how long after the send the receiver posts its receive"""


def _worker(rank: int, port: int, sizes: list[int], out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        waited = []
        for size in sizes:
            buf = torch.zeros(size, dtype=torch.uint8)
            dist.barrier()
            if rank == 0:
                work = dist.isend(buf, 1)
                t0 = time.perf_counter()
                work.wait()
                waited.append(time.perf_counter() - t0)
            else:
                time.sleep(LATE_S)
                dist.recv(buf, 0)
        out[rank] = waited
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.parametrize("sizes", [[1, 4096], [256 * 1024, 4 << 20]])
def test_a_gloo_send_waits_for_its_receive_to_be_posted(sizes: list[int]) -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), sizes, out), nprocs=2, join=True)
        waited = list(out[0])
    assert len(waited) == len(sizes)
    # However small the message, the sender's wait spans the receiver's delay.
    assert min(waited) >= 0.8 * LATE_S, waited
