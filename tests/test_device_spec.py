"""Declared devices (pdv.device_spec) and the --estimate path that prices GEMMs by shape."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest

from pdv.device_spec import load_device_spec, quantization
from pdv.errors import PdvError
from pdv.profile.layers import profile_model
from pdv.profile.request import ProfileRequest
from tests.conftest import ROOT, run_pdv

A100 = ROOT / "devices" / "nvidia-a100-sxm4-80gb.json"
GPT = "pdv.sample_models.gpt"


def _brute_quantization(units: int, tiles: list[tuple[int, int]], b: int, m: int,
                        n: int) -> float:
    """Tile by tile: count the tiles, fill waves one tile at a time."""
    best = 0.0
    for tm, tn in tiles:
        count = 0
        for _ in range(b):
            for _i, _j in itertools.product(range(0, m, tm), range(0, n, tn)):
                count += 1
        waves = 0
        while waves * units < count:
            waves += 1
        best = max(best, b * m * n / (waves * units * tm * tn))
    return best


@pytest.mark.parametrize(("b", "m", "n"), [(1, 2048, 3072), (1, 257, 129), (4, 100, 300),
                                           (1, 6912, 16384), (96, 64, 64), (1, 1, 1)])
def test_quantization_matches_tile_by_tile_count(b: int, m: int, n: int) -> None:
    tiles = [(256, 128), (128, 256)]
    got = quantization(108, tuple(tiles), b, m, n)
    assert got == pytest.approx(_brute_quantization(108, tiles, b, m, n))
    assert 0 < got <= 1


def test_quantization_full_waves_are_whole() -> None:
    # 108 tiles of 256 x 128 exactly: one full wave, nothing wasted.
    assert quantization(108, ((256, 128),), 1, 256 * 108, 128) == 1.0
    # One tile more: a second wave with one tile in it.
    assert quantization(108, ((256, 128),), 1, 256 * 109, 128) == pytest.approx(109 / 216)


def test_a100_spec_loads_with_sources() -> None:
    spec = load_device_spec(A100)
    assert spec.peak("bfloat16") == pytest.approx(312e12)
    assert set(spec.sources) >= {"matmul", "matmul_efficiency", "gemm", "memory_bandwidth",
                                 "memory_efficiency"}
    # A large, tile-aligned GEMM runs at peak x efficiency; a skinny one far below.
    big = spec.gemm_flops("float16", (1, 256 * 108, 4096, 4096))
    assert big == pytest.approx(312e12 * spec.matmul_efficiency)
    assert spec.gemm_flops("float16", (1, 16, 128, 4096)) < big / 50
    # A memory-bound op is its bytes over the sustained bandwidth, whatever its FLOPs.
    assert spec.op_seconds("float16", 0.0, 1e9, None) == pytest.approx(1e9 / spec.bandwidth)
    with pytest.raises(PdvError, match="no matmul rate for int8"):
        spec.peak("int8")


def _write(tmp_path: Path, **change: object) -> Path:
    spec = json.loads(A100.read_text())
    for key, value in change.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sources": {"matmul": "datasheet"}}, "no source for"),
        ({"matmul_efficiency": 1.5}, "fraction in (0, 1]"),
        ({"gemm": {"units": 0, "tiles": [[256, 128]]}}, "positive integer"),
        ({"memory_bandwidth": None}, "missing"),
        ({"speed": "fast"}, "unknown key"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path: Path, change: dict, words: str) -> None:
    with pytest.raises(PdvError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_device_spec(_write(tmp_path, **change))


def test_cli_refuses_an_unsourced_spec(tmp_path: Path) -> None:
    bad = _write(tmp_path, sources={"matmul": "datasheet"})
    r = run_pdv("profile", "model", "gpt_tiny", "--estimate", "--device-spec", str(bad),
                "-o", str(tmp_path / "p.json"))
    assert r.returncode == 2
    assert "no source for" in r.stderr and "Traceback" not in r.stderr


def test_estimate_with_a_declared_device_prices_by_shape_and_bandwidth() -> None:
    """A 13B-sized block on the declared A100: its GEMMs at the spec's rates by shape, the
    rest at the sustained bandwidth; a micro-batch of 1 token row is priced far below peak."""
    spec = load_device_spec(A100)

    def block(seq: int) -> tuple[float, float, list[str]]:
        p = profile_model(ProfileRequest(
            spec=f"{GPT}:gpt", kwargs=dict(n_layer=1, n_head=40, d_model=5120, seq_len=seq,
                                           vocab_size=512),
            micro_batch_sizes=(1,), estimate=True, dtype="float16", device_spec=str(A100)))
        assert p.provenance.method == "estimated"
        assert p.device.kind == spec.kind
        return p.layers[1].fwd_s, p.layers[1].flops_fwd, p.provenance.notes

    long_s, long_flops, notes = block(2048)
    short_s, short_flops, _ = block(16)
    assert any("tile/wave quantization" in n for n in notes)
    assert any(spec.sources["matmul_efficiency"][:40] in n for n in notes)
    best = spec.peak("float16") * spec.matmul_efficiency
    # Long sequences: compute-bound, a little below the best GEMM rate (quantization, the
    # memory-bound layernorms, softmax-free fused attention, residual adds).
    assert long_flops / long_s == pytest.approx(best, rel=0.25) and long_flops / long_s < best
    # Sixteen tokens: a 16-row GEMM fills a fraction of one tile row; far from peak.
    assert short_flops / short_s < best / 5


def test_device_spec_needs_estimate(tmp_path: Path) -> None:
    r = run_pdv("profile", "model", "gpt_tiny", "--device-spec", str(A100),
                "-o", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "only apply with --estimate" in r.stderr


def test_published_benchmark_prints_and_checks_a_case() -> None:
    """benchmarks/published.py on one case: a row with published, predicted and error."""
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "published.py"), "--case",
                        "22B-full", "--json", "--max-error", "1", "--tolerance", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[0])
    assert row["published_s"] == 1.42 and row["gpus"] == 8
    assert math.isfinite(row["predicted_s"]) and row["predicted_s"] > 0
    assert row["error"] == pytest.approx((row["predicted_s"] - 1.42) / 1.42)


def test_a_published_case_with_data_parallelism_is_planned_as_megatron_ranks_it() -> None:
    """The data-parallel case: TP groups inside a host, replicas of a stage on other hosts (their
    gradient ring crosses InfiniBand), and a plan micro-batch that spans the replicas."""
    from benchmarks import published

    case = next(c for c in published.CASES if c.dp > 1)
    plan = published.plan_for(case)
    assert plan["micro_batch_size"] == case.micro_batch * case.dp
    assert plan["micro_batch_size"] * plan["num_micro_batches"] == case.global_batch
    seen: list[int] = []
    for stage in plan["stages"]:
        ranks = stage["ranks"]
        assert stage["dp"] == case.dp and len(ranks) == case.dp * case.tp
        seen += ranks
        tp_groups = [ranks[r * case.tp:(r + 1) * case.tp] for r in range(case.dp)]
        # each TP group on one host of GPUS_PER_HOST, each replica on its own host
        hosts = [{g // published.GPUS_PER_HOST for g in group} for group in tp_groups]
        assert all(len(h) == 1 for h in hosts) and len({min(h) for h in hosts}) == case.dp
    assert sorted(seen) == list(range(case.gpus))
