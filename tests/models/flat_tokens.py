"""A recurrent LM with two inputs whose later layers work on tokens flattened into dim 0, for
pdv's "factory returns an nn.Sequential" source. make_batch gives (token ids, a mask of the
tokens to read) as the first layer's two arguments. From its third layer on, every boundary is
(micro-batch × tokens, width), and the last layer hands the loss flattened logits, as models
that call cross_entropy on (B·T, vocab) do. Dim 0 is then a fixed multiple of the micro-batch,
which replicas split and stages of different widths concatenate by whole samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, TOKENS = 53, 10


class Embed(nn.Module):
    """Token ids and a float mask in; masked embeddings out."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, d)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.table(ids) * keep[..., None]


class Recurrent(nn.Module):
    """A GRU over the tokens (nn.GRU returns a tuple; the block hands on the sequence)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.norm(x + y)


class Flatten(nn.Module):
    """(B, T, d) -> (B·T, d): a row per token, sample after sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])


class TokenMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def net(d: int = 32, n_mlp: int = 2) -> nn.Sequential:
    """masked embedding, a GRU block, the flatten, n_mlp token MLPs, the LM head (flattened
    logits)."""
    return nn.Sequential(Embed(d), Recurrent(d), Flatten(),
                         *[TokenMLP(d) for _ in range(n_mlp)], nn.Linear(d, VOCAB))


def make_batch(mbs: int, gen: torch.Generator
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    t = torch.randint(VOCAB, (mbs, TOKENS + 1), generator=gen)
    keep = (torch.rand(mbs, TOKENS, generator=gen) > 0.1).float()
    return (t[:, :-1].contiguous(), keep), t[:, 1:].reshape(-1).contiguous()


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)
