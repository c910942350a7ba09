"""pdv cluster declare: units, layout, link classes, overrides, large clusters, bad specs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pdv import artifacts
from pdv.cluster_spec import (
    declare_cluster,
    parse_bytes,
    parse_flops,
    parse_ranges,
    parse_rate,
    parse_time,
)
from pdv.errors import PdvError
from tests.conftest import ROOT, run_pdv


@pytest.mark.parametrize(
    ("fn", "text", "value"),
    [
        (parse_bytes, "80GiB", 80 * 2**30),
        (parse_bytes, "4 KiB", 4096),
        (parse_bytes, "1.5GB", 1_500_000_000),
        (parse_bytes, 123, 123),
        (parse_time, "5us", 5e-6),
        (parse_time, "5µs", 5e-6),
        (parse_time, "1.5ms", 1.5e-3),
        (parse_time, "2s", 2.0),
        (parse_rate, "400Gbit/s", 50e9),
        (parse_rate, "100Mbps", 12.5e6),
        (parse_rate, "50GB/s", 50e9),
        (parse_rate, "1GiB/s", 2.0**30),
        (parse_flops, "400TFLOP/s", 4e14),
        (parse_flops, "50 GFLOPS", 5e10),
    ],
)
def test_human_units_become_si(fn: Any, text: Any, value: float) -> None:
    assert fn(text, "x") == pytest.approx(value, rel=1e-12)


def test_unit_noise_is_dropped() -> None:
    # 3 * 1e-6 is 2.9999999999999997e-06 in floats; the artifact should say 3e-06.
    assert repr(parse_time("3us")) == "3e-06"


@pytest.mark.parametrize(
    ("fn", "text"),
    [(parse_bytes, "80 parsecs"), (parse_time, "5 fortnights"), (parse_rate, "400G"),
     (parse_flops, "fast"), (parse_bytes, True)],
)
def test_unreadable_units_are_errors(fn: Any, text: Any) -> None:
    with pytest.raises(PdvError):
        fn(text, "x")


def test_ranges() -> None:
    assert parse_ranges("0-3,8", 10, "x") == [0, 1, 2, 3, 8]
    assert parse_ranges([2, 1], 10, "x") == [1, 2]
    with pytest.raises(PdvError, match="out of range"):
        parse_ranges("0-10", 10, "x")


def _spec(**extra: Any) -> dict[str, Any]:
    """2 hosts x (2 fast + 1 slow device); intra-host links slower than inter-host."""
    return {
        "kinds": {
            "fast": {"name": "Fast GPU", "memory": "80GiB", "matmul": "400TFLOP/s"},
            "slow": {"memory": "16GiB", "matmul": "10TFLOP/s"},
        },
        "links": {
            "intra_host": {"latency": "5us", "bandwidth": "10Gbit/s"},
            "inter_host": {"latency": "10us", "bandwidth": "100Gbit/s"},
            "nvlink": {"latency": "2us", "bandwidth": "450GB/s"},
        },
        "hosts": [{"name": "n{i}", "count": 2, "devices": {"fast": 2, "slow": 1}}],
        **extra,
    }


def test_layout_and_link_classes() -> None:
    c = declare_cluster(_spec())
    assert [d.host for d in c.devices] == ["n0"] * 3 + ["n1"] * 3
    assert [d.kind for d in c.devices] == ["fast", "fast", "slow"] * 2
    assert c.devices[0].memory_bytes == 80 * 2**30 and c.devices[2].matmul_flops == 1e13
    assert c.devices[0].name == "Fast GPU" and c.devices[2].name == "slow"
    bw, lat = c.links.bandwidth_Bps, c.links.latency_s
    assert bw[0][1] == 1.25e9 and lat[0][1] == 5e-6  # same host
    assert bw[0][3] == 12.5e9 and lat[5][2] == 1e-5  # across hosts
    assert all(bw[i][i] == 0 and lat[i][i] == 0 for i in range(6))
    assert c.provenance.method == "declared"


def test_a_host_group_may_name_its_intra_class() -> None:
    spec = _spec()
    spec["hosts"] = [{"name": "nv{i}", "devices": {"fast": 2}, "intra": "nvlink"},
                     {"name": "pcie", "devices": {"fast": 2}}]
    bw = declare_cluster(spec).links.bandwidth_Bps
    assert bw[0][1] == 450e9 and bw[2][3] == 1.25e9 and bw[1][2] == 12.5e9


def test_overrides_apply_in_order_and_direction() -> None:
    c = declare_cluster(_spec(overrides=[
        # Every slow device's links (both directions) to the fast ones on host 1 at 1 Gbit/s.
        {"src": {"kind": "slow"}, "dst": {"hosts": ["n1"], "kind": "fast"},
         "bandwidth": "1Gbit/s"},
        # One direction only, one pair, by rank; later overrides win.
        {"src": {"ranks": "0"}, "dst": {"ranks": [4]}, "latency": "1ms", "bandwidth": "1GB/s",
         "symmetric": False},
        {"src": {"hosts": "0"}, "dst": {"hosts": "1"}, "link": "nvlink", "symmetric": False},
    ]))
    bw, lat = c.links.bandwidth_Bps, c.links.latency_s
    assert bw[3][2] == bw[5][4] == bw[4][5] == 125e6  # slow <-> fast on n1, both ways
    assert bw[2][3] == 450e9  # n0 -> n1 was then set by the last, one-way override
    assert bw[0][4] == 450e9 and lat[0][4] == 2e-6  # the last override won
    assert bw[4][0] == 12.5e9 and lat[4][0] == 1e-5  # the reverse direction was not touched
    assert bw[3][0] == 12.5e9  # n1 -> n0 untouched by the one-way nvlink override
    assert bw[5][2] == 12.5e9  # slow -> slow is not slow -> fast


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"hosts": [{"devices": {"h200": 8}}]}, "unknown kind 'h200'"),
        ({"links": {"intra_host": {"latency": "1us", "bandwidth": "1GB/s"}}}, "inter_host"),
        ({"kinds": {"fast": {"memory": "lots", "matmul": "1TFLOP/s"}}}, "kinds.fast.memory"),
        ({"overrides": [{"src": {"ranks": "0-99"}, "dst": {"ranks": "0"}, "bandwidth": "1GB/s"}]},
         "out of range"),
        ({"overrides": [{"src": {"kind": "tpu"}, "dst": {"ranks": "0"}, "bandwidth": "1GB/s"}]},
         "selects no rank"),
        ({"hosts": [{"name": "same", "count": 2, "devices": {"fast": 1}}]}, "used twice"),
        ({"hosts": [{"devices": {"fast": 1}, "cuont": 2}]}, "unknown field 'cuont'"),
    ],
)
def test_bad_specs_say_what_is_wrong(change: dict[str, Any], words: str) -> None:
    with pytest.raises(PdvError, match=words.replace("(", r"\(")):
        declare_cluster({**_spec(), **change})


def test_cli_declares_the_inverted_example(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    done = run_pdv("cluster", "declare", str(ROOT / "clusters/inverted-2x2.json"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert run_pdv("validate", str(out)).returncode == 0
    c = artifacts.load_as(out, "cluster")
    assert c.provenance.method == "declared" and c.provenance.inputs["spec"].startswith("sha256:")
    bw = c.links.bandwidth_Bps
    assert bw[0][1] < bw[0][2]  # inside a host slower than across hosts, as declared


def test_cli_reads_toml(tmp_path: Path) -> None:
    spec = tmp_path / "c.toml"
    spec.write_text(
        '[kinds.cpu]\nmemory = "4GiB"\nmatmul = "50GFLOP/s"\n'
        '[links.intra_host]\nlatency = "5us"\nbandwidth = "10Gbit/s"\n'
        '[links.inter_host]\nlatency = "20us"\nbandwidth = "1Gbit/s"\n'
        '[[hosts]]\nname = "h{i}"\ncount = 2\ndevices = {cpu = 2}\n'
    )
    out = tmp_path / "c.json"
    done = run_pdv("cluster", "declare", str(spec), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ranks"] == 4
    assert artifacts.load_as(out, "cluster").links.bandwidth_Bps[0][2] == 125e6


@pytest.mark.parametrize(
    ("text", "words"),
    [('{"kinds": ', "not valid JSON"), ('{"kinds": {}, "links": {}, "hosts": []}', "links")],
)
def test_cli_bad_spec_is_one_line_exit_2(tmp_path: Path, text: str, words: str) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(text)
    done = run_pdv("cluster", "declare", str(spec), "-o", str(tmp_path / "c.json"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr
    assert not (tmp_path / "c.json").exists()


def test_cli_help() -> None:
    done = run_pdv("cluster", "declare", "--help")
    assert done.returncode == 0 and "--out" in done.stdout and "TOML" in done.stdout


@pytest.mark.slow
def test_two_kinds_128x8_is_fast_and_compact(tmp_path: Path) -> None:
    out = tmp_path / "big.json"
    start = time.monotonic()
    done = run_pdv("cluster", "declare", str(ROOT / "clusters/two-kinds-128x8.json"),
                   "-o", str(out), "--json")
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["ranks"] == 1024 and summary["hosts"] == 128
    assert summary["kinds"] == {"nvidia-h100-80gb-hbm3": 512, "nvidia-a100-pcie-40gb": 512}
    assert elapsed < 60
    assert out.stat().st_size < 30 * 2**20  # two 1024x1024 matrices, written unindented
    c = artifacts.load_as(out, "cluster")
    bw = c.links.bandwidth_Bps
    assert bw[0][1] == 450e9  # NVLink inside an H100 host
    assert bw[512][513] == 25e9  # PCIe inside an A100 host: slower than the fabric
    assert bw[0][8] == 50e9  # 400 Gbit/s between H100 hosts
    assert bw[0][600] == bw[600][0] == 12.5e9  # the oversubscribed spine between the pods
