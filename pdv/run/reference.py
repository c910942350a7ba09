"""Single-process training of the same model, seed and data: the losses every plan must match.

Same global batch, same micro-batches (gradient accumulation, each micro-batch's mean loss
divided by the number of micro-batches, as the pipeline schedules scale it), same optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdv.boundaries import probe
from pdv.models import as_args, build_model
from pdv.optim import OPTIMIZERS, make_optimizer
from pdv.run.data import BatchSource

__all__ = ["OPTIMIZERS", "make_optimizer", "reference_losses"]


def reference_losses(spec: str, kwargs: dict[str, Any], *, steps: int, global_batch_size: int,
                     num_micro_batches: int, seed: int = 0, lr: float = 1e-3,
                     optimizer: str = "adamw", data: str | None = None,
                     split_at: Sequence[str] = (), blocks: Sequence[str] = ()) -> list[float]:
    """Per-step losses of single-process training with gradient accumulation."""
    model = build_model(spec, kwargs, seed, split_at=split_at, blocks=blocks)
    # as every rank does before it builds its stage: how each layer takes its predecessor's
    # output (a nested structure, or a tuple as one argument) is settled by the shape probe
    probe(model)
    net = model.sequential()
    opt = make_optimizer(net.parameters(), optimizer, lr)
    source = BatchSource(model, global_batch_size, seed, data)
    losses = []
    for step in range(steps):
        x, y = source.global_batch(step)
        opt.zero_grad()
        total = 0.0
        xs = [t.chunk(num_micro_batches) for t in as_args(x)]
        for m, ym in enumerate(y.chunk(num_micro_batches)):
            loss = model.loss_fn(net(*(c[m] for c in xs)), ym)
            (loss / num_micro_batches).backward()
            total += loss.item()
        opt.step()
        losses.append(total / num_micro_batches)
    return losses
