"""A token-routed mixture of experts as an nn.Sequential: each token goes to the expert its
router scores highest, found with torch.nonzero, so which rows an expert multiplies (and how
many) depends on the data, inside the layer; boundaries stay (batch, tokens, d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, TOKENS = 29, 5


class Routed(nn.Module):
    def __init__(self, d: int, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gate = F.softmax(self.router(flat), dim=-1)
        weight, choice = gate.max(dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(choice == e).squeeze(1)
            out = out.index_add(0, rows, expert(flat[rows]) * weight[rows, None])
        return x + out.reshape(x.shape)


def net(d: int = 16, depth: int = 2) -> nn.Sequential:
    """embedding, `depth` routed layers, the LM head."""
    return nn.Sequential(nn.Embedding(VOCAB, d), *[Routed(d) for _ in range(depth)],
                         nn.Linear(d, VOCAB))


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(VOCAB, (mbs, TOKENS + 1), generator=gen)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))
