"""Topology files of N hosts and the tc commands that shape them (pure code, no root needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import thesis
from benchmarks.testbed import shaping, topology


def _topo(tmp_path: Path, data: dict[str, Any]) -> topology.Topology:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    return topology.load(path)


def _hosts(*names: str, **extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": n, "ranks": [{}], **extra.get(n, {})} for n in names]


def test_every_checked_in_topology_loads() -> None:
    worlds = {}
    for path in sorted(thesis.TOPOLOGIES.glob("*.json")):
        topo = topology.load(path)
        worlds[topo.name] = topo.world
        assert [r for r, _, _ in topo.rank_hosts()] == list(range(topo.world))
        cpus = [spec.cpu for _, _, spec in topo.rank_hosts() if spec.cpu]
        # Quota'd ranks get a large CPU weight: together they must leave the machine a core.
        assert sum(cpus) <= 1.8, f"{path.name}: quotas add up to {sum(cpus)} cores"
    assert worlds["geo-split"] == 4 and worlds["inverted-4"] == 8 and worlds["pcie-box"] == 5
    for name in thesis.SCENARIOS:
        assert (thesis.TOPOLOGIES / f"{name}.json").exists()


def test_pair_rates_overrides_and_uplinks(tmp_path: Path) -> None:
    topo = _topo(tmp_path, {
        "inter_host": "400mbit",
        "links": [{"hosts": ["c", "b"], "rate": "20mbit"},
                  {"hosts": ["a", "e"], "latency": "2ms"}],
        "hosts": _hosts("a", "b", "c", "d", "e", d={"uplink": "100mbit"}),
    })
    assert topo.name == "t" and topo.world == 5
    assert topo.pair_rate("b", "c") == topo.pair_rate("c", "b") == "20mbit"
    assert topo.pair_rate("a", "e") == "400mbit"  # a latency-only override keeps the rate
    assert topo.pair_latency("e", "a") == "2ms" and topo.pair_latency("a", "b") is None
    assert topo.effective_rate("a", "d") == topo.effective_rate("d", "c") == 100e6
    assert topo.effective_rate("c", "b") == 20e6
    assert topology.parse_duration("2ms") == pytest.approx(0.002)
    assert topology.parse_duration("500us") == pytest.approx(5e-4)


@pytest.mark.parametrize(("data", "message"), [
    ({"hosts": _hosts("a")}, "at least 2 hosts"),
    ({"hosts": _hosts("a", "a")}, "repeat"),
    ({"hosts": _hosts("a", "b-1")}, "letters or digits"),
    ({"hosts": _hosts("a", "b"), "links": [{"hosts": ["a", "z"], "rate": "1mbit"}]},
     "two different hosts"),
    ({"hosts": _hosts("a", "b"), "links": [{"hosts": ["a", "a"], "rate": "1mbit"}]},
     "two different hosts"),
    ({"hosts": _hosts("a", "b"), "links": [{"hosts": ["a", "b"], "rate": "1mbit"},
                                           {"hosts": ["b", "a"], "rate": "2mbit"}]},
     "given twice"),
    ({"hosts": _hosts("a", "b"), "links": [{"hosts": ["a", "b"]}]}, "neither rate nor"),
    ({"hosts": _hosts("a", "b"), "links": [{"hosts": ["a", "b"], "rate": "fast"}]}, "50mbit"),
    ({"hosts": _hosts("a", "b"), "links": [{"hosts": ["a", "b"], "latency": "soon"}]}, "2ms"),
    ({"hosts": _hosts("a", "b", a={"uplink": "1mbit"}),
      "links": [{"hosts": ["a", "b"], "latency": "1ms"}]}, "cannot combine"),
    ({"hosts": _hosts("a", "b"), "inter_hosts": "1mbit"}, "unknown keys"),
    ({"hosts": [{"name": "a", "ranks": []}, {"name": "b", "ranks": [{}]}]}, "no ranks"),
    ({"hosts": [{"ranks": [{}]}, {"name": "b", "ranks": [{}]}]}, "malformed"),
])
def test_bad_topologies_are_refused_with_the_reason(tmp_path: Path, data: dict[str, Any],
                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _topo(tmp_path, data)


def test_inverted_hierarchy_is_read_from_the_file(tmp_path: Path) -> None:
    two = [{}, {}]
    inverted = {"inter_host": "400mbit",
                "hosts": [{"name": "a", "lo": "20mbit", "ranks": two}, *_hosts("b", "c")]}
    assert _topo(tmp_path, inverted).inverts_hierarchy()
    # the host's only other links are slower than its lo: the hierarchy holds
    slow_out = {**inverted, "links": [{"hosts": ["a", "b"], "rate": "10mbit"},
                                      {"hosts": ["a", "c"], "rate": "10mbit"}]}
    assert not _topo(tmp_path, slow_out).inverts_hierarchy()
    # an uplink below lo's rate caps every way out of the host
    capped = {**inverted, "hosts": [{"name": "a", "lo": "20mbit", "uplink": "15mbit",
                                     "ranks": two}, *_hosts("b", "c")]}
    assert not _topo(tmp_path, capped).inverts_hierarchy()
    # one rank per host: nothing inside a host to invert; unshaped pairs count as fast
    assert not _topo(tmp_path, {"hosts": _hosts("a", "b")}).inverts_hierarchy()
    unshaped = {"hosts": [{"name": "a", "lo": "1gbit", "ranks": two}, *_hosts("b")]}
    assert _topo(tmp_path, unshaped).inverts_hierarchy()
    names = {"pcie-box", "inverted-4", "inverted", "inverted-ci", "three-hosts"}
    for path in thesis.TOPOLOGIES.glob("*.json"):
        assert topology.load(path).inverts_hierarchy() == (path.stem in names), path.name


def test_each_destination_gets_its_own_htb_class_and_filter() -> None:
    dests = [shaping.Dest("10.78.0.2", 20e6), shaping.Dest("10.78.0.3", None),
             shaping.Dest("10.78.0.4", 400e6)]
    cmds = shaping.pair_commands("eth", dests, None, 16384)
    assert cmds[0] == ["tc", "qdisc", "replace", "dev", "eth", "root", "handle", "1:", "htb",
                       "default", "0"]
    classes = [c for c in cmds if c[1] == "class"]
    filters = [c for c in cmds if c[1] == "filter"]
    # the unshaped destination has no class: its traffic leaves unclassified, unshaped
    assert [c[c.index("classid") + 1] for c in classes] == ["1:10", "1:12"]
    assert [c[c.index("rate") + 1] for c in classes] == ["20000000bit", "400000000bit"]
    assert [c[c.index("ceil") + 1] for c in classes] == ["20000000bit", "400000000bit"]
    assert [c[c.index("parent") + 1] for c in classes] == ["1:", "1:"]
    # 2 ms of traffic at 400 Mbit/s is 100 kB, more than the floor
    assert [c[c.index("burst") + 1] for c in classes] == ["16384b", "100000b"]
    assert [(c[c.index("dst") + 1], c[c.index("flowid") + 1]) for c in filters] == [
        ("10.78.0.2/32", "1:10"), ("10.78.0.4/32", "1:12")]
    assert shaping.pair_commands("eth", [shaping.Dest("10.78.0.2", None)], None, 1) == []


def test_an_uplink_caps_the_sum_and_each_pair_borrows_up_to_its_rate() -> None:
    dests = [shaping.Dest("10.78.0.2", 400e6), shaping.Dest("10.78.0.3", 20e6),
             shaping.Dest("10.78.0.4", None), shaping.Dest("10.78.0.5", 400e6)]
    cmds = shaping.pair_commands("eth", dests, 100e6, 16384)
    classes = {c[c.index("classid") + 1]: c for c in cmds if c[1] == "class"}
    assert set(classes) == {"1:1", "1:10", "1:11", "1:12", "1:13"}
    up = classes["1:1"]
    assert up[up.index("parent") + 1] == "1:" and up[up.index("rate") + 1] == "100000000bit"
    got = {k: (c[c.index("rate") + 1], c[c.index("ceil") + 1], c[c.index("parent") + 1])
           for k, c in classes.items() if k != "1:1"}
    # guaranteed uplink/4 each (the four add up to the uplink), borrowing to min(pair, uplink)
    assert got == {"1:10": ("25000000bit", "100000000bit", "1:1"),
                   "1:11": ("20000000bit", "20000000bit", "1:1"),
                   "1:12": ("25000000bit", "100000000bit", "1:1"),
                   "1:13": ("25000000bit", "100000000bit", "1:1")}
    inbound = shaping.cap_commands("sw0", 100e6, 16384)
    assert inbound[0][-2:] == ["default", "1"] and "100000000bit" in inbound[1]


def test_thesis_checks_every_baseline_with_the_stated_noise() -> None:
    def row(planner: str, measured: float | None) -> thesis.Row:
        return thesis.Row("s", planner, "-", 0.1, measured, [], [], [], False,
                          None if measured else "exit codes [1]")

    plain = thesis.Scenario("s")
    assert plain.max_ratio_to_baselines == 1 + thesis.NOISE
    assert thesis.check(plain, [row("pdv", 1.04), row("uniform", 1.0)]) == []
    lost = thesis.check(plain, [row("pdv", 1.06), row("uniform", 1.0), row("hierarchy", 2.0)])
    assert len(lost) == 1 and "uniform" in lost[0]
    # a baseline whose plan did not run cannot beat pdv's
    assert thesis.check(plain, [row("pdv", 1.0), row("uniform", None)]) == []
    assert any("no pdv row" in f for f in thesis.check(plain, [row("uniform", 1.0)]))
    inverted = thesis.Scenario("s", max_ratio_to_hierarchy=thesis.INVERTED_RATIO)
    assert thesis.check(inverted, [row("pdv", 0.79), row("hierarchy", 1.0)]) == []
    assert thesis.check(inverted, [row("pdv", 0.81), row("hierarchy", 1.0)])


def test_a_topology_file_gets_its_checks_from_its_shape(tmp_path: Path) -> None:
    three = thesis.TOPOLOGIES / "three-hosts.json"
    got = thesis.scenario_for(three)
    assert got.name == "three-hosts" and got.path == three
    assert got.max_ratio_to_hierarchy == thesis.INVERTED_RATIO
    assert got.max_ratio_to_baselines == 1 + thesis.NOISE
    geo = thesis.scenario_for(thesis.TOPOLOGIES / "geo-split.json", {"geo-split"})
    assert geo.name != "geo-split" and geo.max_ratio_to_hierarchy is None
    picked = thesis._scenarios(None, [three])
    assert [s.name for s in picked] == ["three-hosts"]  # a file alone runs alone
    assert [s.name for s in thesis._scenarios(["normal"], [three])] == ["normal",
                                                                         "three-hosts"]
    assert len(thesis._scenarios(None, None)) == len(thesis.SCENARIOS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"hosts": []}')
    assert thesis.main(["--topology", str(bad)]) == 2


def test_repeated_runs_keep_the_median_and_show_their_spread() -> None:
    def run(measured: float | None) -> thesis.Row:
        return thesis.Row("s", "pdv", "-", 0.1, measured, [], [], [], False,
                          None if measured else "exit codes [1]")

    got = thesis._median_row([run(0.30), run(0.20), run(0.25)])
    assert got.measured_s == 0.25 and got.runs == (0.30, 0.20, 0.25)
    assert got.spread == pytest.approx(0.4)
    assert "250.0 ms (runs 40% apart)" in thesis.markdown([got])
    assert thesis._median_row([run(0.2), run(None)]).failed  # one failed run fails the row
    assert thesis._median_row([run(0.2)]).spread is None


def test_the_readme_example_topology_loads() -> None:
    text = (thesis.ROOT / "README.md").read_text()
    block = text.split("```json", 1)[1].split("```", 1)[0]
    topo = topology.parse(json.loads(block), "readme")
    assert topo.name == "two-sites" and topo.world == 5
    assert topo.pair_latency("d", "a") == "2ms" and topo.effective_rate("b", "a") == 100e6
