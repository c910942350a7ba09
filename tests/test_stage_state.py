"""What a stage's layers carry besides parameters and dense gradients. Recompute and the probe
leave a layer's buffers as one plain forward would (BatchNorm's running statistics and spectral
norm's power-iteration vectors change in a training forward), and sparse gradients are refused
where the optimizer or FSDP takes dense ones only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.utils.parametrizations import spectral_norm

from pdv.boundaries import probe
from pdv.models import ModelDef
from pdv.run.stage import _recompute, _recompute_copying


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "spectral": nn.Sequential(spectral_norm(nn.Linear(8, 8)), nn.Tanh()),
        "batchnorm": nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True)),
        "both": nn.Sequential(nn.BatchNorm1d(8), spectral_norm(nn.Linear(8, 8))),
    }


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("name", sorted(_layers()))
@pytest.mark.parametrize("fn", [_recompute, _recompute_copying])
def test_recompute_sees_and_leaves_the_buffers_of_a_plain_forward(name: str, fn) -> None:  # type: ignore[no-untyped-def]
    """Two micro-batches' forwards, then their backwards (GPipe order): the recomputed layer's
    gradients and buffers equal those of the layer run without recompute."""
    plain = _layers()[name]
    wrapped = checkpoint_wrapper(copy.deepcopy(plain), checkpoint_fn=fn)
    xs = [torch.randn(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    outs = {}
    for label, layer in (("plain", plain), ("recompute", wrapped)):
        ys = [layer(x.clone().requires_grad_()) for x in xs]
        for y in ys:
            (y * torch.arange(8.0)).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        outs[label] = grads, _buffers(layer)
    for a, b in zip(outs["plain"][0], outs["recompute"][0], strict=True):
        torch.testing.assert_close(a, b)
    plain_buffers = outs["plain"][1]
    recomputed = {k.replace("_checkpoint_wrapped_module.", ""): v
                  for k, v in outs["recompute"][1].items()}
    assert plain_buffers.keys() == recomputed.keys()
    for k in plain_buffers:
        torch.testing.assert_close(plain_buffers[k], recomputed[k], msg=k)


def test_the_probe_leaves_every_buffer_as_it_found_it() -> None:
    layers = _layers()
    model = ModelDef(layers=[(n, layers[n]) for n in ("batchnorm", "spectral", "both")],
                     make_batch=lambda rows, gen: (torch.randn(rows, 8, generator=gen),
                                                   torch.zeros(rows)),
                     loss_fn=lambda out, y: out.sum())
    before = {n: _buffers(m) for n, m in model.layers}
    probe(model)
    for n, m in model.layers:
        after = _buffers(m)
        assert after.keys() == before[n].keys()
        for k in after:
            assert torch.equal(after[k], before[n][k]), f"{n}.{k} moved"
    # and a forward does move them: the check above could fail
    model.layers[0][1](torch.randn(4, 8))
    assert not torch.equal(_buffers(model.layers[0][1])["1.running_mean"],
                           before["batchnorm"]["1.running_mean"])


def test_sparse_embedding_gradients_are_refused_where_adamw_or_fsdp_would_take_them() -> None:
    """nn.Embedding(sparse=True) gives sparse gradients: AdamW and FSDP's reduce-scatter take
    dense ones only (a rank's traceback before); SGD with plain replicas runs."""
    from pdv.artifacts import PlanStage
    from pdv.errors import PdvError
    from pdv.run.stage import check_sparse_grads

    def model(sparse: bool) -> ModelDef:
        return ModelDef(layers=[("bag", nn.EmbeddingBag(50, 8, sparse=sparse)),
                                ("head", nn.Linear(8, 3))],
                        make_batch=lambda rows, gen: (torch.randint(50, (rows, 4)),
                                                      torch.zeros(rows, dtype=torch.long)),
                        loss_fn=nn.functional.cross_entropy)

    replicas = [PlanStage(layers=[0, 1], ranks=[0, 1], dp=2), PlanStage(layers=[1, 2], ranks=[2])]
    sharded = [PlanStage(layers=[0, 1], ranks=[0, 1], dp=2, fsdp=True),
               PlanStage(layers=[1, 2], ranks=[2])]
    with pytest.raises(PdvError, match=r"layer 0 'bag' has an embedding with sparse=True: .*"
                       r"AdamW"):
        check_sparse_grads(model(True), replicas, "adamw")
    with pytest.raises(PdvError, match=r"stage 0 shards with FSDP"):
        check_sparse_grads(model(True), sharded, "sgd")
    check_sparse_grads(model(True), replicas, "sgd")
    check_sparse_grads(model(False), sharded, "adamw")
