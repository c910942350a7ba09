"""A plan records the dtype its profiles were taken in.

`pdv profile model --dtype bfloat16` times the layers in bf16 and `pdv plan` prices that; the
plan says so, and `pdv simulate`/`pdv check --plan`/`pdv run --elastic` refuse profiles of
another dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdv import artifacts
from pdv.errors import PdvError
from pdv.plan.search import check_plan_dtype, check_profiles
from tests.conftest import run_pdv
from tests.plan_fixtures import cluster, profile
from tests.test_run_cli import assert_one_line_error

LOCAL2 = ["localhost", "localhost"]
BW = [[0.0, 1e9], [1e9, 0.0]]


def _plan_data(**extra: object) -> dict:
    return {"schema": "pdv.plan/v2", "stages": [{"layers": [0, 2], "ranks": [0]},
                                                {"layers": [2, 4], "ranks": [1]}],
            "micro_batch_size": 1, "num_micro_batches": 4, "global_batch_size": 4,
            "model": {"spec": "gpt_tiny", "kwargs": {"n_layer": 2}}, **extra}


# --------------------------------------------------------------------------- the artifact


def test_a_plan_without_dtype_reads_as_float32_and_keeps_its_bytes(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_plan_data()))
    plan = artifacts.load_as(old, "plan")
    assert plan.dtype == "float32"
    # A float32 plan is written as before the field existed: same bytes, same digest.
    assert "dtype" not in json.loads(artifacts.dumps(plan))
    bf16 = plan.model_copy(update={"dtype": "bfloat16"})
    assert json.loads(artifacts.dumps(bf16))["dtype"] == "bfloat16"
    artifacts.write(tmp_path / "bf16.json", bf16)
    assert artifacts.load_as(tmp_path / "bf16.json", "plan").dtype == "bfloat16"
    assert artifacts.digest(bf16) != artifacts.digest(plan)


def test_pdv_plan_records_the_profiles_dtype(tmp_path: Path) -> None:
    prof, clus, out = tmp_path / "p.json", tmp_path / "c.json", tmp_path / "plan.json"
    artifacts.write(prof, profile(kind="cpu", n_layers=4).model_copy(update={"dtype": "bfloat16"}))
    artifacts.write(clus, cluster(LOCAL2, BW, kinds=["cpu", "cpu"]))
    res = run_pdv("plan", str(prof), "--cluster", str(clus), "--global-batch", "4", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["dtype"] == "bfloat16"


def test_profiles_of_two_dtypes_make_no_plan() -> None:
    profs = {"a": profile(kind="a"), "b": profile(kind="b").model_copy(update={"dtype": "float16"})}
    with pytest.raises(PdvError, match="disagree on the dtype"):
        check_profiles(profs, cluster(LOCAL2, BW, kinds=["a", "b"]), None, None)
    plan = artifacts.Plan.model_validate(_plan_data(dtype="float16"))
    check_plan_dtype(plan, {"b": profs["b"]})
    with pytest.raises(PdvError, match="trains in float16 but the a profile"):
        check_plan_dtype(plan, profs)


def test_simulate_check_and_elastic_run_refuse_another_dtype(tmp_path: Path) -> None:
    prof, clus, plan = tmp_path / "p.json", tmp_path / "c.json", tmp_path / "plan.json"
    artifacts.write(prof, profile(kind="cpu", n_layers=4).model_copy(update={"dtype": "bfloat16"}))
    artifacts.write(clus, cluster(LOCAL2, BW, kinds=["cpu", "cpu"]))
    plan.write_text(json.dumps(_plan_data()))  # no dtype: float32
    needle = "the plan trains in float32 but the cpu profile was taken in bfloat16"
    assert_one_line_error(run_pdv("simulate", str(plan), "-p", str(prof), "-c", str(clus)),
                          needle)
    assert_one_line_error(run_pdv("check", str(prof), "--cluster", str(clus), "--plan",
                                  str(plan), "--out", str(tmp_path / "check")), needle)
    assert_one_line_error(run_pdv("run", str(plan), "--elastic", "-p", str(prof),
                                  "--checkpoint-dir", str(tmp_path / "ck"),
                                  "--checkpoint-every", "1"), needle)
    assert not (tmp_path / "ck").exists()
    # the same plan in the profile's dtype simulates
    plan.write_text(json.dumps(_plan_data(dtype="bfloat16")))
    res = run_pdv("simulate", str(plan), "-p", str(prof), "-c", str(clus), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["step_time_s"] > 0
