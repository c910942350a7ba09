"""Nested boundaries: a layer's dict, (out, (h, c)) or None crosses a stage boundary as the flat
tuple of its tensors, and the next layer gets the structure back."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch

from pdv.boundaries import BoundaryError, probe
from pdv.models import build_model
from pdv.nesting import nesting_of
from pdv.profile.layers import profile_model
from pdv.profile.request import ProfileRequest
from tests.test_boundaries import _model

NESTED = ("tests/models/nested.py:net", "tests/models/nested.py:stack")


@pytest.mark.parametrize("spec", NESTED)
def test_every_cut_of_a_nested_model_gives_the_whole_models_loss_and_gradients(spec: str) -> None:
    """Each stage boundary receives only the flat tensors, as a stage in another process does;
    the two halves' forward and backward must be the whole model's."""
    model = build_model(spec, {"d": 8, "depth": 3})
    boundaries = probe(model)
    # the states (h, c) travel beside the hidden states, the micro-batch in their dim 1
    assert [len(b.values) for b in boundaries] == [3, 3, 3, 3, 1]
    assert [v.batch_dim for v in boundaries[1].values] == [0, 1, 1]
    assert all(v.requires_grad for v in boundaries[1].values)
    x, y = model.make_batch(4, torch.Generator().manual_seed(3))
    params = [p for _, layer in model.layers for p in layer.parameters()]

    def grads_of(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    whole = model.loss_fn(model.sequential()(x), y)
    want = grads_of(whole)
    for cut in range(1, len(model.layers)):
        sent = model.sequential(0, cut)(x)
        sent = sent if isinstance(sent, tuple) else (sent,)
        assert all(isinstance(t, torch.Tensor) for t in sent)
        assert len(sent) == len(boundaries[cut - 1].values)
        received = tuple(t.detach().requires_grad_(t.requires_grad) for t in sent)
        loss = model.loss_fn(model.sequential(cut)(*received), y)
        assert torch.equal(loss, whole)
        # the back half's gradients, then the front half's from the received ones
        back = torch.autograd.grad(loss, [*params, *[r for r in received if r.requires_grad]],
                                   allow_unused=True)
        sends = [s for s, r in zip(sent, received, strict=True) if r.requires_grad]
        upstream = [torch.zeros_like(s) if g is None else g
                    for s, g in zip(sends, back[len(params):], strict=True)]
        front = torch.autograd.grad(sends, params, upstream, allow_unused=True)
        for g, b, f in zip(want, back[:len(params)], front, strict=True):
            got = (torch.zeros_like(g) if b is None else b) + (0 if f is None else f)
            torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-6)


def test_a_setting_beside_the_tensors_is_kept_and_one_that_changes_is_refused() -> None:
    kept = _model(lambda x: (x, None, {"scale": 2.0, "h": x * 3}),
                  lambda x, m, d: x * d["scale"] + d["h"] if m is None else x,
                  lambda x: x)
    b = probe(kept)
    assert [len(v.values) for v in b] == [2, 1, 1]
    x = torch.randn(2, 5)
    front = kept.sequential(0, 1)(x)
    assert isinstance(front, tuple) and len(front) == 2
    torch.testing.assert_close(kept.sequential(1)(*front), x * 5)
    changing = _model(lambda x: (x, x.sum().item()), lambda x, s: x * s, lambda x: x)
    with pytest.raises(BoundaryError, match=r"layer 0 'l0' hands on -?[0-9.]+ where it handed "
                       r"on -?[0-9.]+.*must be the same every micro-batch"):
        probe(changing)


def test_a_structure_that_changes_or_holds_no_tensor_is_refused() -> None:
    shifting = _model(lambda x: (x, (x,)) if x.shape[0] == 2 else (x, [x]),
                      lambda x, s: x + s[0], lambda x: x)
    with pytest.raises(BoundaryError, match="layer 0 'l0' hands on a different structure"):
        probe(shifting)
    empty = _model(lambda x: x, lambda x: (None, 3), lambda *a: torch.zeros(2))
    with pytest.raises(BoundaryError, match="layer 1 'l1' hands on no tensor"):
        probe(empty)
    last = _model(lambda x: x, lambda x: {"logits": x})
    with pytest.raises(BoundaryError, match="layer 1 'l1' hands on a dict"):
        probe(last)


def test_flat_outputs_are_not_nested() -> None:
    t = torch.zeros(1)
    assert nesting_of(t) is None and nesting_of((t, t)) is None and nesting_of([t]) is None
    nested = nesting_of((t, (t, None)))
    assert nested is not None and nested.tensors == 2
    back = nested.unflatten((t, t + 1))
    assert back[1][1] is None and torch.equal(back[1][0], t + 1)


@pytest.mark.parametrize("spec", NESTED)
def test_the_estimate_hands_a_nested_boundary_on_as_the_probe_does(spec: str) -> None:
    est = profile_model(ProfileRequest(spec=spec, micro_batch_sizes=(2, 3), estimate=True,
                                       device_flops=1e12))
    seen = probe(build_model(spec))
    assert [(x.output_tensors, x.output_grad_tensors) for x in est.layers] == [
        (len(b.values), sum(v.requires_grad for v in b.values)) for b in seen]
    assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in est.layers)


def test_a_sequential_written_for_torch_hands_a_tuple_on_whole_at_every_cut() -> None:
    """nn.Sequential passes a child's tuple to the next child as one argument. pdv passes a
    tuple's elements as arguments where the next layer takes them so (its own models, a
    batch's inputs), and whole where it takes one: the stages must compute what torch's own
    nn.Sequential computes, from the flat tensors that cross each cut."""
    from tests.models import torch_seq

    spec = "tests/models/torch_seq.py:net"
    model = build_model(spec)
    boundaries = probe(model)
    assert [len(b.values) for b in boundaries] == [1, 3, 1, 1, 2, 1, 1]
    torch.manual_seed(0)
    own = torch_seq.net()  # the same seed as build_model's
    x, _ = model.make_batch(3, torch.Generator().manual_seed(5))
    want = own(x)
    for cut in range(1, len(model.layers)):
        sent = model.sequential(0, cut)(x)
        sent = sent if isinstance(sent, tuple) else (sent,)
        assert torch.equal(model.sequential(cut)(*sent), want), cut
    est = profile_model(ProfileRequest(spec=spec, micro_batch_sizes=(2,), estimate=True,
                                       device_flops=1e12))
    assert [x.output_tensors for x in est.layers][:-1] == [len(b.values) for b in boundaries][:-1]


def test_a_layer_that_fails_both_ways_reports_the_first() -> None:
    broken = _model(lambda x: (x, x), lambda a, b: a @ torch.zeros(3, 3), lambda x: x)
    with pytest.raises(BoundaryError, match=r"layer 1 'l1' fails on what the layer before "
                       r"hands on .*RuntimeError.*or the tuple as one"):
        probe(broken)


class _Pair(NamedTuple):
    h: torch.Tensor
    gate: torch.Tensor


@dataclasses.dataclass
class _State:
    h: torch.Tensor
    steps: int


def test_a_named_tuple_and_a_dataclass_reach_the_next_layer_as_themselves() -> None:
    """Their fields are read by name: the next stage must get a _Pair, a _State, not a tuple
    (and the dataclass's int stays behind)."""
    x = torch.randn(2, 5)
    cases = [
        (lambda t: _Pair(t, t.sigmoid()), lambda p: p.h * p.gate, x * x.sigmoid(), 2),
        (lambda t: _Pair(t, t.sigmoid()), lambda h, g: h - g, x - x.sigmoid(), 2),
        (lambda t: _State(t * 2, 3), lambda s: s.h * s.steps, x * 6, 1),
    ]
    for make, take, want, sent_count in cases:
        model = _model(make, take, lambda t: t)
        assert [len(b.values) for b in probe(model)] == [sent_count, 1, 1]
        sent = model.sequential(0, 1)(x)
        sent = sent if isinstance(sent, tuple) else (sent,)
        assert type(sent) is tuple and len(sent) == sent_count
        torch.testing.assert_close(model.sequential(1)(*sent), want)


def test_a_dict_batch_is_split_and_sent_as_its_tensors_and_the_first_layer_gets_the_dict(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """make_batch may give a dict (a model called as model(**batch)): every consumer gets its
    tensors flat, micro-batches and replicas cut them by rows, and the first layer the dict;
    a data hook's dict is flattened alike, and a setting in it that changes is refused."""
    from pdv.errors import PdvError
    from pdv.run.data import BatchSource

    spec = "tests/models/nested.py:keyed"
    model = build_model(spec, {"d": 8})
    x, y = model.make_batch(4, torch.Generator().manual_seed(2))
    assert type(x) is tuple and [t.shape for t in x] == [(4, 8), (4, 8)]
    assert [len(b.values) for b in probe(model)][0] == 3
    whole = model.sequential()(*x)
    halves = [model.sequential()(*(t[lo:lo + 2] for t in x)) for lo in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole)
    hook = tmp_path / "data.py"
    hook.write_text(
        "import torch\n"
        "def data(step, batch_size, seed, causal=True):\n"
        "    g = torch.Generator().manual_seed(step)\n"
        "    ids = torch.randint(32, (batch_size, 9), generator=g)\n"
        "    keep = torch.ones(batch_size, 8)\n"
        "    return {'ids': ids[:, :-1], 'keep': keep, 'causal': causal}, ids[:, 1:]\n"
        "def acausal(step, batch_size, seed):\n"
        "    return data(step, batch_size, seed, causal=False)\n")
    got, _ = BatchSource(model, 4, 0, f"{hook}:data").global_batch(1)
    assert type(got) is tuple and len(got) == 2
    with pytest.raises(PdvError, match="hands on False where it handed on True"):
        BatchSource(model, 4, 0, f"{hook}:acausal").global_batch(1)
