"""A residual MLP: the smallest model that has pipeline stages and a tensor-parallel plan.

pdv profile model mlp --model-arg n_layer=4
"""

from __future__ import annotations

import torch
from torch import nn

from pdv.models import ModelDef


class Block(nn.Module):
    """x + down(gelu(up(x))): up is split by columns and down by rows under TP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


def mlp(n_layer: int = 4, dim: int = 64, expansion: int = 4, in_dim: int = 32) -> ModelDef:
    """Input projection, n_layer residual blocks, output projection; MSE loss on random targets."""
    hidden = dim * expansion
    layers: list[tuple[str, nn.Module]] = [("inp", nn.Linear(in_dim, dim))]
    layers += [(f"block{i}", Block(dim, hidden)) for i in range(n_layer)]
    layers.append(("out", nn.Linear(dim, in_dim)))
    n_blocks = n_layer

    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Explicitly on CPU so a factory called under `with torch.device("meta")` still works.
        x = torch.randn(mbs, in_dim, generator=gen, device="cpu")
        return x, torch.randn(mbs, in_dim, generator=gen, device="cpu")

    def tp_plan(index: int, layer: nn.Module) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        if 1 <= index <= n_blocks:
            return {"up": ColwiseParallel(), "down": RowwiseParallel()}
        return {}

    def tp_shard(index: int, layer: nn.Module, k: int) -> nn.Module:
        if 1 <= index <= n_blocks:
            return Block(dim, hidden // k)
        return layer

    degrees = tuple(k for k in (1, 2, 4, 8) if hidden % k == 0)
    return ModelDef(
        layers=layers,
        make_batch=make_batch,
        loss_fn=nn.functional.mse_loss,
        tp_plan=tp_plan,
        tp_shard=tp_shard,
        tp_degrees=degrees,
    )
