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
        t = torch.arange(5 * factor)[:, None].expand(-1, 24)
        assert torch.equal(v.take(t, 1, 3)[:, 0], torch.arange(factor, 3 * factor))


def test_flattened_tokens_keep_each_sample_in_consecutive_rows() -> None:
    model = build_model("tests/models/flat_tokens.py:net", {"d": 8})
    boundaries = probe(model)
    tokens = 10  # flat_tokens.TOKENS
    assert [b.values[0].row_factor for b in boundaries] == [1, 1] + [tokens] * 4
    (ids, keep), _ = model.make_batch(3, torch.Generator().manual_seed(0))
    chain = model.sequential(0, 3)
    h = chain(ids, keep)
    # sample 1 alone through the same layers gives the rows the value's layout picks
    alone = chain(ids[1:2], keep[1:2])
    torch.testing.assert_close(boundaries[2].values[0].take(h, 1, 2), alone)


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


def _alone(model: ModelDef, rows: int, lo: int, hi: int, layer: int) -> tuple[
        tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """What `layer` hands on for a batch of `rows` samples, and for samples [lo, hi) alone."""
    from pdv.models import as_args

    x, _ = model.make_batch(rows, torch.Generator().manual_seed(3))
    chain = model.sequential(0, layer + 1).eval()
    with torch.no_grad():
        whole = as_args(chain(*as_args(x)))
        part = as_args(chain(*(t[lo:hi] for t in as_args(x))))
    return whole, part


def test_sequence_first_values_are_batched_in_dim_1_and_cut_by_samples() -> None:
    """torch's batch_first=False layout: (tokens, batch, d) and an LSTM's (1, batch, h) state
    hold the micro-batch in dim 1; a time-major flatten strides each sample's rows. Every
    value's take() picks what its samples give alone, and join() undoes take()."""
    model = build_model("tests/models/seq_first.py:net", {"d": 8})
    found = probe(model)
    layout = [[(v.batch_dim, v.row_factor, v.interleaved) for v in b.values] for b in found]
    assert layout == [[(1, 1, False)]] * 3 + [[(1, 1, False)] * 3] + [[(1, 1, False)]] + \
        [[(0, 6, True)]] * 2 + [[(0, 1, False)]]
    assert all(v.separable for b in found for v in b.values)
    for b in found:
        for lo, hi in ((0, 2), (2, 5), (4, 5)):
            whole, part = _alone(model, 5, lo, hi, b.layer)
            for v, w, p in zip(b.values, whole, part, strict=True):
                assert v.full_shape(5) == tuple(w.shape)
                torch.testing.assert_close(v.take(w, lo, hi), p, rtol=1e-4, atol=1e-5)
        whole, _ = _alone(model, 5, 0, 5, b.layer)
        for v, w in zip(b.values, whole, strict=True):
            pieces = [v.take(w, lo, hi) for lo, hi in ((0, 1), (1, 3), (3, 5))]
            assert torch.equal(v.join(pieces), w)


def test_a_value_whose_samples_are_not_where_its_shape_says_is_not_separable() -> None:
    # each row minus the batch's mean: the shape is (rows, 6, 4), but rows mix samples
    (v,) = probe(_model(lambda x: x - x.mean(0), lambda x: x.sum(2)))[0].values
    assert v.batched and not v.separable
    # the batch's rows reversed: each sample's row, somewhere else
    (v,) = probe(_model(lambda x: x.flip(0), lambda x: x.sum(2)))[0].values
    assert v.batched and not v.separable
    # rows regrouped (2, rows·3, 4): dim 1 holds 3 entries per sample, consecutive per half
    (v,) = probe(_model(lambda x: x.reshape(-1, 2, 4).transpose(0, 1), lambda x: x.sum(2))
                 )[0].values
    assert v.batched and v.batch_dim == 1 and v.row_factor == 3 and v.separable
    assert not v.interleaved


def test_a_strided_last_value_with_flattened_targets_is_refused() -> None:
    """Micro-batches cut targets by samples in order: a time-major (tokens · batch, vocab)
    output would meet other samples' targets."""
    def make_batch(mbs: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
        return torch.randn(mbs, 6, 4, generator=gen), torch.zeros(mbs * 6, dtype=torch.long)

    model = _model(lambda x: x.transpose(0, 1).reshape(-1, 4))
    model.make_batch = make_batch
    with pytest.raises(BoundaryError, match="strided across the micro-batch"):
        probe(model)
    batch_first = _model(lambda x: x.reshape(-1, 4))
    batch_first.make_batch = make_batch
    (b,) = probe(batch_first)
    assert b.values[0].row_factor == 6 and not b.values[0].interleaved


def test_stages_of_different_widths_refuse_to_cut_a_value_they_cannot_find_samples_in() -> None:
    from pdv.artifacts import Plan
    from pdv.errors import PdvError
    from pdv.run.dims import ParallelDims
    from pdv.run.widths import check_separable

    found = probe(_model(lambda x: x * 2, lambda x: x - x.mean(0), lambda x: x.sum(2)))
    # once mixed, every later value is mixed too
    assert [v.separable for b in found for v in b.values] == [True, False, False]

    def dims(cut: int, dp: int) -> ParallelDims:
        return ParallelDims.from_plan(Plan.model_validate({
            "schema": "pdv.plan/v1", "micro_batch_size": 4, "num_micro_batches": 2,
            "global_batch_size": 8, "schedule": "GPipe",
            "stages": [{"layers": [0, cut], "ranks": [0, 1], "dp": 2},
                       {"layers": [cut, 3], "ranks": [2, 3][:dp], "dp": dp}]}), 3)

    check_separable(dims(1, 1), found)  # cut where samples sit in order
    check_separable(dims(2, 2), found)  # same widths: nothing is cut
    with pytest.raises(PdvError, match=r"stages 0 and 1 have different widths.*layer 1 'l1'"):
        check_separable(dims(2, 1), found)


MIXING = """
import torch
from torch import nn

class Mix(nn.Module):
    def forward(self, x):
        return x - x.mean(0)

def net():
    return nn.Sequential(nn.Linear(6, 6), Mix(), nn.Linear(6, 6), nn.Linear(6, 2))

def make_batch(rows, gen):
    return torch.randn(rows, 6, generator=gen), torch.randint(2, (rows,), generator=gen)

def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)
"""


def test_pdv_run_refuses_to_cut_a_mixed_value_before_launching(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from tests.conftest import run_pdv

    (tmp_path / "mix.py").write_text(MIXING)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "schema": "pdv.plan/v1", "micro_batch_size": 4, "num_micro_batches": 2,
        "global_batch_size": 8, "schedule": "GPipe",
        "stages": [{"layers": [0, 2], "ranks": [0, 1], "dp": 2},
                   {"layers": [2, 4], "ranks": [2]}]}))
    res = run_pdv("run", str(plan), "--model", f"{tmp_path / 'mix.py'}:net", "--steps", "1")
    assert res.returncode == 2
    assert "stages 0 and 1 have different widths" in res.stderr
    assert "torchrun" not in res.stderr  # refused before any rank started
