"""One stage priced on its devices and links, against hand computations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdv.artifacts import PlanStage
from pdv.cost.comm import all_gather_time, all_reduce_time, reduce_scatter_time, ring_of
from pdv.cost.stage import StageCost, activation_transfer_time, boundary_messages, stage_cost
from pdv.cost.validity import check_plan
from pdv.errors import PdvError
from tests.test_cost_builders import make_cluster, make_plan, make_profile

# Layers: forward 10 ms and backward 20 ms per sample, 1000 B params (+ grads, + 2x Adam state),
# 500 B of saved activations and 100 B of output per sample.
PROFILE = make_profile(fwd=0.01, bwd=0.02, params=1000, act=500, out=100, tp_degrees=(1, 2))
PROFILES = {"cpu": PROFILE}


def _cost(cluster, stage, nxt=None, *, mbs=1, schedule="1F1B", index=0, stages=2, micro=4):
    return stage_cost(
        PROFILES,
        cluster,
        stage,
        nxt,
        mbs=mbs,
        schedule=schedule,
        stage_index=index,
        num_stages=stages,
        num_micro=micro,
    )


def test_data_parallel_stage_by_hand() -> None:
    """dp=2 replicas each compute half the micro-batch; both slices go to the one next replica."""
    bw = [[0, 1e6, 1e6, 1e6], [1e6, 0, 1e6, 1e6], [2e6, 2e6, 0, 1e6], [1e6, 1e6, 1e6, 0]]
    lat = 1e-4
    cluster = make_cluster(4, bw=bw, lat=lat)
    stage = PlanStage(layers=(0, 2), ranks=[0, 1], dp=2)
    nxt = PlanStage(layers=(2, 4), ranks=[2])
    c = _cost(cluster, stage, nxt, mbs=2)
    assert isinstance(c, StageCost)
    assert c.fwd_s == pytest.approx(2 * 0.01)  # 2 layers at 1 sample per replica
    assert c.bwd_s == pytest.approx(2 * 0.02)
    # Rank 2 receives one 100 B slice from each replica, one message at a time.
    assert c.send_s == pytest.approx(2 * (lat + 100 / 1e6))
    # The gradients come back over 2→0 and 2→1, which are twice as fast.
    assert c.grad_send_s == pytest.approx(2 * (lat + 100 / 2e6))
    # Ring all-reduce of 2 layers' grads (2000 B) over the two replicas.
    assert c.grad_sync_s == pytest.approx(2 * 1 / 2 * 2000 / 1e6 + 2 * lat)
    # 1F1B stage 0 of 2 holds 2 micro-batches: 8000 B state + 2 x (2 layers x 500 B).
    assert c.peak_memory_bytes == {0: 10000, 1: 10000}
    assert c.tp_comm_s == 0.0


def test_last_stage_sends_nothing() -> None:
    """The last stage has no next stage to send to."""
    c = _cost(make_cluster(2), PlanStage(layers=(2, 4), ranks=[1]), None, index=1)
    assert c.send_s == 0.0 and c.grad_send_s == 0.0


def test_micro_batch_must_split_over_replicas() -> None:
    """mbs 3 over dp 2 is a user error that names the fix."""
    plan = make_plan([PlanStage(layers=(0, 4), ranks=[0, 1], dp=2)], mbs=3)
    with pytest.raises(PdvError, match="multiple of 2"):
        check_plan(plan, 4, 2)


def test_device_kind_without_profile_is_named() -> None:
    """A rank whose kind has no profile is a PdvError naming the kind."""
    cluster = make_cluster(2, kinds=["cpu", "h100"])
    with pytest.raises(PdvError, match="'h100'"):
        _cost(cluster, PlanStage(layers=(0, 4), ranks=[0, 1], dp=2), mbs=2)


def test_slowest_device_sets_the_pace() -> None:
    """Measured matmul speed scales each rank; the stage runs at its slowest rank's pace."""
    prof = make_profile(fwd=0.01, bwd=0.02, matmul_flops=1e12)
    cluster = make_cluster(2, matmul_flops=[1e12, 0.25e12])
    c = stage_cost(
        {"cpu": prof}, cluster, PlanStage(layers=(0, 1), ranks=[0, 1], dp=2), None,
        mbs=2, schedule="1F1B", stage_index=0, num_stages=1, num_micro=1,
    )  # fmt: skip
    assert c.fwd_s == pytest.approx(4 * 0.01)
    assert c.bwd_s == pytest.approx(4 * 0.02)


def test_each_kind_is_priced_by_its_own_profile() -> None:
    """Two device kinds in one stage: each by its profile, the slower one wins."""
    profiles = {"a": make_profile("a", fwd=0.01), "b": make_profile("b", fwd=0.03)}
    cluster = make_cluster(2, kinds=["a", "b"])
    c = stage_cost(
        profiles, cluster, PlanStage(layers=(0, 2), ranks=[0, 1], dp=2), None,
        mbs=2, schedule="GPipe", stage_index=0, num_stages=1, num_micro=1,
    )  # fmt: skip
    assert c.fwd_s == pytest.approx(2 * 0.03)


def test_tensor_parallel_all_reduces_by_hand() -> None:
    """TP 2: compute at the shard; 2 all-reduces of the layer output per layer, each way."""
    lat = 1e-4
    cluster = make_cluster(2, bw=1e6, lat=lat)
    stage = PlanStage(layers=(0, 2), ranks=[0, 1], tp=2)
    c = _cost(cluster, stage, stages=1)
    ar = 2 * 1 / 2 * 100 / 1e6 + 2 * lat  # ring all-reduce of 100 B over 2 ranks
    assert ar == pytest.approx(all_reduce_time(ring_of(cluster.links, [0, 1]), 100.0))
    assert c.fwd_s == pytest.approx(2 * 0.01 / 2 + 2 * 2 * ar)
    assert c.bwd_s == pytest.approx(2 * 0.02 / 2 + 2 * 2 * ar)
    assert c.tp_comm_s == pytest.approx(8 * ar)
    # Shard state: 500 B params + 500 B grads + 1000 B Adam per layer; one micro-batch in flight
    # (last stage) of 250 B activations per layer.
    assert c.peak_memory_bytes[0] == pytest.approx(2 * 2000 + 2 * 250)
    # Recompute reruns the forward, collectives included.
    rc = _cost(cluster, stage.model_copy(update={"recompute": True}), stages=1)
    assert rc.bwd_s == pytest.approx(c.bwd_s + c.fwd_s)


def test_layer_sharding_overrides_per_layer() -> None:
    """A layer marked tp=1 runs replicated (full compute, no all-reduce) inside a TP stage."""
    cluster = make_cluster(2, bw=1e6, lat=1e-4)
    ar = all_reduce_time(ring_of(cluster.links, [0, 1]), 100.0)
    stage = PlanStage(layers=(0, 2), ranks=[0, 1], tp=2, layer_sharding=[{"tp": 1}, {}])
    c = _cost(cluster, stage, stages=1)
    assert c.fwd_s == pytest.approx(0.01 + 0.005 + 2 * ar)
    # A recomputed layer among plain ones: its forward again, its input kept, one transient.
    mixed = PlanStage(layers=(0, 2), ranks=[0, 1], dp=2,
                      layer_sharding=[{"recompute": True}, {}])  # fmt: skip
    m = _cost(cluster, mixed, mbs=2, stages=1)
    assert m.bwd_s == pytest.approx(2 * 0.02 + 0.01)
    assert m.activation_bytes[0] == 100 + 500 and m.transient_bytes[0] == 500
    base = {"layers": (0, 2), "ranks": [0, 1], "tp": 2}
    with pytest.raises(ValidationError, match="one per layer"):
        PlanStage(**base, layer_sharding=[{}])
    with pytest.raises(ValidationError, match="tp 3"):
        PlanStage(**base, layer_sharding=[{"tp": 3}, {}])


def test_fsdp_sync_and_memory_by_hand() -> None:
    """FSDP, each layer its own unit, as torch's pipelining runs it: per step a reduce-scatter
    of each layer's grads and one all-gather of each layer's params beyond the backwards'; per
    micro-batch an all-gather in the backward only (the forward after a backward finds the
    layer unsharded); the unsharded params and grads held on top of the shards."""
    cluster = make_cluster(2, bw=1e6, lat=1e-4)
    stage = PlanStage(layers=(0, 2), ranks=[0, 1], dp=2, fsdp=True)
    c = _cost(cluster, stage, mbs=2, stages=1)
    plain = _cost(cluster, stage.model_copy(update={"fsdp": False}), mbs=2, stages=1)
    ring = ring_of(cluster.links, [0, 1])
    # 2 layers of 1000 parameter bytes: the α is paid per layer, not once for 2000 bytes.
    gather = 2 * all_gather_time(ring, 1000.0)
    assert c.grad_sync_s == pytest.approx(2 * reduce_scatter_time(ring, 1000.0) + gather)
    assert c.fwd_s == pytest.approx(plain.fwd_s)
    assert c.bwd_s == pytest.approx(plain.bwd_s + gather)
    assert c.tp_comm_s == pytest.approx(gather)
    # Per layer: (1000 params + 2000 Adam) / 2 sharded, + 1000 params + 1000 grads unsharded.
    assert c.static_bytes[0] == pytest.approx(2 * (3000 / 2 + 2000))


def test_stage_memory_by_hand() -> None:
    """Overhead + weights + grads + Adam state + in-flight activations; FSDP and recompute."""
    prof = make_profile(params=1000, act=500, out=100, overhead=7)
    cluster = make_cluster(4)

    def peak(stage: PlanStage, index: int = 0, stages: int = 3, micro: int = 8) -> float:
        c = stage_cost({"cpu": prof}, cluster, stage, None, mbs=stage.dp, schedule="1F1B",
                       stage_index=index, num_stages=stages, num_micro=micro)  # fmt: skip
        return c.peak_memory_bytes[stage.ranks[0]]

    # 2 layers: state 2·(1000 + 1000 + 2000) = 8000; 3 in flight (stage 0 of 3) x 2·500.
    plain = PlanStage(layers=(0, 2), ranks=[0])
    assert peak(plain) == 7 + 8000 + 3 * 1000
    # The last of 3 stages holds one micro-batch; 2 micro-batches cap the first at 2.
    assert peak(plain, index=2) == 7 + 8000 + 1000
    assert peak(plain, micro=2) == 7 + 8000 + 2 * 1000
    # FSDP over 4 replicas: a quarter of the params and Adam state, and the unsharded params
    # and grads a backward leaves; each replica computes one sample of 4.
    fsdp = PlanStage(layers=(0, 2), ranks=[0, 1, 2, 3], dp=4, fsdp=True)
    assert peak(fsdp) == 7 + 2 * (3000 / 4 + 2000) + 3 * 1000
    # Recompute keeps each layer's input (2·100) per micro-batch plus one layer's activations.
    rc = PlanStage(layers=(0, 2), ranks=[0], recompute=True)
    assert peak(rc) == 7 + 8000 + 3 * 200 + 500


def test_tensor_parallel_stages_send_shard_to_shard() -> None:
    """Receiver TP shard u gets the boundary tensor from sender shard u, all shards in parallel."""
    lat = 1e-4
    cluster = make_cluster(4, bw=1e6, lat=lat)
    a = PlanStage(layers=(0, 2), ranks=[0, 1], tp=2)
    b = PlanStage(layers=(2, 4), ranks=[2, 3], tp=2)
    one = lat + 100 / 1e6
    assert activation_transfer_time(cluster.links, a, b, 1, 100) == pytest.approx(one)
    # A dp=1 → dp=2 boundary: the one sender sends a slice to each replica in turn.
    c = PlanStage(layers=(0, 2), ranks=[0])
    d = PlanStage(layers=(2, 4), ranks=[1, 2], dp=2)
    assert activation_transfer_time(cluster.links, c, d, 2, 100) == pytest.approx(2 * one)


def test_asymmetric_links_row_is_sender() -> None:
    """Activations use this→next links, gradients next→this."""
    cluster = make_cluster(2, bw=[[0, 1e3], [1e9, 0]])
    c = _cost(cluster, PlanStage(layers=(0, 2), ranks=[0]), PlanStage(layers=(2, 4), ranks=[1]))
    assert c.send_s == pytest.approx(100 / 1e3)
    assert c.grad_send_s == pytest.approx(100 / 1e9)


def _tuple_profiles(ahead: int, back: int) -> dict:
    """PROFILE with layer 1 handing on `ahead` tensors, `back` of them carrying gradients."""
    layers = list(PROFILE.layers)
    layers[1] = layers[1].model_copy(update={"output_tensors": ahead,
                                             "output_grad_tensors": back})
    return {"cpu": PROFILE.model_copy(update={"layers": layers})}


@pytest.mark.parametrize(("ahead", "back"), [(1, 1), (3, 1), (2, 2), (3, 0)])
def test_a_boundary_of_several_tensors_is_one_message_each(ahead: int, back: int) -> None:
    """Torch's stages send each tensor of a boundary on its own: n·α + S/β per direction, and
    nothing back when no gradient flows through the boundary."""
    lat, bw = 1e-4, 1e6
    cluster = make_cluster(3, bw=bw, lat=lat)
    stage, nxt = PlanStage(layers=(0, 2), ranks=[0]), PlanStage(layers=(2, 4), ranks=[1])
    c = stage_cost(_tuple_profiles(ahead, back), cluster, stage, nxt, mbs=2, schedule="1F1B",
                   stage_index=0, num_stages=2, num_micro=4)
    assert c.send_s == pytest.approx(ahead * lat + 2 * 100 / bw)
    assert c.grad_send_s == pytest.approx(back * lat + 2 * 100 / bw if back else 0.0)
    # Boundaries elsewhere keep one message each: the next stage's own sends are unchanged.
    later = stage_cost(_tuple_profiles(ahead, back), cluster, PlanStage(layers=(2, 3), ranks=[1]),
                       PlanStage(layers=(3, 4), ranks=[2]), mbs=2, schedule="1F1B",
                       stage_index=1, num_stages=3, num_micro=4)
    assert later.send_s == pytest.approx(lat + 2 * 100 / bw)


def test_boundary_messages_split_the_bytes_among_the_tensors() -> None:
    a, b = PlanStage(layers=(0, 2), ranks=[0]), PlanStage(layers=(2, 4), ranks=[1, 2], dp=2)
    one = boundary_messages(a, b, 4, 100.0)
    three = boundary_messages(a, b, 4, 100.0, tensors=3)
    assert len(three) == 3 * len(one) == 6
    assert sum(n for *_, n in three) == pytest.approx(sum(n for *_, n in one))
    assert {(s, d) for s, d, _ in three} == {(s, d) for s, d, _ in one}
    assert boundary_messages(a, b, 4, 100.0, tensors=0) == []
