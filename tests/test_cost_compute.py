"""Layer and stage compute time and memory read from a profile."""

from __future__ import annotations

import pytest

from pdv.artifacts import ClusterDevice, TimeFit
from pdv.cost.compute import (
    in_flight_micro_batches,
    layer_cost,
    rank_overhead_bytes,
    speed_factor,
    stage_compute_time,
    stage_memory_bytes,
)
from pdv.errors import PdvError
from tests.test_cost_builders import make_profile


def test_layer_cost_scales_the_reference_linearly() -> None:
    """Without samples or a fit, time and activation bytes scale with the micro-batch size."""
    p = make_profile(fwd=0.01, bwd=0.03, act=500, out=100, ref_mbs=2)
    c = layer_cost(p, 0, 6)
    assert c.fwd_s == pytest.approx(0.01 * 6)
    assert c.bwd_s == pytest.approx(0.03 * 6)
    assert c.activation_bytes == pytest.approx(500 * 6)
    assert c.output_bytes == pytest.approx(100 * 6)
    assert c.param_bytes == 1000


def test_layer_cost_prefers_the_fit() -> None:
    """A fitted a + b·mbs is used where the profile has one."""
    p = make_profile()
    fit = TimeFit(a_s=0.5, b_s=0.25, r2=1.0, max_rel_error=0.0)
    layer = p.layers[0].model_copy(update={"fwd_fit": {"1": fit}, "bwd_fit": {"1": fit}})
    p = p.model_copy(update={"layers": [layer, *p.layers[1:]]})
    assert layer_cost(p, 0, 4).fwd_s == pytest.approx(0.5 + 0.25 * 4)


def test_layer_cost_reads_tp_shard_samples() -> None:
    """At TP k the measured shard sizes are used, and a missing TP degree is a PdvError."""
    p = make_profile(tp_degrees=(1, 2), params=1000, fwd=0.02)
    c = layer_cost(p, 1, 1, 2)
    assert c.param_bytes == 500
    assert c.fwd_s == pytest.approx(0.01)
    with pytest.raises(PdvError, match="TP 4"):
        layer_cost(p, 1, 1, 4)


def test_speed_factor_is_the_matmul_ratio() -> None:
    """A device measured half as fast as the profiled one takes twice as long."""
    p = make_profile(matmul_flops=2e12)
    slow = ClusterDevice(rank=0, host="h", kind="cpu", memory_bytes=1, matmul_flops=1e12)
    unknown = ClusterDevice(rank=1, host="h", kind="cpu", memory_bytes=1)
    assert speed_factor(p, slow) == pytest.approx(2.0)
    assert speed_factor(p, unknown) == 1.0


def test_recompute_adds_one_forward_to_backward() -> None:
    """Activation checkpointing reruns the forward before the backward."""
    p = make_profile(fwd=0.01, bwd=0.02)
    f, b = stage_compute_time(p, 0, 3, 1)
    fr, br = stage_compute_time(p, 0, 3, 1, recompute=True)
    assert (f, b) == pytest.approx((0.03, 0.06))
    assert (fr, br) == pytest.approx((0.03, 0.09))


def test_in_flight_follows_the_schedule() -> None:
    """GPipe holds every micro-batch; 1F1B holds p − s, at least 1 and at most M."""
    assert in_flight_micro_batches("GPipe", 0, 4, 8) == 8
    assert in_flight_micro_batches("LoopedBFS", 1, 4, 8) == 8
    assert [in_flight_micro_batches("1F1B", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches("1F1B", 0, 4, 2) == 2


def test_stage_memory_by_hand() -> None:
    """Weights + grads + Adam state + in-flight activations + overhead; FSDP and recompute."""
    p = make_profile(params=1000, act=500, out=100, overhead=7)
    # 2 layers: state 2·(1000 + 1000 + 2000) = 8000; activations 2·500 per micro-batch.
    assert stage_memory_bytes(p, 0, 2, 1, in_flight=3) == 7 + 8000 + 3 * 1000
    assert stage_memory_bytes(p, 0, 2, 1, dp=4, fsdp=True, in_flight=3) == 7 + 2000 + 3000
    # Recompute keeps each layer's input (2·100) per micro-batch plus one layer's activations.
    assert stage_memory_bytes(p, 0, 2, 1, recompute=True, in_flight=3) == 7 + 8000 + 600 + 500


def test_more_micro_batches_never_lower_gpipe_memory() -> None:
    """GPipe's peak grows with the micro-batch count; 1F1B's stops at p − s."""
    p = make_profile()
    gpipe = [
        stage_memory_bytes(p, 0, 2, 1, in_flight=in_flight_micro_batches("GPipe", 0, 2, m))
        for m in range(1, 9)
    ]
    assert gpipe == sorted(gpipe) and gpipe[-1] > gpipe[0]
    one_f = {in_flight_micro_batches("1F1B", 0, 2, m) for m in range(2, 9)}
    assert one_f == {2}


@pytest.mark.parametrize(("runtime", "own", "expect"), [
    (None, None, 300),  # not measured: the profile's overhead
    (350, 290, 300 + 60),  # a capped CPU rank: its cgroup also holds the launcher's 60
    (290, 290, 300),  # an uncapped CPU rank: the charge is its own resident set
    (500, None, 500),  # CUDA: device memory in use at init, larger than the profile's
    (200, None, 300),
])
def test_rank_overhead_adds_what_the_cap_counts_beyond_the_rank(runtime, own, expect) -> None:
    dev = ClusterDevice(rank=0, host="h", kind="cpu", memory_bytes=1 << 30,
                        runtime_bytes=runtime, runtime_own_bytes=own)
    assert rank_overhead_bytes(make_profile(overhead=300), dev) == expect
