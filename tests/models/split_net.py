"""Any nn.Module for pdv's "split by module name" source: a small decoder whose forward does
work between its children (a position table shared by every block, a residual from the
embedding to the head), so a naive chain of children would not reproduce it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ = 97, 12


class Block(nn.Module):
    """Attention-free mixing block that needs an extra input: the position table."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.ff = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        a = self.mix(self.norm(h) * table)
        # a causal running mean over time: what attention would do, without heads
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
        a = a.cumsum(dim=1) / steps[None, :, None]
        return h + self.ff(F.gelu(a))


class Net(nn.Module):
    def __init__(self, d: int = 24, n_block: int = 4, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.freq = nn.Parameter(torch.linspace(0.1, 1.0, d))
        self.layers = nn.ModuleList(Block(d) for _ in range(n_block))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids)
        pos = torch.arange(ids.shape[1], device=ids.device, dtype=e.dtype)
        table = torch.cos(pos[:, None] * self.freq[None, :])  # (T, d): no batch dim
        h = e
        for block in self.layers:
            h = block(h, table)
        return self.head(self.norm(h + e))


def net(**kwargs) -> nn.Module:
    return Net(**kwargs)


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(VOCAB, (mbs, SEQ + 1), generator=gen)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
