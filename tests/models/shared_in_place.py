"""A plain nn.Sequential that holds one block at three depths (weights shared across layers,
as ALBERT shares its encoder layer) and whose activations write into their input in place
(ReLU(inplace=True), a scale by mul_), placed where the conformance plans start their stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IN, CLASSES = 16, 3


class Scale(nn.Module):
    """Halves its input in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(0.5)


def net(d: int = 24) -> nn.Sequential:
    """8 layers: the shared block at 1, 3 and 5; in-place writers at 2, 4 and 6."""
    # A Linear keeps its input, not its output, for backward: a writer after it is valid.
    shared = nn.Linear(d, d)
    return nn.Sequential(nn.Linear(IN, d), shared, nn.ReLU(inplace=True), shared, Scale(),
                         shared, nn.Hardtanh(inplace=True), nn.Linear(d, CLASSES))


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(mbs, IN, generator=gen), torch.randint(CLASSES, (mbs,), generator=gen)


def loss_fn(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, targets)
