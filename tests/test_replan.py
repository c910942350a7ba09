"""pdv replan: matching devices, what changed, the switch's cost (against brute force), the
search on the changed cluster, and the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pdv import artifacts
from pdv.artifacts import ClusterArtifact, Plan, PlanStage
from pdv.errors import PdvError
from pdv.plan.replan import describe_change, match_devices, remap_plan, replan, switch_cost
from tests.conftest import run_pdv
from tests.plan_fixtures import GiB, cluster, profile
from tests.test_run_cli import assert_one_line_error

MiB = 1 << 20


def _plan(stages: list[dict], gbs: int = 8, mbs: int = 2) -> Plan:
    return Plan.model_validate({
        "schema": "pdv.plan/v1", "stages": stages, "micro_batch_size": mbs,
        "num_micro_batches": gbs // mbs, "global_batch_size": gbs,
        "model": {"spec": "gpt_tiny"},
    })


def _flat(n: int, hosts: list[str] | None = None, bw: float = 1e9, **kw: object) -> ClusterArtifact:
    hosts = hosts or ["h0"] * n
    return cluster(hosts, [[bw] * n for _ in range(n)], **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- matching devices


def test_devices_match_by_host_and_position() -> None:
    old = _flat(4, ["a", "a", "b", "b"]).devices
    new = _flat(3, ["b", "a", "a"]).devices  # host b lost its second rank; order changed
    assert match_devices(old, new) == {0: 1, 1: 2, 2: 0}


def test_kept_names_the_old_rank_of_each_new_rank() -> None:
    old, new = _flat(4).devices, _flat(4).devices
    assert match_devices(old, new, [0, 1, 3]) == {0: 0, 1: 1, 3: 2}  # new rank 3 is added
    with pytest.raises(PdvError, match="twice"):
        match_devices(old, new, [0, 0])
    with pytest.raises(PdvError, match="not in the plan"):
        match_devices(old, new, [7])


def test_changes_name_gone_added_slowed_and_degraded() -> None:
    old = _flat(3, flops=[1e12, 1e12, 1e12])
    new = _flat(3, flops=[1e12, 0.4e12, 1e12])
    new = new.model_copy(update={"links": new.links.model_copy(update={
        "bandwidth_Bps": [[0.0, 1e9, 1e8], [1e9, 0.0, 1e9], [1e9, 1e9, 0.0]]})})
    lines = describe_change(old.devices, new, {0: 0, 1: 1}, old.links)
    assert "rank 2 (h0, gpu) is gone" in lines
    assert "rank 2 (h0, gpu) is new" in lines
    assert any(line.startswith("rank 1 (now 1) computes 0.40x as fast (slower)") for line in lines)
    # the link now from 0 to 2 is old 0 -> (new) 2, but old rank 2 is gone: no link line for it
    assert not any(line.startswith("link") for line in lines)
    lines = describe_change(old.devices, new, {0: 0, 1: 2}, old.links)
    assert any(line.startswith("link 0->1 (now 0->2)") and "slower" in line for line in lines)


# --------------------------------------------------------------------------- switch cost

GRID = 12  # every degree below divides it, so the brute force is exact


def _units(plan: Plan, layer: int) -> dict[int, set[tuple[int, int]]]:
    """Brute force: each rank's holding of the layer as a set of GRID x GRID units."""
    out: dict[int, set[tuple[int, int]]] = {}
    for s in plan.stages:
        if not s.layers[0] <= layer < s.layers[1]:
            continue
        for k, r in enumerate(s.ranks):
            replica, shard = divmod(k, s.tp)
            tp = range(GRID) if s.tp == 1 else range(shard * GRID // s.tp,
                                                      (shard + 1) * GRID // s.tp)
            fs = range(GRID) if not (s.fsdp and s.dp > 1) else range(
                replica * GRID // s.dp, (replica + 1) * GRID // s.dp)
            out[r] = {(i, j) for i in tp for j in fs}
    return out


def _brute(old: Plan, new: Plan, sizes: list[int], mapping: dict[int, int]) -> tuple[float, float]:
    back = {n: o for o, n in mapping.items()}
    moved = ckpt = 0.0
    for layer, size in enumerate(sizes):
        before, after = _units(old, layer), _units(new, layer)
        alive = set().union(*(u for r, u in before.items() if r in mapping))
        for rank, units in after.items():
            need = units - before.get(back.get(rank, -1), set())
            moved += size * len(need) / GRID**2
            ckpt += size * len(need - alive) / GRID**2
    return moved, ckpt


def _random_plan(rng: random.Random, n_layers: int, ranks: list[int]) -> Plan:
    cuts = sorted(rng.sample(range(1, n_layers), rng.randint(0, min(2, n_layers - 1))))
    bounds = [0, *cuts, n_layers]
    pool = list(ranks)
    rng.shuffle(pool)
    stages = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        tp, dp = rng.choice([(1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (2, 2)])
        if len(pool) < tp * dp:
            tp, dp = 1, 1
        if not pool:
            return _random_plan(rng, n_layers, ranks)
        group, pool = pool[: tp * dp], pool[tp * dp:]
        stages.append({"layers": [lo, hi], "ranks": group, "tp": tp, "dp": dp,
                       "fsdp": dp > 1 and rng.random() < 0.5})
    return _plan(stages, gbs=12, mbs=6)


def test_switch_cost_matches_brute_force_on_random_plans() -> None:
    rng = random.Random(14)
    for _ in range(60):
        n_layers = rng.randint(1, 4)
        prof = profile(n_layers=n_layers, param_bytes=rng.choice([1, 3, 12]) * MiB)
        sizes = [lp.param_bytes + lp.optimizer_bytes for lp in prof.layers]
        old = _random_plan(rng, n_layers, list(range(6)))
        survivors = sorted(rng.sample(range(6), rng.randint(1, 6)))
        mapping = {o: n for n, o in enumerate(survivors)}
        new = _random_plan(rng, n_layers, list(range(len(survivors))))
        net = _flat(len(survivors))
        cost = switch_cost(old, new, prof, net.links, mapping)
        moved, ckpt = _brute(old, new, sizes, mapping)
        assert cost.moved_bytes == pytest.approx(moved, abs=1)
        assert cost.checkpoint_only_bytes == pytest.approx(ckpt, abs=1)
        assert sum(b for *_, b in cost.transfers) == pytest.approx(moved - ckpt, abs=len(
            cost.transfers) + 1)
        assert all(s != d for s, d, _ in cost.transfers)
        assert (cost.estimate_s > 0) == bool(cost.transfers)


def test_switch_cost_of_an_unchanged_plan_is_nothing() -> None:
    prof = profile(n_layers=4)
    plan = _plan([{"layers": [0, 2], "ranks": [0, 1], "tp": 2},
                  {"layers": [2, 4], "ranks": [2, 3], "dp": 2, "fsdp": True}])
    cost = switch_cost(plan, plan, prof, _flat(4).links, {r: r for r in range(4)})
    assert (cost.moved_bytes, cost.checkpoint_only_bytes, cost.transfers) == (0, 0, ())
    assert cost.held_bytes == 4 * 3 * 64 * MiB  # each layer once, params + Adam state


def test_switch_cost_takes_the_faster_replica_and_prices_its_link() -> None:
    prof = profile(n_layers=2, param_bytes=10 * MiB)
    old = _plan([{"layers": [0, 2], "ranks": [0, 1, 2], "dp": 3}], gbs=6, mbs=6)
    new = _plan([{"layers": [0, 1], "ranks": [0]}, {"layers": [1, 2], "ranks": [1]}])
    # device 2 is gone: new rank 0 is old 1 and new rank 1 is old 0, each holds everything
    net = cluster(["h"] * 2, [[0, 1e8], [1e9, 0]])
    cost = switch_cost(old, new, prof, net.links, {1: 0, 0: 1})
    assert cost.moved_bytes == 0 and cost.transfers == ()
    # a new device holds nothing: it takes layer 0 (30 MiB) from the faster of two senders
    net3 = cluster(["h"] * 3, [[0, 1e9, 1e7], [1e9, 0, 1e9], [1e9, 1e9, 0]])  # row = sender
    new3 = _plan([{"layers": [0, 2], "ranks": [2]}], gbs=6, mbs=6)
    cost = switch_cost(old, new3, prof, net3.links, {0: 0, 1: 1})
    assert cost.transfers == ((1, 2, 60 * MiB),)  # 1 -> 2 runs at 1 GB/s, 0 -> 2 at 10 MB/s
    assert cost.estimate_s == pytest.approx(1e-5 + 60 * MiB / 1e9)


# --------------------------------------------------------------------------- the search


def test_replan_after_a_rank_is_gone() -> None:
    prof = profile(kind="gpu", n_layers=4)
    old_cl = _flat(4)
    old = _plan([{"layers": [i, i + 1], "ranks": [i]} for i in range(4)])
    old = old.model_copy(update={"devices": list(old_cl.devices)})
    new_cl = _flat(3)
    res = replan(old, {"gpu": prof}, new_cl, {0: 0, 1: 1, 2: 2}, old_links=old_cl.links)
    assert res.plan.global_batch_size == old.global_batch_size
    assert {r for s in res.plan.stages for r in s.ranks} <= {0, 1, 2}
    assert res.changes == ["rank 3 (h0, gpu) is gone"]
    assert res.old_on_new_s is None  # its rank 3 is gone
    assert res.plan.provenance.inputs["previous-plan"] == artifacts.digest(old)
    assert res.cost.held_bytes > 0 and res.cost.checkpoint_only_bytes <= res.cost.moved_bytes
    # the same inputs give the same plan, byte for byte
    again = replan(old, {"gpu": prof}, new_cl, {0: 0, 1: 1, 2: 2}, old_links=old_cl.links)
    assert artifacts.dumps(again.plan) == artifacts.dumps(res.plan)


def test_replan_prices_the_old_plan_on_a_slowed_cluster() -> None:
    prof = profile(kind="gpu", n_layers=4)
    old_cl = _flat(2)
    old = _plan([{"layers": [0, 2], "ranks": [0]}, {"layers": [2, 4], "ranks": [1]}])
    old = old.model_copy(update={"devices": list(old_cl.devices)})
    slowed = _flat(2, flops=[1e12, 0.25e12])
    res = replan(old, {"gpu": prof}, slowed, {0: 0, 1: 1})
    assert res.old_on_new_s is not None and res.plan.predicted is not None
    moved = remap_plan(old, {0: 0, 1: 1}, slowed)
    assert moved is not None and moved.stages == old.stages
    # the new plan is never predicted slower than keeping the old one on the slowed cluster
    assert res.plan.predicted.step_time_s <= res.old_on_new_s * (1 + 1e-9)


def test_replan_on_an_unchanged_cluster_keeps_the_plan() -> None:
    prof = profile(kind="gpu", n_layers=4)
    cl = _flat(4)
    found = replan(_plan([{"layers": [0, 4], "ranks": [0]}]), {"gpu": prof}, cl,
                   {r: r for r in range(4)}).plan
    res = replan(found, {"gpu": prof}, cl, {r: r for r in range(4)})
    assert res.plan.stages == found.stages and res.cost.moved_bytes == 0
    assert "kept the old plan" in res.plan.provenance.notes[-1]
    assert res.plan.predicted == found.predicted


def test_no_plan_on_too_few_ranks_says_so() -> None:
    prof = profile(kind="gpu", n_layers=4, param_bytes=512 * MiB)
    old = _plan([{"layers": [0, 2], "ranks": [0]}, {"layers": [2, 4], "ranks": [1]}])
    tiny = _flat(1, memory=GiB)
    with pytest.raises(PdvError, match="no plan on the new cluster's 1 ranks: no plan fits"):
        replan(old, {"gpu": prof}, tiny, {0: 0})


def test_the_profile_must_be_of_the_plan_s_model() -> None:
    prof = profile(kind="gpu", n_layers=4)
    other = _plan([{"layers": [0, 4], "ranks": [0]}]).model_copy(
        update={"model": artifacts.ModelSpec(spec="mlp")})
    with pytest.raises(PdvError, match="the plan trains mlp"):
        replan(other, {"gpu": prof}, _flat(1), {0: 0})
    assert isinstance(other.stages[0], PlanStage)


# --------------------------------------------------------------------------- command line


def _write(path: Path, artifact: object) -> Path:
    artifacts.write(path, artifact)  # type: ignore[arg-type]
    return path


def test_replan_command(tmp_path: Path) -> None:
    prof = _write(tmp_path / "p.json", profile(kind="gpu", n_layers=4))
    old_cl = _flat(4, ["a", "a", "b", "b"])
    plan = _plan([{"layers": [i, i + 1], "ranks": [i]} for i in range(4)])
    plan_path = _write(tmp_path / "plan.json", plan.model_copy(
        update={"devices": list(old_cl.devices)}))
    new_cl = _write(tmp_path / "new.json", _flat(3, ["a", "b", "b"]))
    out = tmp_path / "new-plan.json"
    res = run_pdv("replan", str(plan_path), "--cluster", str(new_cl), "-p", str(prof),
                  "-o", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["changes"] == ["rank 1 (a, gpu) is gone"]
    assert summary["mapping"] == {"0": 0, "2": 1, "3": 2}
    assert summary["old_on_new_cluster_step_s"] is None
    assert summary["new_predicted_step_s"] > 0
    assert summary["new_plan_digest"] == artifacts.digest(artifacts.load_as(out, "plan"))
    text = run_pdv("replan", str(plan_path), "--cluster", str(new_cl), "-p", str(prof),
                   "--kept", "0,1,3")
    assert text.returncode == 0, text.stderr
    assert "rank 2 (b, gpu) is gone" in text.stdout and "switch:" in text.stdout


def test_replan_command_bad_input(tmp_path: Path) -> None:
    prof = _write(tmp_path / "p.json", profile(kind="gpu", n_layers=4, param_bytes=512 * MiB))
    plan = _plan([{"layers": [0, 2], "ranks": [0]}, {"layers": [2, 4], "ranks": [1]}])
    plan_path = _write(tmp_path / "plan.json", plan)
    tiny = _write(tmp_path / "tiny.json", _flat(1, memory=GiB))
    assert_one_line_error(run_pdv("replan", str(plan_path), "--cluster", str(tiny), "-p",
                                  str(prof), "--kept", "0"), "no plan on the new cluster's 1")
    assert_one_line_error(run_pdv("replan", str(plan_path), "--cluster", str(tiny), "-p",
                                  str(prof)), "lists no devices", "--kept")
    assert_one_line_error(run_pdv("replan", str(plan_path), "--cluster", str(tiny), "--kept",
                                  "0"), "no model profile")
    assert run_pdv("replan", "--help").returncode == 0
