"""A ModelDef whose blocks take extra inputs, handed on as a tuple from layer to layer: token
positions (int64, per sample, no gradient) and a position table without a micro-batch dim;
its LM head is tied to the token embedding (the first and last layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdv.models import ModelDef

VOCAB, SEQ = 61, 9


class Embed(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.d = d

    def forward(self, ids: torch.Tensor):
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1).contiguous()
        table = torch.sin(torch.arange(ids.shape[1])[:, None] / (1.0 + torch.arange(self.d)))
        return self.tok(ids), positions, table


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.pos = nn.Embedding(SEQ, d)
        self.ff = nn.Linear(d, d)

    def forward(self, h, positions, table):
        return h + torch.tanh(self.ff(h + self.pos(positions) * table)), positions, table


class Head(nn.Module):
    def __init__(self, embed: Embed) -> None:
        super().__init__()
        self.out = nn.Linear(embed.d, VOCAB, bias=False)
        self.out.weight = embed.tok.weight  # tied

    def forward(self, h, positions, table):
        return self.out(h)


def carry(n_block: int = 3, d: int = 16) -> ModelDef:
    embed = Embed(d)
    layers = [("embed", embed)] + [(f"block{i}", Block(d)) for i in range(n_block)]
    layers.append(("head", Head(embed)))

    def make_batch(mbs: int, gen: torch.Generator):
        t = torch.randint(VOCAB, (mbs, SEQ + 1), generator=gen)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=loss_fn)
