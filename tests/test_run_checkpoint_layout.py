"""Checkpoint keys do not depend on the layout: one process (a world of one) saves under one
split of a model and loads under another, tied weights included."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from pdv.run.checkpoint import Checkpointer
from pdv.run.resume import CheckpointMeta


def _layers(seed: int) -> tuple[nn.Embedding, nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Embedding(8, 4), nn.Linear(4, 4), nn.Linear(4, 8, bias=False)


def _meta() -> CheckpointMeta:
    from pdv.artifacts import ModelSpec

    return CheckpointMeta(step=1, model=ModelSpec(spec="x"), tensors={}, global_batch_size=2,
                          num_micro_batches=1, seed=0, optimizer="adamw", lr=1e-3,
                          plan_digest="sha256:x", loss=[1.0], step_times_s=[0.1])


def test_a_tied_weight_saved_once_loads_as_two_copies(tmp_path: Path, world_of_one: None) -> None:
    embed, mid, head = _layers(0)
    head.weight = embed.weight  # tied: one parameter, two names
    one = nn.Sequential(OrderedDict(embed=embed, mid=mid, head=head))
    opt = torch.optim.AdamW(one.parameters())
    one(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    saver = Checkpointer(str(tmp_path), 1, {0: one}, opt)
    saver.save(1, _meta())
    assert (tmp_path / "latest").read_text() == "step-1\n"

    # Another layout: the tied layers in two stages, each with its own copy.
    embed2, mid2, head2 = _layers(1)
    first = nn.Sequential(OrderedDict(embed=embed2))
    second = nn.Sequential(OrderedDict(mid=mid2, head=head2))
    opt2 = torch.optim.AdamW([*first.parameters(), *second.parameters()])
    loader = Checkpointer(str(tmp_path), 1, {0: first, 3: second}, opt2)
    loader.load(tmp_path / "step-1")
    assert torch.equal(embed2.weight, embed.weight) and torch.equal(head2.weight, embed.weight)
    assert torch.equal(mid2.bias, mid.bias)
    moment = opt.state[embed.weight]["exp_avg"]
    assert torch.equal(opt2.state[embed2.weight]["exp_avg"], moment)
    assert torch.equal(opt2.state[head2.weight]["exp_avg"], moment)
