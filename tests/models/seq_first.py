"""A language model in torch's sequence-first layout, for pdv's "factory returns an
nn.Sequential" source: nn.TransformerEncoderLayer and nn.LSTM at their defaults (batch_first
False) take (tokens, batch, width), so the micro-batch is dim 1 of every boundary from the
embedding on, and of the LSTM's (layers, batch, hidden) state that one layer hands the next.
Later layers flatten tokens into dim 0 time-major, (tokens · batch, width): each sample's rows
strided across the micro-batch. The head hands the loss batch-first logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, TOKENS = 37, 6


class Embed(nn.Module):
    """(batch, tokens) ids -> (tokens, batch, d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(TOKENS, 1, d) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.t()) + self.pos


class Recurrent(nn.Module):
    """An LSTM that hands on its sequence and its final (hidden, cell) state."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (h, c) = self.rnn(x)
        return x + y, h, c


class Resume(nn.Module):
    """A second LSTM that starts from the state the first one ended in."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, d)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x, (h, c))
        return x + y


class TimeMajor(nn.Module):
    """(tokens, batch, d) -> (tokens · batch, d), row t·B + b: token t of sample b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])


class TokenMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Head(nn.Module):
    """Time-major rows back to (batch, tokens, vocab) logits."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.out = nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x).reshape(TOKENS, -1, VOCAB).transpose(0, 1)


def net(d: int = 16) -> nn.Sequential:
    """embedding, two encoder layers, LSTM, LSTM from its state, the time-major flatten, a
    token MLP, the head: 8 layers."""
    return nn.Sequential(
        Embed(d),
        *[nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0) for _ in range(2)],
        Recurrent(d), Resume(d), TimeMajor(), TokenMLP(d), Head(d))


def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(VOCAB, (mbs, TOKENS + 1), generator=gen)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))
