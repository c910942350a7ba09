"""pdv profile model prices the optimizer step: measured per layer, and estimated from its bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pdv import artifacts
from pdv.models import ModelDef
from pdv.profile.layers import profile_model
from pdv.profile.optimizer import time_optimizer_steps
from pdv.profile.request import ProfileRequest
from tests.conftest import run_pdv

torch.set_num_threads(1)
MLP = "mlp"
SPEC = "tests.test_profile_optimizer:relu_mlp"


def relu_mlp(dim: int = 64) -> ModelDef:
    """Linear, a parameter-less ReLU layer, Linear: the smallest model with such a layer."""
    layers: list[tuple[str, nn.Module]] = [
        ("inp", nn.Linear(16, dim)), ("act", nn.ReLU()), ("out", nn.Linear(dim, 16))]

    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(mbs, 16, generator=gen, device="cpu")
        return x, torch.randn(mbs, 16, generator=gen, device="cpu")

    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=nn.functional.mse_loss)


def _profile(spec: str, optimizer: str = "adam", estimate: bool = False,
             **kwargs: int) -> artifacts.ModelProfile:
    return profile_model(ProfileRequest(spec=spec, kwargs=kwargs, micro_batch_sizes=(1,),
                                        warmup=1, repeat=5, optimizer=optimizer,
                                        estimate=estimate))


def _block_step(optimizer: str, estimate: bool, dim: int) -> float:
    p = _profile(MLP, optimizer, estimate, n_layer=1, dim=dim)
    assert p.layers[1].name == "block0"
    step = p.layers[1].optimizer_s
    assert step is not None
    return step


def test_measured_step_positive_with_params_zero_without() -> None:
    p = _profile(SPEC)
    steps = {x.name: x.optimizer_s for x in p.layers}
    assert steps["act"] == 0.0
    assert steps["inp"] is not None and steps["inp"] > 0
    assert steps["out"] is not None and steps["out"] > 0
    note = next(n for n in p.provenance.notes if n.startswith("optimizer_s"))
    assert "AdamW" in note and "foreach=False" in note and "median" in note
    sgd = _profile(SPEC, "sgd")
    assert "SGD" in next(n for n in sgd.provenance.notes if n.startswith("optimizer_s"))


def test_frozen_parameters_are_not_stepped() -> None:
    frozen = nn.Linear(64, 64).requires_grad_(False)
    live = nn.Linear(64, 64)
    before = frozen.weight.clone()
    ticks: list[int] = []
    steps = time_optimizer_steps([frozen, live], "adam", torch.device("cpu"), 1, 3,
                                 lambda: ticks.append(1))
    assert steps[0] == 0.0 and steps[1] > 0
    assert torch.equal(frozen.weight, before)
    assert len(ticks) == 4  # one warm-up round (it allocates state) + 3 timed rounds
    assert live.weight.grad is None  # the random gradients are dropped afterwards


def test_measured_step_grows_with_parameters() -> None:
    # A residual MLP block holds 8·dim² parameters: 16x more at width 1024 than at 256.
    small = _block_step("adam", False, 256)
    large = _block_step("adam", False, 1024)
    assert large > 4 * small, (small, large)


def test_sgd_step_cheaper_than_adamw() -> None:
    # SGD without momentum reads and writes the parameter and reads the gradient; AdamW also
    # updates two moments and builds a denominator, about 7x the bytes.
    for estimate in (False, True):
        adam = _block_step("adam", estimate, 512)
        sgd = _block_step("sgd", estimate, 512)
        assert sgd < 0.5 * adam, (estimate, sgd, adam)


def test_estimate_within_broad_factor_of_measured() -> None:
    """The estimate prices the step's bytes at the measured copy bandwidth.

    Both sides are measured on this machine while neighbours may be busy, so the comparison is
    retaken (at most 3 times) until they agree within 0.2x-5x; a systematically wrong estimate
    fails every try. Alone on 2 cores (CI) they agree on the first.
    """
    ratios = []
    for _ in range(3):
        measured = _block_step("adam", False, 1024)
        estimated = _block_step("adam", True, 1024)
        ratios.append(estimated / measured)
        if 0.2 < ratios[-1] < 5:
            break
    assert 0.2 < ratios[-1] < 5, ratios


def test_estimate_marks_optimizer_step_estimated() -> None:
    p = _profile(SPEC, estimate=True)
    assert p.provenance.method == "estimated"
    steps = {x.name: x.optimizer_s for x in p.layers}
    assert steps["act"] == 0.0 and steps["inp"] and steps["out"]
    note = next(n for n in p.provenance.notes if n.startswith("optimizer_s"))
    assert "ESTIMATED" in note and "bandwidth" in note


def test_cli_reports_the_optimizer_step(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    r = run_pdv("profile", "model", SPEC, "--micro-batch-sizes", "1", "--warmup", "1",
                "--repeat", "3", "--optimizer", "sgd", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    p = artifacts.load_as(out, "model-profile")
    assert summary["optimizer_s"] == pytest.approx(sum(x.optimizer_s or 0 for x in p.layers))
    assert summary["optimizer_s"] > 0
    shown = run_pdv("show", str(out))
    assert shown.returncode == 0 and "opt step" in shown.stdout
    assert "optimizer step" in shown.stdout
