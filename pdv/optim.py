"""The training optimizer: built here for ``pdv run`` and for the profiler that times its step.

One builder, so the step ``pdv profile model`` prices is the step ``pdv run`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pdv.errors import PdvError

__all__ = ["OPTIMIZERS", "PROFILE_OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("adamw", "sgd")

PROFILE_OPTIMIZERS: dict[str, str] = {"adam": "adamw", "sgd": "sgd"}
"""A profile's --optimizer name -> the run's optimizer whose step it times. The profile says
"adam" for the state it counts (two moments per parameter); the run's Adam is AdamW, which keeps
the same state and does the same per-element work plus the decoupled weight decay."""


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str,
                   lr: float) -> torch.optim.Optimizer:
    """The run's optimizer; foreach off so sharded (DTensor) and plain params take one path."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=False)
    raise PdvError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
