"""An nn.Sequential written for torch's own convention: nn.LSTM and nn.GRU are children
themselves, and the child after each takes the tuple it returns as one argument and picks from
it (the LSTM's ``(out, (h, c))``, the GRU's ``(out, h)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, TOKENS = 40, 12


class Outputs(nn.Module):
    """(out, state) -> out"""

    def forward(self, pair: tuple) -> torch.Tensor:
        out, _ = pair
        return out


class WithLastState(nn.Module):
    """(out, h) -> out plus the last layer's final state at every token"""

    def forward(self, pair: tuple) -> torch.Tensor:
        out, h = pair
        return out + h[-1].unsqueeze(1)


def net(d: int = 32) -> nn.Sequential:
    """embedding, LSTM, pick, norm, GRU, pick with state, head"""
    return nn.Sequential(
        nn.Embedding(VOCAB, d),
        nn.LSTM(d, d, batch_first=True), Outputs(),
        nn.LayerNorm(d),
        nn.GRU(d, d, batch_first=True), WithLastState(),
        nn.Linear(d, VOCAB),
    )


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(VOCAB, (mbs, TOKENS + 1), generator=gen)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
