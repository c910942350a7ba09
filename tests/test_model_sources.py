"""Model sources and bad model input: adapters reproduce the models they adapt, and what cannot
run is one line and exit 2 naming the fix (before anything is launched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdv.boundaries import probe
from pdv.errors import PdvError
from pdv.models import build_model
from tests.conftest import run_pdv


def test_hf_adapters_equal_the_transformers_models() -> None:
    transformers = pytest.importorskip("transformers")
    from pdv.adapters import hf

    for family, cls in (("llama", transformers.LlamaForCausalLM),
                        ("gpt2", transformers.GPT2LMHeadModel)):
        kwargs = {"seq_len": 7}
        model = build_model(f"hf:{family}", kwargs, seed=3)
        config, _ = hf._config(family, kwargs)
        torch.manual_seed(3)
        ref = cls(config)
        x, _ = model.make_batch(3, torch.Generator().manual_seed(0))
        assert torch.equal(model.sequential()(x), ref(input_ids=x).logits)
    # GPT-2 ties its LM head to the token embedding: one parameter, two layers.
    assert build_model("hf:gpt2").tied_groups() == [[(0, "tokens.weight"),
                                                     (5, "lm_head.weight")]]


@pytest.mark.parametrize("family, blocks, tp, args", [
    ("mistral", "layers", True, {}), ("qwen2", "layers", True, {}),
    ("mixtral", "layers", False, {}),
    # not Llama's names: final_layernorm; gpt_neox.embed_in, embed_out, final_layer_norm;
    # h, ln_f and a learned position table (wpe)
    ("phi", "layers", False, {}), ("gpt_neox", "layers", False, {}),
    ("gpt_bigcode", "h", False, {}),
    # a window shorter than the sequence: SDPA needs the mask spelled out
    ("mistral", "layers", True, {"sliding_window": 4}),
    # eager attention (soft-capped), sliding and full layers, a soft-capped head
    ("gemma2", "layers", True, {"sliding_window": 3}),
    # one rotary module with a table per layer type
    ("gemma3_text", "layers", True, {"sliding_window": 5}),
    # a position table read 2 rows in; a scaled head; partial rotary (rotary_dim)
    ("opt", "layers", False, {}), ("cohere", "layers", True, {}), ("gptj", "h", False, {}),
    # alibi off: the block's required alibi argument is None
    ("falcon", "h", False, {}),
    # a state-space model: no attention, its final norm norm_f
    ("mamba", "layers", False, {}),
    # multi-head latent attention; a hybrid of Mamba and attention layers
    ("deepseek_v3", "layers", False, {}), ("jamba", "layers", False, {}),
])
def test_any_decoder_hf_family_is_cut_into_layers_that_give_its_logits(
        family: str, blocks: str, tp: bool, args: dict[str, int]) -> None:
    """hf:<model_type> beyond gpt2 and llama: the transformers model built from the same config
    and seed gives the logits of pdv's layers in a row (a mixture of experts included)."""
    transformers = pytest.importorskip("transformers")

    model = build_model(f"hf:{family}", {"seq_len": 9, "hidden_size": 48, **args}, seed=5)
    torch.manual_seed(5)
    config = next(m.config for m in model.layers[1][1].layer.modules() if hasattr(m, "config"))
    ref = transformers.AutoModelForCausalLM.from_config(config)
    x, _ = model.make_batch(3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.sequential()(x), ref(input_ids=x, use_cache=False).logits)
    assert [n for n, _ in model.layers] == ["embed", *[f"{blocks}.{i}" for i in range(4)], "head"]
    # TP where the blocks have Llama's projections; a mixture of experts' blocks do not
    assert (model.tp_plan is not None) == tp


def test_a_mixture_of_experts_builds_in_float32_at_any_size_and_on_meta() -> None:
    """transformers' default experts kernel (grouped_mm) took only bfloat16 on a CPU at
    hidden_size 128; pdv asks for the eager one. On meta (pdv profile model's first check,
    --estimate) the cut is not compared: meta holds no data, and routing needs it."""
    pytest.importorskip("transformers")
    sizes = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    model = build_model("hf:mixtral", sizes)
    x, _ = model.make_batch(2, torch.Generator().manual_seed(0))
    assert model.sequential()(x).shape == (2, 32, 512)
    with torch.device("meta"):
        assert len(build_model("hf:mixtral", sizes).layers) == 4


@pytest.mark.parametrize("family, refusal", [
    # its forward applies its norm after the embedding as well: the cut would drop that
    ("nanochat", r"hf:nanochat: pdv's cut .* does not give NanoChatForCausalLM's logits"),
    # its blocks need the ALiBi biases its forward computes; pdv hands them None
    ("bloom", r"hf:bloom: BloomForCausalLM fails on a short batch.*None for alibi"),
    ("no_such_family", r"has no model_type 'no_such_family'"),
])
def test_an_hf_family_pdv_cannot_cut_faithfully_is_refused(family: str, refusal: str) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(PdvError, match=refusal):
        build_model(f"hf:{family}", {"seq_len": 8})


def test_an_hf_error_prints_the_family_as_typed(tmp_path: Path) -> None:
    """rich read "hf:llama: " as the emoji code ":llama:" and printed a llama in its place."""
    pytest.importorskip("transformers")
    res = run_pdv("profile", "model", "hf:llama", "--model-arg", "bogus=1", "-o",
                  str(tmp_path / "p.json"))
    assert res.returncode == 2
    assert res.stderr.startswith("pdv: error: hf:llama: bogus is not a LlamaConfig field")


def test_split_by_name_reproduces_the_module() -> None:
    from tests.models import split_net

    model = build_model("tests/models/split_net.py:net", {"n_block": 3}, seed=0,
                        split_at=["layers.1", "norm"])
    assert [n for n, _ in model.layers] == ["prologue", "layers.1", "norm"]
    torch.manual_seed(0)
    ref = split_net.Net(n_block=3)
    for rows in (1, 4, 5):
        x, _ = model.make_batch(rows, torch.Generator().manual_seed(rows))
        assert torch.equal(model.sequential()(x), ref(x))
    boundaries = probe(model)
    # The position table (T, d) has no batch dim and carries a gradient (it reads a parameter).
    table = [v for v in boundaries[0].values if not v.batched]
    assert len(table) == 1 and table[0].requires_grad


BAD = """
import torch
from torch import nn

class Pair(nn.Module):
    def forward(self, x):
        return {"h": x, "norm": x.norm().item()}

class Unpair(nn.Module):
    def forward(self, pair):
        return pair["h"] / pair["norm"]

class Grow(nn.Module):
    def forward(self, x):
        return x[:, : int(x.abs().sum() * 10) % 5 + 1]

class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)

class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)] * 3)
    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

def item_out(): return nn.Sequential(nn.Linear(4, 4), Pair(), Unpair())
def ragged(): return nn.Sequential(nn.Linear(4, 8), Grow(), nn.Identity())
def branchy(): return Branch()
def not_a_model(): return 42
def shared(): return Shared()
def make_batch(mbs, gen): return torch.randn(mbs, 4, generator=gen), torch.randn(mbs, 4)
def loss_fn(out, y): return (out - y[:, : out.shape[1]]).pow(2).mean()
"""


@pytest.mark.parametrize("factory,args,needle", [
    ("item_out", [], "layer 1 '1' hands on "),
    ("ragged", [], "shape changes between micro-batches"),
    ("branchy", ["--split-at", "b"], "torch.export cannot trace"),
    ("branchy", ["--split-at", "c"], "--split-at c: model"),
    ("branchy", [], "not an nn.Sequential"),
    ("not_a_model", [], "factory returned int"),
    ("shared", ["--blocks", "layers"], "holds one module at several places (3 places, 1 distinct"),
])
def test_bad_models_are_one_line_and_exit_2(tmp_path: Path, factory: str, args: list[str],
                                            needle: str) -> None:
    src = tmp_path / "bad.py"
    src.write_text(BAD)
    res = run_pdv("profile", "model", f"{src}:{factory}", *args, "-o", str(tmp_path / "p.json"),
                  "--repeat", "1", "--warmup", "0", "--micro-batch-sizes", "2")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("pdv: error")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_run_names_the_stage_of_a_bad_boundary(tmp_path: Path) -> None:
    src = tmp_path / "bad.py"
    src.write_text(BAD)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "pdv.plan/v1", "micro_batch_size": 2,
                                "num_micro_batches": 2, "global_batch_size": 4,
                                "schedule": "GPipe",
                                "stages": [{"layers": [0, 1], "ranks": [0]},
                                           {"layers": [1, 3], "ranks": [1]}]}))
    res = run_pdv("run", str(plan), "--model", f"{src}:item_out", "--steps", "1")
    assert res.returncode == 2, res.stderr
    assert "stage 1 (layers [1, 3)): layer 1 '1' hands on " in res.stderr
    assert "must be the same every micro-batch" in res.stderr


def test_missing_batch_hooks_name_the_fix(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from torch import nn\ndef net(): return nn.Sequential(nn.Linear(2, 2))\n")
    with pytest.raises(PdvError, match="define make_batch and loss_fn next to the factory"):
        build_model(f"{src}:net")


@pytest.mark.e2e
@pytest.mark.slow
def test_split_model_profile_plan_run_equals_one_process(tmp_path: Path) -> None:
    """The cut points travel: profiled with --split-at, planned on 4 CPU ranks, run from the plan
    alone (no --model), and trained to the 1-rank losses."""
    from pdv import artifacts
    from pdv.run.reference import reference_losses
    from tests.plan_fixtures import cluster

    spec, cuts = "tests/models/split_net.py:net", ["layers.1", "layers.2", "layers.3", "norm"]
    prof = tmp_path / "p.json"
    res = run_pdv("profile", "model", spec, *[a for c in cuts for a in ("--split-at", c)],
                  "--micro-batch-sizes", "1,2", "--repeat", "3", "-o", str(prof))
    assert res.returncode == 0, res.stderr
    profile = artifacts.load_as(prof, "model-profile")
    assert profile.model is not None and profile.model.split_at == cuts
    assert [x.name for x in profile.layers] == ["prologue", *cuts]
    flops = profile.device.matmul_flops or 1e10
    clus = tmp_path / "c.json"
    artifacts.write(clus, cluster(["localhost"] * 4, [[1e9] * 4 for _ in range(4)],
                                  kinds=["cpu"] * 4, flops=[flops] * 4))
    plan = tmp_path / "plan.json"
    res = run_pdv("plan", str(prof), "--cluster", str(clus), "--global-batch", "8", "-o",
                  str(plan))
    assert res.returncode == 0, res.stderr
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "3", "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    made = json.loads(plan.read_text())
    want = reference_losses(spec, {}, steps=3, global_batch_size=made["global_batch_size"],
                            num_micro_batches=made["num_micro_batches"], split_at=cuts)
    doc = json.loads(report.read_text())
    got = doc["loss"]
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want, strict=True)), (got, want)
    # The traced source's imports (torch.export: dynamo, FX, sympy) are every rank's too: about
    # 33 MiB that the empty pipeline's sample model does not import (pdv.profile.source_memory).
    assert any("for the model's source" in n for n in profile.provenance.notes)
    predicted = doc["predicted"]["peak_memory_bytes"]
    for rank, peak in doc["measured"]["peak_memory_bytes"].items():
        assert abs(predicted[rank] - peak) <= 0.05 * peak, (rank, predicted[rank], peak)
