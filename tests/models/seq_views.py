"""A plain nn.Sequential whose layers hand on non-contiguous views (transposes), for pdv's
"factory returns an nn.Sequential" source: make_batch and loss_fn live next to the factory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Transpose(nn.Module):
    """Swaps the last two dims and hands on the view (not contiguous)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class Mix(nn.Module):
    """A linear map over the last dim, then a transpose back: the output is a view."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)).transpose(1, 2)


CHANNELS, LENGTH = 24, 40


def net(n_mix: int = 4) -> nn.Sequential:
    """(B, CHANNELS, LENGTH) -> the same shape, every boundary a transposed view."""
    mods: list[nn.Module] = [Transpose()]
    for i in range(n_mix):
        mods.append(Mix(CHANNELS if i % 2 == 0 else LENGTH))
    if n_mix % 2 == 0:
        mods.append(Transpose())
    return nn.Sequential(*mods)


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(mbs, CHANNELS, LENGTH, generator=gen)
    return x, torch.randn(mbs, CHANNELS, LENGTH, generator=gen)


loss_fn = F.mse_loss
