"""Training data for a run: seeded synthetic batches, or a user's data hook.

Every rank draws the same global batch for a step (a generator seeded by (seed, step)) and keeps
only its rows, so the data never depend on the plan: a single-process run sees the same samples.
A data hook is named like a model factory (``pkg.mod:fn`` or ``path/file.py:fn``) and is called
as ``fn(step=..., batch_size=..., seed=...)``; it returns ``(inputs, targets)`` of the whole
global batch (inputs a tensor or a tuple of tensors, or the structure make_batch gives, a dict
of them, which is flattened as make_batch's is). Under a plan in
another dtype than float32 its floating tensors are cast to it, as the model's own batches are
(pdv.models.cast_model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdv.errors import PdvError
from pdv.models import Inputs, ModelDef, as_args, cast_batch, load_factory

__all__ = ["BatchSource", "step_seed", "micro_batch_rows"]


def step_seed(seed: int, step: int) -> int:
    """The generator seed of one step: distinct per (seed, step), stable across runs."""
    return (seed * 1_000_003 + step) % (2**63)


class BatchSource:
    """Gives the global batch of a step, from the model's make_batch or a data hook."""

    def __init__(self, model: ModelDef, global_batch_size: int, seed: int,
                 hook: str | None = None) -> None:
        self.model = model
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._hook: Callable[..., tuple[Inputs, torch.Tensor]] | None = (
            load_factory(hook) if hook else None
        )
        self.hook = hook

    def global_batch(self, step: int) -> tuple[Inputs, torch.Tensor]:
        """(inputs, targets) of the whole global batch of this step; inputs a tensor or a
        tuple of them (the first layer's arguments)."""
        if self._hook is None:
            gen = torch.Generator().manual_seed(step_seed(self.seed, step))
            return self.model.make_batch(self.global_batch_size, gen)
        x, y = self._hook(step=step, batch_size=self.global_batch_size, seed=self.seed)
        if self.model.inputs is not None:  # a dict like make_batch's: flattened the same way
            x = self.model.inputs.flatten(x, f"data hook {self.hook}")
        gb = self.global_batch_size
        inputs = [("inputs", t) for t in as_args(x)]
        for name, t in (*inputs, ("targets", y)):
            # Targets may be flattened per token (rows × tokens), as the loss of flattened
            # logits reads them; each sample's rows together, so micro-batches split evenly.
            rows = t.shape[0] if isinstance(t, torch.Tensor) and t.dim() > 0 else -1
            if rows != gb and not (name == "targets" and rows > 0 and rows % gb == 0):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                also = " (or a multiple of it, for targets)" if name == "targets" else ""
                raise PdvError(
                    f"data hook {self.hook}: {name} must be a tensor with "
                    f"{gb} rows (the global batch){also}, got {got}"
                )
        if self.model.dtype != torch.float32:  # the plan's dtype (pdv.models.cast_model)
            return cast_batch((x, y), self.model.dtype)
        return x, y


def micro_batch_rows(t: torch.Tensor, num_micro_batches: int, dp: int,
                     replica: int) -> torch.Tensor:
    """The rows of a global batch that one replica sees, micro-batch after micro-batch.

    Micro-batch m is rows [m*M, (m+1)*M); the replica takes its 1/dp slice of each, and the
    slices are concatenated in micro-batch order (what a pipeline schedule splits back apart).
    """
    m = t.shape[0] // num_micro_batches
    rows = m // dp
    first = replica * rows
    parts = [t[i * m + first : i * m + first + rows] for i in range(num_micro_batches)]
    return torch.cat(parts)
