"""pdv profile model: the real command on CPU, measured and estimated, and its errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pdv import artifacts
from pdv.cli.app import main
from pdv.errors import PdvError
from pdv.profile.compute import fit_time
from pdv.profile.layers import profile_model
from pdv.profile.memory import SavedTensors
from pdv.profile.request import ProfileRequest, parse_sizes
from tests.conftest import run_pdv

torch.set_num_threads(1)
GPT = "pdv/sample_models/gpt.py"  # the file-path form of a model spec


def _layer_sum_error(p: artifacts.ModelProfile) -> float:
    """|sum of per-layer fwd+bwd - whole-model fwd+bwd| / whole, at the reference point."""
    assert p.whole_model is not None
    layer_sum = sum(x.fwd_s + x.bwd_s for x in p.layers)
    return abs(layer_sum - p.whole_model.fwd_bwd_s) / p.whole_model.fwd_bwd_s


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory: pytest.TempPathFactory) -> artifacts.ModelProfile:
    """The acceptance command: profile gpt_tiny on CPU, then validate the file.

    On a machine shared with other busy processes, their bursts preempt the 2.5 ms whole-model
    window far more often than the 0.3 ms layer windows, and can inflate the whole-model median
    several-fold. The command is therefore retaken (at most 4 runs) until the layer sum agrees;
    an implementation that is systematically off fails every run. Alone on 2 cores (CI) the
    first run agrees within a few percent.
    """
    out = tmp_path_factory.mktemp("profile") / "p.json"
    for _ in range(4):
        r = run_pdv("profile", "model", f"{GPT}:gpt_tiny", "--device", "cpu", "-o", str(out))
        assert r.returncode == 0, r.stderr
        v = run_pdv("validate", str(out))
        assert v.returncode == 0, v.stderr
        assert "valid pdv.model-profile/v1" in v.stdout
        profile = artifacts.load_as(out, "model-profile")
        if profile.whole_model is None or _layer_sum_error(profile) < 0.25:
            break
    return profile


def test_acceptance_layers_in_order_with_backward(tiny_profile: artifacts.ModelProfile) -> None:
    p = tiny_profile
    assert p.provenance.method == "measured"
    assert p.device.kind == "cpu"
    # The small-op reference step the cluster probe also times: the median of the readings
    # around the layer points and after each timed round (3 sizes x 10 rounds here), their
    # range in the notes (an estimate has none).
    assert p.device.small_op_step_s is not None and 1e-6 < p.device.small_op_step_s < 0.1
    (note,) = [n for n in p.provenance.notes if n.startswith("small_op_step_s")]
    assert "the median of 32 readings" in note
    lo, hi = (float(x) for x in note.split("; ")[-1].split(" µs")[0].split(" .. "))
    assert lo <= p.device.small_op_step_s * 1e6 + 0.5 and hi >= p.device.small_op_step_s * 1e6 - 0.5
    assert [x.name for x in p.layers] == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in p.layers)
    assert p.micro_batch_sizes == [1, 2, 4] and p.reference_micro_batch_size == 1
    for layer in p.layers:
        assert {(s.micro_batch_size, s.tp_degree) for s in layer.samples} == {
            (1, 1), (2, 1), (4, 1)}
        assert set(layer.fwd_fit) == set(layer.bwd_fit) == {"1"}
    # Adam state is two fp32 tensors per parameter; grads match the fp32 params.
    for layer in p.layers:
        assert layer.grad_bytes == layer.param_bytes
        assert layer.optimizer_bytes == 2 * layer.param_bytes


def test_acceptance_layer_sum_matches_whole_model(tiny_profile: artifacts.ModelProfile) -> None:
    p = tiny_profile
    whole = p.whole_model
    assert whole is not None and whole.micro_batch_size == p.reference_micro_batch_size
    assert whole.tp_degree == 1 and whole.fwd_bwd_s > 0
    assert _layer_sum_error(p) < 0.25, (sum(x.fwd_s + x.bwd_s for x in p.layers), whole)


def test_memory_scales_with_micro_batch(tiny_profile: artifacts.ModelProfile) -> None:
    for layer in tiny_profile.layers[1:]:
        by = {s.micro_batch_size: s for s in layer.samples}
        # A block's saved activations and output are linear in the micro-batch.
        assert by[4].output_bytes == 4 * by[1].output_bytes
        assert by[4].activation_bytes == pytest.approx(4 * by[1].activation_bytes, rel=0.05)
    block = tiny_profile.layers[1]
    # At least the block's input and the MLP hidden (4x wider) are saved: > 5 x (B, T, d) fp32.
    assert block.activation_bytes > 5 * 32 * 64 * 4
    assert block.output_bytes == 32 * 64 * 4


def test_tp_degrees_profiled_at_shard_shapes() -> None:
    calls: list[tuple[str, int, int]] = []
    p = profile_model(ProfileRequest(spec=f"{GPT}:gpt_tiny", micro_batch_sizes=(1, 2),
                                     tp_degrees=(2,), warmup=1, repeat=3),
                      progress=lambda what, done, total: calls.append((what, done, total)))
    # Progress: one report per round (2 TP x 2 mbs x 6 rounds: a warm-up, 3 timed over 3
    # visits, an untimed round opening each later visit; then 4 optimizer-step rounds) plus
    # one per point, monotonic.
    assert calls[-1][1] == calls[-1][2] == 2 * 2 * 6 + 4
    assert calls[-1][0].startswith("optimizer step")
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert p.tp_degrees == [1, 2]
    block = p.layers[1]
    by = {(s.tp_degree, s.micro_batch_size): s for s in block.samples}
    assert set(by) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    # A TP-2 shard holds half of every matrix (LayerNorms and row-parallel biases stay whole).
    assert 0.45 < by[(2, 1)].param_bytes / by[(1, 1)].param_bytes < 0.55
    assert by[(2, 1)].activation_bytes < by[(1, 1)].activation_bytes
    assert set(block.fwd_fit) == {"1", "2"}
    embed = {(s.tp_degree, s.micro_batch_size): s for s in p.layers[0].samples}
    assert embed[(2, 1)].param_bytes == embed[(1, 1)].param_bytes
    # Timed as the run executes TP (DTensor over a fake group), which is gone afterwards.
    assert any("parallelize_module" in n for n in p.provenance.notes)
    assert not torch.distributed.is_initialized()
    assert by[(2, 2)].fwd_s > 0 and by[(2, 2)].bwd_s > 0


def test_a_layer_handing_on_a_tuple_records_its_messages() -> None:
    # carry's layers hand on (hidden, positions, table): three messages forward, and only the
    # hidden state's gradient comes back (int64 positions; a table built from aranges).
    p = profile_model(ProfileRequest(spec="tests/models/carry.py:carry",
                                     kwargs={"n_block": 2, "d": 16}, micro_batch_sizes=(2,),
                                     warmup=1, repeat=2))
    got = [(x.name, x.output_tensors, x.output_grad_tensors) for x in p.layers]
    assert got == [("embed", 3, 1), ("block0", 3, 1), ("block1", 3, 1), ("head", 1, 1)]
    one = profile_model(ProfileRequest(spec=f"{GPT}:gpt_tiny", micro_batch_sizes=(1,),
                                       warmup=1, repeat=2))
    assert {(x.output_tensors, x.output_grad_tensors) for x in one.layers} == {(1, 1)}
    # One tensor per boundary writes what profiles wrote before the counts: same bytes, digest.
    assert "output_tensors" not in artifacts.dumps(one)
    assert artifacts.dumps(p).count('"output_tensors": 3') == 3


def test_layers_that_write_into_their_input_profile_measured_and_estimated() -> None:
    # Timed alone, a layer gets a leaf that carries a gradient, which autograd forbids writing
    # into; both profilers hand such a layer a copy, as a stage starting there does.
    req = {"spec": "tests/models/shared_in_place.py:net", "micro_batch_sizes": (2,)}
    measured = profile_model(ProfileRequest(**req, warmup=1, repeat=2))
    estimated = profile_model(ProfileRequest(**req, estimate=True))
    for p in (measured, estimated):
        assert len(p.layers) == 8 and all(x.fwd_s > 0 for x in p.layers)
        # ReLU, mul_ and Hardtanh have no parameters; the shared Linear has its own at each place.
        assert [x.param_bytes > 0 for x in p.layers] == [True, True, False, True, False, True,
                                                         False, True]


def test_estimate_gpt3_175b_is_fast_and_marked(tmp_path: Path) -> None:
    out = tmp_path / "gpt3.json"
    start = time.perf_counter()
    r = run_pdv("profile", "model", f"{GPT}:gpt3_175b", "--estimate", "--tp-degrees", "1,8",
                "-o", str(out), "--json")
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert elapsed < 120, elapsed
    summary = json.loads(r.stdout)
    assert summary["method"] == "estimated" and summary["layers"] == 98
    p = artifacts.load_as(out, "model-profile")
    assert p.provenance.method == "estimated"
    assert any("reuse one trace" in n for n in p.provenance.notes)
    assert p.device.small_op_step_s is None
    params = sum(x.param_bytes for x in p.layers) / 4
    assert abs(params - 175e9) / 175e9 < 0.01
    block = p.layers[1]
    # Forward of a block: 2 x (12 d^2) FLOPs per token for the matmuls, plus attention.
    d, t = 12288, 2048
    assert block.flops_fwd == pytest.approx(24 * d * d * t, rel=0.1)
    # Backward runs twice the forward's GEMM FLOPs, but at other shapes, each timed here: on a
    # shared CPU the per-shape rates carry the machine's noise, hence the loose bound.
    assert block.bwd_s == pytest.approx(2 * block.fwd_s, rel=0.35)
    # An optimizer step over the block's 1.8e9 parameters streams GBs: well above the op floor.
    assert block.optimizer_s is not None and block.optimizer_s > 1e-3
    tp8 = {s.tp_degree: s for s in block.samples if s.micro_batch_size == 1}
    assert tp8[8].fwd_s < tp8[1].fwd_s / 6


def test_estimate_close_to_measured_on_gpt_tiny(tiny_profile: artifacts.ModelProfile) -> None:
    est = profile_model(ProfileRequest(spec=f"{GPT}:gpt_tiny", estimate=True))
    assert est.provenance.method == "estimated"
    assert [x.name for x in est.layers] == [x.name for x in tiny_profile.layers]
    measured = sum(x.fwd_s + x.bwd_s for x in tiny_profile.layers)
    estimated = sum(x.fwd_s + x.bwd_s for x in est.layers)
    # Tiny layers are dominated by per-op costs the estimate prices only roughly.
    assert 0.1 < estimated / measured < 10, (estimated, measured)
    for m, e in zip(tiny_profile.layers, est.layers, strict=True):
        assert m.param_bytes == e.param_bytes
        assert m.output_bytes == e.output_bytes


def test_no_tp_plan_is_one_line_error() -> None:
    r = run_pdv("profile", "model", "convnet", "--tp-degrees", "1,2",
                "-o", "/tmp/never.json")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "convnet" in r.stderr and "tensor-parallel" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--micro-batch-sizes", "1,x"], "--micro-batch-sizes"),
    (["--micro-batch-sizes", "0"], "--micro-batch-sizes"),
    (["--tp-degrees", "3"], "supports TP degrees"),
    (["--optimizer", "lamb"], "--optimizer"),
    (["--dtype", "float8"], "--dtype"),
    (["--model-arg", "n_layer"], "--model-arg"),
    (["--model-arg", "bogus=1"], "bad arguments"),
])
def test_bad_input_exits_2_with_one_line(args: list[str], words: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through the CLI's own entry point (the subprocess path is covered above).
    code = main(["profile", "model", f"{GPT}:gpt_tiny", *args, "-o", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("pdv: error:") and err.strip().count("\n") == 0, err
    assert words in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("spec", ["nowhere.py:gpt", f"{GPT}:no_such_factory", "gpt_no_such_size"])
def test_bad_model_spec_exits_2(spec: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile", "model", spec, "-o", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pdv: error:") and err.strip().count("\n") == 0, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_gpu_exits_2(tmp_path: Path) -> None:
    r = run_pdv("profile", "model", f"{GPT}:gpt_tiny", "--device", "cuda",
                "-o", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "--estimate" in r.stderr


def test_help() -> None:
    r = run_pdv("profile", "model", "--help")
    assert r.returncode == 0
    assert "--micro-batch-sizes" in r.stdout and "--estimate" in r.stdout


def test_parse_sizes() -> None:
    assert parse_sizes("4, 1,2,2", "--x") == (1, 2, 4)
    for bad in ("", "a", "1,-2", "0"):
        with pytest.raises(PdvError):
            parse_sizes(bad, "--x")


def test_fit_time_recovers_a_line() -> None:
    fit = fit_time([1, 2, 4, 8], [0.5 + 0.25 * m for m in (1, 2, 4, 8)])
    assert fit.a_s == pytest.approx(0.5) and fit.b_s == pytest.approx(0.25)
    assert fit.r2 == pytest.approx(1.0) and fit.max_rel_error < 1e-9
    noisy = fit_time([1, 2, 4], [1.0, 3.0, 2.0])
    assert noisy.r2 < 0.9 and noisy.max_rel_error > 0.1


def test_saved_tensors_counts_input_not_weights() -> None:
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    saved = SavedTensors(exclude=list(lin.parameters()))
    with saved.active():
        y = lin(x)
    assert saved.bytes() == x.numel() * 4  # addmm saves its input; the weight is a parameter
    assert saved.holds(x) and not saved.holds(y)
    relu = SavedTensors(exclude=[])
    with relu.active():
        z = torch.relu(y)
        z2 = z.view(-1)  # a view of a saved tensor adds nothing
        z2.sum()
    assert relu.bytes() == y.numel() * 4


def test_estimate_activation_bytes_match_korthikanti() -> None:
    """A transformer block keeps about 34·s·b·h bytes in 16-bit for backward with a fused
    attention (Korthikanti et al., 2022, eq. 2 without the 5·a·s²·b score term)."""
    s, b, h = 512, 2, 1024
    p = profile_model(ProfileRequest(
        spec=f"{GPT}:gpt", kwargs=dict(n_layer=1, n_head=8, d_model=h, seq_len=s,
                                       vocab_size=64),
        micro_batch_sizes=(b,), estimate=True, dtype="bfloat16", device_flops=1e14,
        device_bandwidth=1e12))
    per_sbh = p.layers[1].activation_bytes / (s * b * h)
    assert 25 < per_sbh < 40, per_sbh


def test_estimate_scales_with_declared_device() -> None:
    def block_time(flops: float) -> tuple[float, artifacts.ModelProfile]:
        p = profile_model(ProfileRequest(
            spec=f"{GPT}:gpt_13b", kwargs={"n_layer": 1}, micro_batch_sizes=(1,),
            estimate=True, device="cuda", device_flops=flops, device_bandwidth=1e18,
            device_kind="nvidia-a100-sxm4-80gb"))
        return p.layers[1].fwd_s, p

    slow, p = block_time(1e14)
    fast, _ = block_time(2e14)
    assert p.device.kind == "nvidia-a100-sxm4-80gb"
    assert p.provenance.method == "estimated" and p.overhead_bytes == 0
    # A 13B block is compute-bound: twice the FLOP rate, about half the time.
    assert fast / slow == pytest.approx(0.5, rel=0.05)
    assert slow == pytest.approx(p.layers[1].flops_fwd / 1e14, rel=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "cuda.json"
    r = run_pdv("profile", "model", f"{GPT}:gpt_tiny", "--device", "cuda", "--tp-degrees", "1,2",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    p = artifacts.load_as(out, "model-profile")
    assert p.device.kind.startswith("nvidia-") and " " not in p.device.kind
    assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in p.layers)
    assert all(x.activation_bytes > 0 for x in p.layers[1:])
    assert p.overhead_bytes > 0


def test_cpu_runtime_does_not_depend_on_the_model(tiny_profile: artifacts.ModelProfile,
                                                  tmp_path: Path) -> None:
    # The GPT factory pulls in modules a convnet's does not (sympy among them): read off the
    # profiling process, the two runtimes were 365 and 297 MiB on one machine. Measured on a
    # run rank they agree, and that rank holds more than the bare torch import.
    out = tmp_path / "convnet.json"
    r = run_pdv("profile", "model", "convnet", "--model-arg", "n_block=1", "--model-arg",
                "width=4", "--model-arg", "image_size=8", "--micro-batch-sizes", "1,2",
                "--repeat", "2", "--warmup", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    conv = artifacts.load_as(out, "model-profile")
    for p in (conv, tiny_profile):
        assert any("one-rank pdv run" in n for n in p.provenance.notes), p.provenance.notes
    assert abs(conv.overhead_bytes - tiny_profile.overhead_bytes) <= 0.03 * conv.overhead_bytes
    assert conv.overhead_bytes > 200 * 2**20


def test_backward_is_timed_adding_into_kept_gradients() -> None:
    # In a step every micro-batch's backward but the first adds into the gradients the first
    # left (zero_grad sets them to None once per step); for a layer with megabytes of weights
    # that costs 25-30% more than writing them afresh. The profile times that case.
    from pdv.profile.layers import _measure_points, rounds_per_size

    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)]
    seen: list[bool] = []
    for layer in layers:
        for p in layer.parameters():
            # A parameter's hook runs before its gradient is added in: p.grad is still the old.
            p.register_hook(lambda g, p=p: seen.append(p.grad is not None) or g)
    batches = {m: (torch.randn(m, 8), torch.randn(m, 4)) for m in (2, 3)}
    order: list[int] = []
    probes: list[int] = []
    points, whole = _measure_points(
        layers, torch.nn.functional.mse_loss, batches, torch.device("cpu"), warmup=1, repeat=3,
        whole_at=3, ticks={m: (lambda m=m: order.append(m)) for m in batches},
        between=lambda: probes.append(len(order)))
    assert all(len(p.bwd) == 3 for m in batches for p in points[m])
    assert len(whole) == 3  # the whole model at its one size, timed rounds only
    # Three visits take the sizes in turn, each size a warm-up (later: one untimed round) and
    # a timed round per visit: a spell of noise reaches every size alike.
    assert order == [2, 2, 3, 3] * 3
    assert probes == [4, 8, 12]  # after each visit to every size
    assert [rounds_per_size(1, 3, 2), rounds_per_size(2, 10, 1)] == [6, 12]
    assert len(order) == 2 * rounds_per_size(1, 3, 2)
    per_round = 4  # parameters; the whole model's backward adds 4 more at size 3
    # first, one untimed backward per layer and size for its memory, gradients held
    memory = per_round * len(batches)
    assert len(seen) == memory + per_round * (len(order) + 3 * 2)
    assert all(seen[:memory])
    # the warm-up's first pass allocates
    assert seen[memory:memory + per_round] == [False] * per_round
    assert all(seen[memory + per_round:])  # every later backward adds into kept gradients
    assert all(p.grad is None for layer in layers for p in layer.parameters())  # left clean


class _HoldsInBackward(torch.autograd.Function):
    """Identity whose backward holds a temporary of `nbytes` while it makes the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, nbytes: int) -> torch.Tensor:
        ctx.nbytes = nbytes
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        scratch = torch.ones(ctx.nbytes // 4, device=grad.device)
        return grad * scratch[:1], None


class _Scratchy(torch.nn.Module):
    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HoldsInBackward.apply(x, self.nbytes)


def scratchy() -> Any:
    """Linear, a layer whose backward holds 4 MB besides its gradient, Linear."""
    from pdv.model_def import ModelDef

    torch.manual_seed(0)
    layers = [("a", torch.nn.Linear(64, 64)), ("scratch", _Scratchy(4 << 20)),
              ("b", torch.nn.Linear(64, 8))]

    def make_batch(m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(m, 64, generator=gen), torch.randn(m, 8, generator=gen)

    return ModelDef(layers=layers, make_batch=make_batch,
                    loss_fn=torch.nn.functional.mse_loss)


def test_the_backward_peak_is_measured_and_estimated_alike() -> None:
    """A layer's backward holds temporaries on top of what its forward left alive; both
    profilers record the peak (backward_bytes), and the cost model adds the largest of a
    stage's layers to its peak memory."""
    from pdv.cost.compute import profile_arrays

    req = {"spec": "tests/test_profile_model.py:scratchy", "micro_batch_sizes": (2, 8)}
    measured = profile_model(ProfileRequest(**req, warmup=1, repeat=2))
    estimated = profile_model(ProfileRequest(**req, estimate=True))
    mib = 1 << 20
    for p in (measured, estimated):
        by = {x.name: {s.micro_batch_size: s.backward_bytes for s in x.samples}
              for x in p.layers}
        # the scratch, the incoming and the outgoing gradient (m x 64 floats each)
        for m in (2, 8):
            assert 4 * mib <= by["scratch"][m] <= 4 * mib + 3 * m * 64 * 4
        # a Linear's backward: its weights' temporary gradients (added into the kept ones),
        # which do not grow with the micro-batch, and its input's gradient
        grads = 64 * 64 * 4 + 64 * 4
        for m in (2, 8):
            assert grads <= by["a"][m] <= 2 * grads + 4 * m * 64 * 4
        assert by["a"][8] - by["a"][2] <= 3 * 6 * 64 * 4
    # on meta as on the CPU: the same storages, made and freed in the same order
    for x, y in zip(measured.layers[:2], estimated.layers[:2], strict=True):
        for s, t in zip(x.samples, y.samples, strict=True):
            assert t.backward_bytes == pytest.approx(s.backward_bytes, rel=0.05)
    # priced between and beyond the measured sizes on the line through them
    arrays = profile_arrays(measured, 4, 1)
    at = {m: {s.micro_batch_size: s.backward_bytes for s in measured.layers[1].samples}[m]
          for m in (2, 8)}
    assert arrays.backward[1] == pytest.approx(at[2] + (at[8] - at[2]) * (4 - 2) / (8 - 2),
                                               rel=1e-6)
