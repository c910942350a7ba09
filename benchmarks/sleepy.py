"""A model whose layers wait instead of compute: a schedule check that a loaded CPU cannot blur.

Each layer's forward waits `fwd_ms` and its backward `bwd_ms` (``time.sleep`` inside an
autograd function), around a small linear map so every stage has parameters and a gradient.
Waiting takes the same time whether the machine is idle or at load 10, and waiting ranks do not
share cores, so a pipeline of these layers measures the schedule itself -- its op order, its
dependencies and its per-message costs -- against the simulator's pricing of the same plan.

``weights`` scales each layer's waits (a comma-separated list, one factor per layer, cycled), so
a check can make stages unequal.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 16


class _Wait(torch.autograd.Function):
    """Identity that sleeps `fwd_s` going forward and `bwd_s` coming back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd_s: float, bwd_s: float) -> torch.Tensor:
        time.sleep(fwd_s)
        ctx.bwd_s = bwd_s
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        time.sleep(ctx.bwd_s)
        return grad, None, None


class Sleepy(nn.Module):
    """A WIDTH x WIDTH linear map whose forward and backward wait fixed times."""

    def __init__(self, fwd_s: float, bwd_s: float) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.fwd_s, self.bwd_s = fwd_s, bwd_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(self.proj(x), self.fwd_s, self.bwd_s)


def sleepy(n_layer: int = 8, fwd_ms: float = 10.0, bwd_ms: float = 20.0,
           weights: str = "1") -> nn.Sequential:
    """n_layer waiting layers on (B, WIDTH) inputs."""
    scale = [float(w) for w in str(weights).split(",")]
    return nn.Sequential(*[
        Sleepy(fwd_ms / 1e3 * scale[i % len(scale)], bwd_ms / 1e3 * scale[i % len(scale)])
        for i in range(n_layer)
    ])


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets of WIDTH features."""
    x = torch.randn(mbs, WIDTH, generator=gen, device="cpu")
    return x, torch.randn(mbs, WIDTH, generator=gen, device="cpu")


def loss_fn(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(out, targets)
