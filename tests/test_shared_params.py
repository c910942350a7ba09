"""Parameters several layers share (a tied embedding and LM head, a module at several places):
recorded by the profile, held and stepped once by a stage that holds several of their places,
and summed across the stages that split them once per step."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from pdv import artifacts
from pdv.artifacts import LayerChoice, PlanStage, SharedParams
from pdv.cost.comm import Ring, all_reduce_time, ring_of
from pdv.cost.simulate import simulate, tied_syncs
from pdv.cost.terms import RankView, RingView, StageGroup, price_layers, price_ranges
from pdv.errors import PdvError
from pdv.models import ModelDef
from pdv.plan.groups import folded
from pdv.plan.objective import stage_price
from pdv.plan.problem import PlanProblem
from pdv.plan.reasons import _state_short
from pdv.plan.search import search
from pdv.plan.sharding import refine_stage
from pdv.profile.layers import profile_model
from pdv.profile.request import ProfileRequest
from tests.plan_fixtures import cluster as plan_cluster
from tests.plan_fixtures import profile as plan_profile
from tests.test_cost_builders import make_cluster, make_plan, make_profile
from tests.test_plan_sharding import _instance, brute_force_best

torch.set_num_threads(1)

PARAMS = 1000  # make_profile's bytes per layer: grads the same, optimizer state twice


def _shared(profile: artifacts.ModelProfile, *sets: tuple[list[int], int, int]
            ) -> artifacts.ModelProfile:  # fmt: skip
    shared = [SharedParams(layers=places, param_bytes=b, grad_bytes=b, optimizer_bytes=2 * b,
                           tensors=n) for places, b, n in sets]
    return profile.model_copy(update={"shared": shared})


def _group(dp: int = 2) -> StageGroup:
    ring = RingView(Ring(dp, 1e-5, 1e8), ("cpu",))
    return StageGroup(ranks=tuple(RankView("cpu", 1.0, 0.0, 1e12) for _ in range(dp)),
                      tp_rings=(RingView(Ring(1, 0.0, 1e9), ("cpu",)),) * dp,
                      dp_rings=(ring,), tp=1, dp=dp)


@pytest.mark.parametrize("choice", [
    LayerChoice(), LayerChoice(fsdp=True), LayerChoice(recompute=True),
])  # fmt: skip
def test_every_range_prices_shared_copies_as_one_range(choice: LayerChoice) -> None:
    """price_ranges (the DP) and price_layers (the simulator) agree with shared sets of two
    and of three places, on ranges that hold none, some or all of them."""
    base = make_profile("cpu", n_layers=7, fwd=[0.01, 0.02, 0.005, 0.03, 0.01, 0.02, 0.01],
                        params=PARAMS, optimizer_s=0.004)
    profiles = {"cpu": _shared(base, ([0, 6], 400, 1), ([2, 3, 5], 250, 3))}
    group = _group()
    bounds = np.arange(8)
    table = price_ranges(profiles, group, 2, choice, bounds, num_micro=3)
    for lo in range(7):
        for hi in range(lo + 1, 8):
            one = price_layers(profiles, group, 2, lo, [choice] * (hi - lo), num_micro=3)
            for field in ("grad_sync_s", "optimizer_s"):
                assert getattr(table, field)[lo, hi] == pytest.approx(float(getattr(one, field)))
            assert table.static_bytes[:, lo, hi] == pytest.approx(one.static_bytes)


def test_a_stage_holds_and_steps_one_copy_and_syncs_it_only_when_it_holds_every_place() -> None:
    """State and optimizer step count one copy wherever a stage holds several places; the
    replicas' all-reduce carries it only where no other stage holds a place."""
    tie = 400
    base = make_profile("cpu", n_layers=4, params=PARAMS, optimizer_s=0.004)
    profiles = {"cpu": _shared(base, ([0, 3], tie, 1))}
    plain = {"cpu": base}
    group = _group()
    ring = group.dp_rings[0].ring

    def price(p, lo, hi):
        return price_layers(p, group, 2, lo, [LayerChoice()] * (hi - lo), num_micro=2)

    whole, whole_plain = price(profiles, 0, 4), price(plain, 0, 4)
    per_byte_of_state = 4  # parameters, gradients, two of optimizer state
    assert whole_plain.static_bytes - whole.static_bytes == pytest.approx(
        [per_byte_of_state * tie] * 2)
    assert whole_plain.optimizer_s - whole.optimizer_s == pytest.approx(0.004 * tie / PARAMS)
    assert whole.grad_sync_s == pytest.approx(all_reduce_time(ring, 4 * PARAMS - tie))
    # A stage holding one place of a split set keeps its copy but leaves its sync to the
    # holders' own all-reduce.
    front, front_plain = price(profiles, 0, 2), price(plain, 0, 2)
    assert front.static_bytes == pytest.approx(front_plain.static_bytes)
    assert front.optimizer_s == pytest.approx(front_plain.optimizer_s)
    assert front.grad_sync_s == pytest.approx(all_reduce_time(ring, 2 * PARAMS - tie))
    # FSDP leaves a split copy out of its shards: the stage holds it whole.
    fsdp = [LayerChoice(fsdp=True)] * 2
    sharded = price_layers(profiles, group, 2, 0, fsdp, num_micro=2)
    sharded_plain = price_layers(plain, group, 2, 0, fsdp, num_micro=2)
    per_layer = (PARAMS + 2 * PARAMS) / 2 + 2 * PARAMS  # (P + O) / dp + P + G
    assert sharded_plain.static_bytes == pytest.approx([2 * per_layer] * 2)
    assert sharded.static_bytes == pytest.approx(
        [2 * per_layer - per_layer * tie / PARAMS + per_byte_of_state * tie] * 2)
    # Layers holding none of it price as before.
    middle, middle_plain = price(profiles, 1, 3), price(plain, 1, 3)
    assert middle.grad_sync_s == pytest.approx(middle_plain.grad_sync_s)
    assert middle.static_bytes == pytest.approx(middle_plain.static_bytes)


def _pipeline(ranks_per_stage: list[list[int]], layers: list[tuple[int, int]]):
    stages = [PlanStage(layers=list(lh), ranks=r, dp=len(r))
              for lh, r in zip(layers, ranks_per_stage, strict=True)]
    return make_plan(stages, mbs=2, num_micro=4)


def test_split_copies_are_summed_after_every_holders_sync_before_they_step() -> None:
    """A pp2 plan that splits a tied pair: the step grows by exactly the holders' all-reduce
    (each tensor its own), both stages step after it, and a one-stage plan has none."""
    tie = 40_000
    base = make_profile("cpu", n_layers=4, params=100_000, optimizer_s=0.003)
    tied = {"cpu": _shared(base, ([0, 3], tie, 2))}
    cluster = make_cluster(2, bw=1e8, lat=1e-4)
    plan = _pipeline([[0], [1]], [(0, 2), (2, 4)])
    with_tie, without = simulate(plan, tied, cluster), simulate(plan, {"cpu": base}, cluster)
    ring = ring_of(cluster.links, [0, 1])
    expect = 2 * float(all_reduce_time(ring, tie / 2))
    (sync,) = tied_syncs(plan, tied, cluster)
    assert sync.stages == (0, 1) and sync.seconds == pytest.approx(expect)
    assert with_tie.step_time_s - without.step_time_s == pytest.approx(expect)
    assert any("layers 0, 3 share" in n and "ranks [0, 1]" in n for n in with_tie.notes)
    sums = [e for e in with_tie.events if e.name == "tied-sync"]
    assert {e.stage for e in sums} == {0, 1}
    end = max(e.end_s for e in sums)
    assert all(e.start_s >= end - 1e-12 for e in with_tie.events if e.name == "opt")
    last_b = max(e.end_s for e in with_tie.events if e.name == "B")
    assert min(e.start_s for e in sums) == pytest.approx(last_b)
    one = _pipeline([[0, 1]], [(0, 4)])
    assert tied_syncs(one, tied, cluster) == ()
    assert not [e for e in simulate(one, tied, cluster).events if e.name == "tied-sync"]


def test_a_stage_between_split_copies_does_not_wait_for_their_sum() -> None:
    tie = 40_000
    base = make_profile("cpu", n_layers=3, params=100_000, optimizer_s=0.003)
    tied = {"cpu": _shared(base, ([0, 2], tie, 1))}
    cluster = make_cluster(3, bw=1e8, lat=1e-4)
    plan = _pipeline([[0], [1], [2]], [(0, 1), (1, 2), (2, 3)])
    sim = simulate(plan, tied, cluster)
    synced = {e.stage: e.end_s for e in sim.events if e.name == "B"}
    opt = {e.stage: e.start_s for e in sim.events if e.name == "opt"}
    sums = {e.stage: e.end_s for e in sim.events if e.name == "tied-sync"}
    assert set(sums) == {0, 2}
    assert opt[1] == pytest.approx(synced[1])  # no replicas: its step follows its backward
    assert opt[0] >= sums[0] and opt[2] >= sums[2]


class _Embed(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids)


class _Head(nn.Module):
    def __init__(self, embed: _Embed) -> None:
        super().__init__()
        self.out = nn.Linear(embed.tok.embedding_dim, embed.tok.num_embeddings, bias=False)
        self.out.weight = embed.tok.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h)


def shared_lm(vocab: int = 96, d: int = 24, places: int = 3) -> ModelDef:
    """A tied embedding and head around one Linear used at `places` places (ALBERT-like)."""
    embed, mix = _Embed(vocab, d), nn.Linear(d, d)
    layers = [("embed", embed), *((f"mix{i}", mix) for i in range(places)),
              ("head", _Head(embed))]

    def make_batch(mbs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(vocab, (mbs, 5), generator=gen)
        return ids, torch.randint(vocab, (mbs, 5), generator=gen)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    return ModelDef(layers=layers, make_batch=make_batch, loss_fn=loss)


@pytest.mark.parametrize("estimate", [False, True])
def test_profile_records_each_shared_set_once(estimate: bool) -> None:
    profile = profile_model(ProfileRequest(
        spec="tests.test_shared_params:shared_lm", kwargs={"vocab": 96, "d": 24, "places": 3},
        micro_batch_sizes=(1,), warmup=1, repeat=2, estimate=estimate))
    sets = {tuple(s.layers): s for s in profile.shared}
    assert set(sets) == {(0, 4), (1, 2, 3)}
    assert sets[(0, 4)].param_bytes == 96 * 24 * 4 and sets[(0, 4)].tensors == 1
    assert sets[(1, 2, 3)].param_bytes == (24 * 24 + 24) * 4 and sets[(1, 2, 3)].tensors == 2
    assert sets[(1, 2, 3)].optimizer_bytes == 2 * sets[(1, 2, 3)].grad_bytes
    # each place still counts its own bytes (older profiles price as before)
    assert profile.layers[4].param_bytes == 96 * 24 * 4
    again = artifacts.parse(json.loads(artifacts.dumps(profile)))
    assert again == profile


def test_profiles_without_shared_sets_keep_their_bytes() -> None:
    p = make_profile("cpu", n_layers=2)
    assert '"shared"' not in artifacts.dumps(p)
    assert '"shared"' in artifacts.dumps(_shared(p, ([0, 1], 10, 1)))
    with pytest.raises(PdvError, match="distinct ascending"):
        artifacts.parse(json.loads(artifacts.dumps(_shared(p, ([1, 0], 10, 1)))))


@pytest.mark.parametrize("split", [False, True])
def test_cp_sat_refines_a_stage_with_shared_places_as_brute_force_does(split: bool) -> None:
    """CP-SAT's correction for shared parameters (its places one class each, one option for
    all of them) finds the best per-layer assignment the float price allows, on stages that
    hold every place of a set and on stages that hold one place of a split set."""
    compared = 0
    for seed in range(60):
        drawn = _instance(random.Random(seed))
        if drawn is None:
            continue
        problem, spec, mbs = drawn
        n = problem.num_layers
        if n < 3:
            continue
        prof = next(iter(problem.profiles.values()))
        tie = prof.layers[0].param_bytes // 2
        prof = _shared(prof, ([0, n - 1], tie, 1))
        problem = replace(problem, profiles={prof.device.kind: prof})
        spec = replace(spec, hi=n - 1) if split else spec
        M = problem.global_batch // mbs
        ref = stage_price(problem, spec, mbs, 1, M, None)
        if not ref.fits:
            continue
        ref_busy = M * ref.time_s + ref.sync_s
        best = brute_force_best(problem, spec, mbs, M, ref, [0] if split else [0, n - 1])
        res = refine_stage(problem, spec, mbs, 1, M, None)
        assert res.status == "OPTIMAL", (seed, res.status)
        got = stage_price(problem, res.stage, mbs, 1, M, None)
        busy = M * got.time_s + got.sync_s
        assert got.fits and busy <= ref_busy + 1e-12, seed
        assert busy <= best * (1 + 1e-6) + 8e-9 * M * (spec.hi - spec.lo + 2), (seed, busy, best)
        compared += 1
    assert compared >= 15, compared


def test_a_model_is_short_of_room_only_counting_its_shared_state_once() -> None:
    """The no-plan check "the model's state cannot fit" counts shared parameters once, as a
    stage holding all their places does."""
    layer = 100 << 20
    base = make_profile("cpu", n_layers=4, params=layer)  # 4 x (P + G + 2P) = 1600 MiB
    tied = _shared(base, ([0, 3], layer, 1))  # one copy fewer: 1200 MiB
    cluster = make_cluster(2, memory=700 << 20)  # 1400 MiB of room, less the overheads
    assert _state_short(PlanProblem({"cpu": base}, cluster, 4)) is not None
    assert _state_short(PlanProblem({"cpu": tied}, cluster, 4)) is None


def test_folded_order_puts_the_ends_next_to_each_other() -> None:
    assert folded([5, 1, 4, 0, 3, 2]) == [5, 4, 3, 2, 0, 1]
    assert folded([0, 1, 2, 3], [[2, 3], [0, 1]]) == [0, 1, 2, 3]  # two islands: nothing to fold
    assert folded([0, 1, 2, 3, 4, 5], [[0, 1], [2, 3], [4, 5]]) == [0, 1, 4, 5, 2, 3]


def test_the_search_keeps_a_split_ties_sum_on_a_fast_link() -> None:
    """Two hosts of two devices, 40 MB/s between them: a pipeline over all four devices in
    bandwidth order sums the tied embedding's 256 MiB copies across the slow link every step.
    Aware of the sum, pdv's search finds a faster plan than the one it picks without it (the
    same plan re-priced with the sum), and the sum it pays runs inside one host."""
    fwd = [0.05, 0.3, 0.3, 0.3, 0.3, 0.05]
    base = plan_profile(n_layers=6, fwd=fwd, param_bytes=64 << 20, act_bytes=1 << 20,
                        out_bytes=1 << 20, tp_degrees=(1,))
    tied = _shared(base, ([0, 5], 256 << 20, 1))
    fast, slow = 10e9, 40e6
    hosts = ["a", "a", "b", "b"]
    bw = [[fast if hosts[i] == hosts[j] else slow for j in range(4)] for i in range(4)]
    cl = plan_cluster(hosts, bw)

    def best(profile: artifacts.ModelProfile) -> artifacts.Plan:
        problem = PlanProblem({"gpu": profile}, cl, 8, allow_fsdp=False, allow_recompute=False)
        return search(problem, "pdv").plans[0]

    aware, unaware = best(tied), best(base)
    aware_s = simulate(aware, {"gpu": tied}, cl).step_time_s
    unaware_s = simulate(unaware, {"gpu": tied}, cl).step_time_s
    assert aware_s < 0.95 * unaware_s, (aware_s, unaware_s)
    for tie in tied_syncs(aware, {"gpu": tied}, cl):
        assert len({hosts[r] for r in tie.ranks}) == 1, tie
