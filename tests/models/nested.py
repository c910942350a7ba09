"""Layers that hand on nested structures: every boundary is a dict holding the hidden states, an
LSTM's ``(h, c)`` state pair (a tuple inside the dict; the micro-batch in dim 1), a None (no
mask) and a float that every layer reads. Each LSTM layer starts from the previous layer's
final state, so the state's gradient crosses every stage boundary.

``stack`` hands on the same thing as a nested tuple, ``(x, (h, c))``, the way torch's own
``nn.LSTM`` returns it. ``keyed`` takes its batch as a dict (token ids, a mask of the tokens to
read, and a setting), as a model called with ``model(**batch)`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdv.models import ModelDef

VOCAB, TOKENS = 32, 8


class Embed(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.d = d

    def forward(self, ids: torch.Tensor) -> dict:
        zero = self.emb.weight.new_zeros(1, ids.shape[0], self.d)
        return {"x": self.emb(ids), "state": (zero, zero), "mask": None, "scale": 0.5}


class Recurrent(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, d, batch_first=True)

    def forward(self, s: dict) -> dict:
        assert s["mask"] is None
        y, state = self.rnn(s["x"], s["state"])
        return {"x": s["x"] + s["scale"] * y, "state": state, "mask": None,
                "scale": s["scale"]}


class Head(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, VOCAB)

    def forward(self, s: dict) -> torch.Tensor:
        return self.out(self.norm(s["x"] + s["state"][0][-1].unsqueeze(1)))


class TupleEmbed(Embed):
    def forward(self, ids: torch.Tensor) -> tuple:  # type: ignore[override]
        zero = self.emb.weight.new_zeros(1, ids.shape[0], self.d)
        return self.emb(ids), (zero, zero)


class TupleRecurrent(Recurrent):
    def forward(self, x: torch.Tensor, state: tuple) -> tuple:  # type: ignore[override]
        y, (h, c) = self.rnn(x, state)
        return x + y, (h, c)


class TupleHead(Head):
    def forward(self, x: torch.Tensor, state: tuple) -> torch.Tensor:  # type: ignore[override]
        return self.out(self.norm(x + state[0][-1].unsqueeze(1)))


def _batch(rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(VOCAB, (rows, TOKENS + 1), generator=gen)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def net(d: int = 16, depth: int = 3) -> ModelDef:
    """Embedding, `depth` LSTM layers and a head, handing on dicts."""
    layers = [("embed", Embed(d))] + [(f"rnn{i}", Recurrent(d)) for i in range(depth)]
    return ModelDef(layers + [("head", Head(d))], _batch, _loss)


def stack(d: int = 16, depth: int = 3) -> ModelDef:
    """The same, handing on ``(x, (h, c))``."""
    layers = [("embed", TupleEmbed(d))] + [(f"rnn{i}", TupleRecurrent(d)) for i in range(depth)]
    return ModelDef(layers + [("head", TupleHead(d))], _batch, _loss)


class KeyedEmbed(Embed):
    def forward(self, batch: dict) -> dict:  # type: ignore[override]
        assert batch["causal"] is True
        s = super().forward(batch["ids"])
        return {**s, "x": s["x"] * batch["keep"][..., None]}


def _keyed_batch(rows: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    ids, targets = _batch(rows, gen)
    keep = (torch.rand(rows, TOKENS, generator=gen) > 0.2).float()
    return {"ids": ids, "keep": keep, "causal": True}, targets


def keyed(d: int = 16, depth: int = 3) -> ModelDef:
    """`net` with a dict batch: {"ids", "keep", "causal"}."""
    layers = [("embed", KeyedEmbed(d))] + [(f"rnn{i}", Recurrent(d)) for i in range(depth)]
    return ModelDef(layers + [("head", Head(d))], _keyed_batch, _loss)
