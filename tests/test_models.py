"""The sample models: they train, their layers chain, their TP shards and plans are right."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from pdv.models import ModelDef, build_model

torch.set_num_threads(1)

TRAINABLE = [
    "mlp",
    "gpt_tiny",
    "convnet",
]


def _build(spec: str, **kwargs: object) -> ModelDef:
    return build_model(spec, dict(kwargs))


@pytest.mark.parametrize("spec", TRAINABLE)
def test_sample_model_trains(spec: str) -> None:
    model = _build(spec)
    net = model.sequential()
    x, y = model.make_batch(4, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = model.loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("spec", TRAINABLE)
def test_layer_chain_equals_whole_model(spec: str) -> None:
    model = _build(spec)
    x, _ = model.make_batch(3, torch.Generator().manual_seed(1))
    h = x
    for _, layer in model.layers:
        h = layer(h)
    whole = model.sequential()(x)
    cut = len(model.layers) // 2
    halves = model.sequential(cut)(model.sequential(0, cut)(x))
    torch.testing.assert_close(h, whole)
    torch.testing.assert_close(halves, whole)


def test_gpt_layers_named_and_shaped() -> None:
    model = _build("gpt_tiny", n_layer=3)
    names = [name for name, _ in model.layers]
    assert names == ["embed", "block0", "block1", "block2", "head"]
    x, y = model.make_batch(2, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (2, 32) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the next tokens
    logits = model.sequential()(x)
    assert logits.shape == (2, 32, 512)
    # GPT-2 init: the first loss is close to that of a uniform guess, ln(vocab).
    assert abs(model.loss_fn(logits, y).item() - math.log(512)) < 0.2


def test_gpt_attention_is_causal() -> None:
    model = _build("gpt_tiny")
    x, _ = model.make_batch(1, torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[0, 20] = (x[0, 20] + 1) % 512
    net = model.sequential()
    a, b = net(x), net(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_gpt_tp_shard_shapes_and_degrees() -> None:
    model = _build("gpt_tiny")  # d 64, 4 heads, MLP 256
    assert tuple(model.tp_degrees) == (1, 2, 4)
    assert model.tp_shard is not None and model.tp_plan is not None
    block = model.layers[1][1]
    shard = model.tp_shard(1, block, 2)
    assert shard.attn.q.weight.shape == (32, 64)
    assert shard.attn.proj.weight.shape == (64, 32)
    assert shard.mlp.fc.weight.shape == (128, 64)
    assert shard.mlp.proj.weight.shape == (64, 128)
    h = torch.randn(2, 32, 64)
    assert shard(h).shape == (2, 32, 64)
    assert model.tp_shard(0, model.layers[0][1], 2) is model.layers[0][1]
    assert model.tp_plan(0, model.layers[0][1]) == {}
    assert set(model.tp_plan(1, block)) == {
        "attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"}
    assert set(_build("gpt3_175b", n_layer=1, d_model=96, seq_len=8,
                      vocab_size=16).tp_degrees) == {1, 2, 3, 4, 6, 8}


def test_convnet_has_no_tp_plan() -> None:
    model = _build("convnet")
    assert model.tp_plan is None and model.tp_shard is None
    assert [n for n, _ in model.layers] == ["stem", "conv0", "conv1", "conv2", "head"]


def test_gpt3_175b_builds_on_meta_without_memory() -> None:
    with torch.device("meta"):
        model = _build("gpt3_175b")
    params = [p for _, layer in model.layers for p in layer.parameters()]
    assert all(p.device.type == "meta" for p in params)
    n = sum(p.numel() for p in params)
    assert abs(n - 175e9) / 175e9 < 0.01, n
    assert len(model.layers) == 98


def test_named_configs_override() -> None:
    with torch.device("meta"):
        small = _build("gpt_small", seq_len=64)
    assert small.layers[0][1].pos.weight.shape == (64, 768)
    assert len(small.layers) == 14


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = build_model("gpt_tiny")
        x, _ = model.make_batch(2, torch.Generator().manual_seed(0))
        h = model.layers[0][1](x).detach()
        block = model.layers[1][1]
        expected = block(h).detach()
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(block, mesh, model.tp_plan(1, block))
        got = block(h)
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        out[rank] = float((got - expected).abs().max())
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_gpt_tp_plan_matches_unsharded_block() -> None:
    """Two gloo ranks run a block under the model's TP plan; the output equals the plain block."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_tp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        errors = dict(out)
    assert sorted(errors) == [0, 1]
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("spec", TRAINABLE)
def test_builds_on_meta_and_batches_stay_on_cpu(spec: str) -> None:
    """--estimate builds under torch.device("meta"); batches must still be real CPU tensors."""
    with torch.device("meta"):
        model = _build(spec)
        x, y = model.make_batch(2, torch.Generator().manual_seed(0))
    assert all(p.device.type == "meta" for _, layer in model.layers for p in layer.parameters())
    assert x.device.type == y.device.type == "cpu" and x.shape[0] == y.shape[0] == 2
