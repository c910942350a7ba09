"""A layer with sparse gradients (an embedding with sparse=True) is never in an FSDP stage:
FSDP reduces dense gradients only, and `pdv run` refuses such a stage."""

from __future__ import annotations

import pytest

from pdv.artifacts import LayerChoice, ModelProfile
from pdv.errors import PdvError
from pdv.plan.objective import stage_table
from pdv.plan.problem import PlanProblem, StageSpec
from pdv.plan.search import search
from pdv.plan.sharding import _layer_options
from tests.plan_fixtures import GiB, cluster, profile


def _problem(sparse: set[int], memory_gib: int = 4, n: int = 8) -> PlanProblem:
    base = profile(n_layers=4, param_bytes=1 << 30, act_bytes=1 << 20, out_bytes=1 << 20,
                   tp_degrees=(1,))
    layers = [x.model_copy(update={"sparse_grads": i in sparse}) for i, x in enumerate(base.layers)]
    prof = ModelProfile.model_validate({**base.model_dump(), "layers": [x.model_dump()
                                                                         for x in layers]})
    return PlanProblem(profiles={"gpu": prof}, cluster=cluster(["h0"] * n, [[1e11] * n] * n,
                                                               memory=memory_gib * GiB),
                       global_batch=8)


@pytest.mark.parametrize("sparse", [{0}, {2}, {1, 3}])
def test_fsdp_prices_no_range_that_holds_a_sparse_layer(sparse: set[int]) -> None:
    problem = _problem(sparse)
    assert problem.sparse_layers == frozenset(sparse)
    sharded = stage_table(problem, (0, 1), 2, LayerChoice(fsdp=True)).time
    plain = stage_table(problem, (0, 1), 2, LayerChoice()).time
    for lo in range(4):
        for hi in range(lo + 1, 5):
            holds = any(lo <= i < hi for i in sparse)
            assert (sharded[lo, hi] == float("inf")) == holds, (lo, hi)
            assert plain[lo, hi] < float("inf")
    for lo, hi in ((0, 1), (1, 3), (2, 4)):
        spec = StageSpec(lo, hi, (0, 1), LayerChoice())
        fsdp = {c.fsdp for c in _layer_options(problem, spec)}
        assert fsdp == ({False} if any(lo <= i < hi for i in sparse) else {False, True})


def test_a_model_whose_only_fitting_plans_shard_its_sparse_layer_gets_a_reason() -> None:
    """Layers of 4 GiB of state on ranks of 4 GiB fit only under FSDP: the dense model is
    planned sharded everywhere, the one with a sparse layer is refused naming it."""
    dense = search(_problem(set()), top=1).plans[0]
    assert all(s.fsdp for s in dense.stages)
    with pytest.raises(PdvError, match=r"layer 0 \(layer0\) fits no stage.*fsdp=False.*"
                       r"gradients are sparse"):
        search(_problem({0}), top=1)
    # with room for an unsharded layer, the sparse layer's stage is plain replicas
    roomy = search(_problem({0}, memory_gib=6), top=3)
    for plan in roomy.plans:
        for s in plan.stages:
            if s.layers[0] == 0:
                assert not s.fsdp and not any(c.fsdp for c in s.layer_sharding or ())


def test_a_dense_layer_writes_no_sparse_field() -> None:
    """Profiles of dense models keep the bytes (and digests) they had before the field."""
    prof = profile(n_layers=2)
    assert "sparse_grads" not in prof.layers[0].model_dump_json()
    marked = prof.layers[0].model_copy(update={"sparse_grads": True})
    assert '"sparse_grads":true' in marked.model_dump_json()


BAG = """
import torch
from torch import nn

def net():
    return nn.Sequential(nn.EmbeddingBag(40, 8, sparse=True), nn.Linear(8, 8), nn.Linear(8, 3))

def make_batch(rows, gen):
    return torch.randint(40, (rows, 5), generator=gen), torch.randint(3, (rows,), generator=gen)

def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)
"""


def test_the_profiler_marks_the_layers_whose_gradients_are_sparse(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from tests.conftest import run_pdv

    (tmp_path / "bag.py").write_text(BAG)
    out = tmp_path / "p.json"
    res = run_pdv("profile", "model", f"{tmp_path / 'bag.py'}:net", "--micro-batch-sizes", "2",
                  "--repeat", "1", "--warmup", "0", "--optimizer", "sgd", "-o", str(out))
    assert res.returncode == 0, res.stderr
    layers = json.loads(out.read_text())["layers"]
    assert [x.get("sparse_grads", False) for x in layers] == [True, False, False]
