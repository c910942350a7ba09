"""What the --estimate op log charges: the kernels a device would launch, not meta's forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdv.device_spec import load_device_spec
from pdv.profile.compute import op_overhead
from pdv.profile.estimate import _trace
from pdv.profile.layers import profile_model
from pdv.profile.request import ProfileRequest
from tests.conftest import ROOT

A100 = ROOT / "devices" / "nvidia-a100-sxm4-80gb.json"


class _MatmulThenReshape(nn.Module):
    def __init__(self, d: int, e: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(d, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) @ (D, E): torch runs one mm on a (B*T, D) view and reshapes its output
        # with _unsafe_view, which is metadata only.
        return torch.matmul(x, self.w)


class _Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.float().mean()


@pytest.mark.parametrize("shape", [(2, 64, 32, 48), (3, 7, 16, 5), (1, 128, 8, 8)])
def test_reshaping_a_matmul_output_moves_no_memory(shape: tuple[int, int, int, int]) -> None:
    b, t, d, e = shape
    layer = _MatmulThenReshape(d, e).to("meta")
    x = torch.empty(b, t, d, device="meta", requires_grad=True)
    tr = _trace(layer, (x,), False, False, _loss, torch.empty(0, device="meta"))
    assert len(tr.fwd_ops) == 1, "only the mm is priced"
    flops, moved, gemm = tr.fwd_ops[0]
    assert gemm is not None and flops == 2 * b * t * d * e
    assert moved == 4 * (b * t * d + d * e + b * t * e)


@pytest.mark.parametrize("shape,dtype", [((4, 256, 96), torch.float16),
                                         ((2, 3, 50, 50), torch.float32),
                                         ((1000,), torch.bfloat16)])
def test_dropout_on_an_accelerator_is_one_kernel_each_way(shape: tuple[int, ...],
                                                          dtype: torch.dtype) -> None:
    n = torch.Size(shape).numel()
    item = torch.empty(0, dtype=dtype).element_size()
    # a layer's input inside the model: the previous layer's output, which carries a gradient
    x = (torch.empty(shape, device="meta", dtype=dtype, requires_grad=True),)
    layer = _Dropout(0.1).train()
    fused = _trace(layer, x, False, False, _loss, torch.empty(0, device="meta"), True)
    # native_dropout: the input in, the output and a bool mask out.
    assert [op[1] for op in fused.fwd_ops] == [2 * n * item + n]
    # Its backward: the gradient and the mask in, the input's gradient out (one kernel).
    assert len(fused.bwd_ops) == 1 and fused.bwd_ops[0][1] == 2 * n * item + n
    # The mask is what backward keeps: one byte per element, as Korthikanti et al. count it.
    assert fused.saved_bytes == n
    # On the device at hand (and on meta) dropout is three passes, the mask in the input's
    # dtype: the estimate of a CPU keeps them.
    plain = _trace(layer, x, False, False, _loss, torch.empty(0, device="meta"), False)
    assert len(plain.fwd_ops) == 3
    assert sum(op[1] for op in plain.fwd_ops) > 2 * sum(op[1] for op in fused.fwd_ops)
    # Not training, or p = 0: dropout is the identity, nothing launched either way.
    for idle in (_Dropout(0.1).eval(), _Dropout(0.0).train()):
        assert _trace(idle, x, False, False, _loss, torch.empty(0, device="meta"),
                      True).fwd_ops == ()


def test_a_declared_gpu_prices_the_gpt_block_dropout_fused() -> None:
    """Megatron's GPT forms on the declared A100: dropout on the T x T probabilities priced as
    one kernel each way, and the note says so."""
    def block(dropout: float) -> tuple[float, list[str]]:
        p = profile_model(ProfileRequest(
            spec="pdv.sample_models.gpt:gpt",
            kwargs=dict(n_layer=1, n_head=16, d_model=1024, seq_len=1024, vocab_size=512,
                        fused_attention=False, dropout=dropout),
            micro_batch_sizes=(1,), estimate=True, dtype="float16", device_spec=str(A100)))
        return p.layers[1].fwd_s, p.provenance.notes

    with_dropout, notes = block(0.1)
    without, _ = block(0.0)
    assert any("native_dropout" in n for n in notes)
    # Three dropouts: one on H·T·T probabilities, two on T·D branches; fused, each moves
    # 5 bytes per fp16 element: what they add is that traffic at the spec's bandwidth, each
    # kernel floored by the host's dispatch (timed once per process). The floor is read, not
    # assumed: a T·D kernel is ~2.9 µs, and a loaded CI host timed dispatch at 4.3 µs.
    spec = load_device_spec(A100)
    dispatch = op_overhead(torch.device("cpu"))
    rate = spec.memory_bandwidth * spec.memory_efficiency
    elements = (16 * 1024 * 1024, 1024 * 1024, 1024 * 1024)
    expected = sum(max(5 * n / rate, dispatch) for n in elements)
    assert with_dropout - without == pytest.approx(expected, rel=0.05)


def test_the_estimate_counts_a_boundarys_tensors_as_the_shape_probe_does() -> None:
    """A tuple boundary is several messages: the estimate (meta, nothing run) hands each
    layer's outputs on as the next one's arguments and counts them, and which carry a
    gradient back, as the shape probe does on real batches; two inputs go to the first layer."""
    from pdv.boundaries import probe
    from pdv.models import build_model

    for spec in ("tests/models/carry.py:carry", "tests/models/flat_tokens.py:net"):
        est = profile_model(ProfileRequest(spec=spec, micro_batch_sizes=(2, 3), estimate=True,
                                           device_flops=1e12))
        seen = probe(build_model(spec))
        assert [(x.output_tensors, x.output_grad_tensors) for x in est.layers] == [
            (len(b.values), sum(v.requires_grad for v in b.values)) for b in seen]
        assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in est.layers if x.param_bytes)


def test_a_layer_whose_shapes_depend_on_the_data_is_named_not_a_traceback() -> None:
    """A mixture of experts routes tokens with torch.nonzero: meta tensors hold no data, so the
    estimate stops with the layer's name; the measured profile takes the same model."""
    from pdv.errors import PdvError

    routed = str(ROOT / "tests" / "models" / "routed.py") + ":net"
    with pytest.raises(PdvError, match=r"layer 1 '1' cannot be estimated.*nonzero.*without "
                       r"--estimate"):
        profile_model(ProfileRequest(spec=routed, micro_batch_sizes=(2,), estimate=True,
                                     device_spec=str(A100)))
    measured = profile_model(ProfileRequest(spec=routed, micro_batch_sizes=(2,), repeat=3,
                                            warmup=1))
    assert len(measured.layers) == 4 and all(la.fwd_s > 0 for la in measured.layers)
