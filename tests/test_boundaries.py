"""The shape probe: what counts as a batched value, a fixed table, or a value the wire cannot
carry, for dim 0 laid out every way a model lays it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdv.boundaries import BoundaryError, in_place_writers, input_values, probe
from pdv.models import ModelDef, build_model
from tests.models import shared_in_place


class Lambda(nn.Module):
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, *xs: torch.Tensor):  # type: ignore[no-untyped-def]
        return self.fn(*xs)


def _model(*fns) -> ModelDef:  # type: ignore[no-untyped-def]
    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(mbs, 6, 4, generator=gen), torch.zeros(mbs)

    return ModelDef(layers=[(f"l{i}", Lambda(f)) for i, f in enumerate(fns)],
                    make_batch=make_batch, loss_fn=lambda out, y: out.sum())


@pytest.mark.parametrize("factor", [1, 2, 6, 7])
def test_dim_0_a_fixed_multiple_of_the_rows_is_batched(factor: int) -> None:
    model = _model(lambda x: x.repeat_interleave(factor, dim=0).flatten(1), lambda h: h * 2)
    first, last = probe(model)
    for b in (first, last):
        (v,) = b.values
        assert v.batched and v.row_factor == factor and v.shape == (24,)
        assert v.full_shape(5) == (5 * factor, 24)
        assert v.sample_rows(1, 3) == slice(factor, 3 * factor)


def test_flattened_tokens_keep_each_sample_in_consecutive_rows() -> None:
    model = build_model("tests/models/flat_tokens.py:net", {"d": 8})
    boundaries = probe(model)
    tokens = 10  # flat_tokens.TOKENS
    assert [b.values[0].row_factor for b in boundaries] == [1, 1] + [tokens] * 4
    (ids, keep), _ = model.make_batch(3, torch.Generator().manual_seed(0))
    chain = model.sequential(0, 3)
    h = chain(ids, keep)
    rows = boundaries[2].values[0].sample_rows(1, 2)
    # sample 1 alone through the same layers gives the rows the slice picks
    alone = chain(ids[1:2], keep[1:2])
    torch.testing.assert_close(h[rows], alone)


def test_a_table_no_multiple_explains_is_fixed_and_a_ragged_dim_0_is_refused() -> None:
    # (6, 4) at every size: 6 is 3 rows of 2 and 2 rows of 3, so no one factor fits
    (v,) = probe(_model(lambda x: x[0]))[0].values
    assert not v.batched and v.full_shape(5) == (6, 4)
    # one row more than a multiple: neither batched nor fixed
    with pytest.raises(BoundaryError, match="shape changes between micro-batches"):
        probe(_model(lambda x: torch.cat([x, x[:1]]).reshape(-1, 4)))


def _flat_hook(step: int, batch_size: int, seed: int):  # type: ignore[no-untyped-def]
    t = torch.arange(batch_size * 11).reshape(batch_size, 11) % 53
    return (t[:, :-1].contiguous(), torch.ones(batch_size, 10)), t[:, 1:].reshape(-1)


def _short_hook(step: int, batch_size: int, seed: int):  # type: ignore[no-untyped-def]
    x, y = _flat_hook(step, batch_size, seed)
    return x, y[:-1]


def _ragged_hook(step: int, batch_size: int, seed: int):  # type: ignore[no-untyped-def]
    (ids, keep), y = _flat_hook(step, batch_size, seed)
    return (ids, keep[:-1]), y


def test_a_data_hook_may_flatten_its_targets_by_whole_samples() -> None:
    from pdv.errors import PdvError
    from pdv.run.data import BatchSource, micro_batch_rows

    model = build_model("tests/models/flat_tokens.py:net", {"d": 8})
    (ids, keep), y = BatchSource(model, 8, 0, f"{__file__}:_flat_hook").global_batch(0)
    assert ids.shape == keep.shape == (8, 10) and y.shape == (80,)
    # replica 1 of 2, micro-batches of 4: samples 2, 3 and 6, 7, each with its 10 tokens
    mine = micro_batch_rows(y, 2, 2, 1)
    assert torch.equal(mine, torch.cat([y[20:40], y[60:80]]))
    with pytest.raises(PdvError, match=r"targets must be a tensor with 8 rows .*multiple"):
        BatchSource(model, 8, 0, f"{__file__}:_short_hook").global_batch(0)
    # every input has the global batch's rows, a mask too
    with pytest.raises(PdvError, match=r"inputs must be a tensor with 8 rows .*got \(7, 10\)"):
        BatchSource(model, 8, 0, f"{__file__}:_ragged_hook").global_batch(0)


def test_inputs_are_a_tensor_or_a_tuple_of_tensors_with_the_rows_in_dim_0() -> None:
    model = build_model("tests/models/flat_tokens.py:net", {"d": 8})
    inputs = input_values(model.make_batch(4, torch.Generator().manual_seed(0))[0])
    assert [(v.dtype, v.shape, v.batched) for v in inputs] == [
        (torch.int64, (10,), True), (torch.float32, (10,), True)]
    make = model.make_batch
    model.make_batch = lambda rows, gen: ((make(rows, gen)[0][0], 0.5), None)  # type: ignore
    with pytest.raises(BoundaryError, match=r"make_batch\(2, ...\) gives inputs \(tensor "
                       r"\(2, 10\), float\); inputs are a tensor or a tuple of tensors"):
        probe(model)


def test_the_probe_marks_what_the_next_layer_writes_into_in_place() -> None:
    """A value some layer writes into (ReLU(inplace=True), mul_) is marked on the boundary that
    hands it on; a layer that only reads, or writes into its own fresh output, marks nothing."""
    model = build_model("tests/models/shared_in_place.py:net", {})
    found = probe(model)
    assert [b.overwritten for b in found] == [False, True, False, True, False, True, False, False]
    assert in_place_writers(found) == {2, 4, 6}
    fresh = _model(lambda x: x * 2, lambda x: (x + 1).relu_(), lambda x: x.sum(dim=(1, 2)))
    assert in_place_writers(probe(fresh)) == frozenset()


def test_a_module_at_several_places_of_a_sequential_is_a_layer_at_each() -> None:
    """nn.Module.named_children() yields a module once; the Sequential runs it at each place."""
    model = build_model("tests/models/shared_in_place.py:net", {})
    assert len(model.layers) == 8
    assert model.layers[1][1] is model.layers[3][1] is model.layers[5][1]
    assert [sorted({i for i, _ in g}) for g in model.tied_groups()] == [[1, 3, 5], [1, 3, 5]]
    assert len(model.layers) == len(shared_in_place.net())


@pytest.mark.parametrize("targets, ok", [
    (lambda n: torch.zeros(n), True),
    (lambda n: torch.zeros(n * 7, dtype=torch.long), True),  # tokens flattened into dim 0
    (lambda n: (torch.zeros(n), torch.ones(n)), False),  # labels and weights, not stacked
    (lambda n: torch.tensor(1.0), False),
    (lambda n: torch.zeros(n + 1), False),
])
def test_targets_are_one_tensor_with_the_rows_in_dim_0(targets, ok: bool) -> None:  # type: ignore[no-untyped-def]
    model = _model(lambda x: x.sum(dim=2))

    def make_batch(mbs: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
        return torch.randn(mbs, 6, 4, generator=gen), targets(mbs)

    model.make_batch = make_batch
    if ok:
        assert len(probe(model)) == 1
    else:
        with pytest.raises(BoundaryError, match="targets are one tensor"):
            probe(model)
