"""A plan records the dtype its profiles were taken in, and pdv run trains in it.

`pdv profile model --dtype bfloat16` times the layers in bf16 and `pdv plan` prices that; the
plan says so, `pdv simulate`/`pdv check --plan`/`pdv run --elastic` refuse profiles of another
dtype, and the run casts the model and its batches (pdv.models.cast_model), so measured and
predicted speak of the same training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pdv import artifacts
from pdv.errors import PdvError
from pdv.models import build_model, cast_model
from pdv.plan.search import check_plan_dtype, check_profiles
from pdv.run.data import BatchSource
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


def test_run_refuses_a_dtype_it_cannot_train_in(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_data(dtype="float64")))
    assert_one_line_error(run_pdv("run", str(plan), "--steps", "1"),
                          "the plan's dtype 'float64'")


# --------------------------------------------------------------------------- the cast


def _dtypes(model) -> set[torch.dtype]:
    return {t.dtype for _, layer in model.layers
            for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()}


def test_float32_leaves_the_model_as_built() -> None:
    model = build_model("mlp", {"n_layer": 2})
    make_batch = model.make_batch
    params = [p for _, layer in model.layers for p in layer.parameters()]
    assert cast_model(model, torch.float32) is model
    assert model.make_batch is make_batch and model.dtype == torch.float32
    assert all(a is b for a, b in zip(params, (p for _, layer in model.layers
                                               for p in layer.parameters()), strict=True))


def test_float16_gpt_keeps_its_token_ids_integer() -> None:
    model = build_model("gpt_tiny", {"n_layer": 2})
    tied = model.tied_groups()
    cast_model(model, torch.float16)
    assert _dtypes(model) == {torch.float16} and model.dtype == torch.float16
    assert model.tied_groups() == tied
    x, y = model.make_batch(2, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    out = model.sequential()(x)
    assert out.dtype == torch.float16
    assert math.isfinite(model.loss_fn(out, y).item())


def test_bfloat16_casts_floating_inputs_and_targets() -> None:
    model = cast_model(build_model("mlp", {"n_layer": 2}), torch.bfloat16)
    assert _dtypes(model) == {torch.bfloat16}
    x, y = model.make_batch(2, torch.Generator().manual_seed(0))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert model.sequential()(x).dtype == torch.bfloat16


def _hook(step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.ones(batch_size, 32, dtype=torch.float64)
    return x, torch.zeros(batch_size, dtype=torch.long)


def test_a_data_hooks_floating_inputs_follow_the_plan(tmp_path: Path) -> None:
    hook = f"{__file__}:_hook"
    x, y = BatchSource(build_model("mlp", {"n_layer": 2}), 4, 0, hook).global_batch(0)
    assert x.dtype == torch.float64 and y.dtype == torch.long  # float32: as before, untouched
    model = cast_model(build_model("mlp", {"n_layer": 2}), torch.bfloat16)
    x, y = BatchSource(model, 4, 0, hook).global_batch(0)
    assert x.dtype == torch.bfloat16 and y.dtype == torch.long


def test_a_traced_split_is_refused_in_another_dtype() -> None:
    model = build_model("tests/models/split_net.py:net", {"n_block": 2}, blocks=("layers",))
    assert cast_model(model, torch.float32) is model
    with pytest.raises(PdvError, match="split by tracing .* float32 only, not bfloat16"):
        cast_model(model, torch.bfloat16)


def test_the_profiler_refuses_a_traced_split_in_another_dtype(tmp_path: Path) -> None:
    # The same refusal before any layer is timed, as one line, not a traceback from the graph.
    res = run_pdv("profile", "model", "tests/models/split_net.py:net", "--blocks", "layers",
                  "--dtype", "bfloat16", "-o", str(tmp_path / "p.json"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "float32 only, not bfloat16" in res.stderr and not (tmp_path / "p.json").exists()


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
@pytest.mark.slow
def test_a_bfloat16_profile_plans_and_runs_in_bfloat16(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    prof, clus, plan = tmp_path / "p.json", tmp_path / "c.json", tmp_path / "plan.json"
    res = run_pdv("profile", "model", "mlp", "--model-arg", "n_layer=2", "--micro-batch-sizes",
                  "2,4", "--dtype", "bfloat16", "-o", str(prof), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    artifacts.write(clus, cluster(LOCAL2, BW, kinds=["cpu", "cpu"]))
    res = run_pdv("plan", str(prof), "--cluster", str(clus), "--global-batch", "8", "-o",
                  str(plan))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(plan.read_text())["dtype"] == "bfloat16"
    report, ckpt = tmp_path / "r.json", tmp_path / "ckpt"
    res = run_pdv("run", str(plan), "--steps", "2", "--warmup", "1", "--report", str(report),
                  "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["dtype"] == "bfloat16"
    assert "dtype bfloat16" in data["provenance"]["notes"][0]
    assert "dtype bfloat16" in res.stdout
    assert len(data["loss"]) == 2 and all(math.isfinite(v) for v in data["loss"])
    # What was trained: every parameter and its Adam moments in bf16.
    meta = dcp.FileSystemReader(str(ckpt / "step-2")).read_metadata().state_dict_metadata
    params = {k: v.properties.dtype for k, v in meta.items() if k.startswith("model.")}
    assert params and set(params.values()) == {torch.bfloat16}, params
    moments = {v.properties.dtype for k, v in meta.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    assert moments == {torch.bfloat16}


@pytest.mark.e2e
def test_a_float16_gpt_runs_and_a_diverged_loss_is_one_line(tmp_path: Path) -> None:
    # Token ids stay integers through the cast; float16 under sgd trains. Under adamw its eps
    # (1e-8) is 0 in float16 and the second step's loss is nan: an error naming the step,
    # not a report that cannot hold it.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan_data(dtype="float16")))
    report = tmp_path / "r.json"
    res = run_pdv("run", str(plan), "--steps", "2", "--warmup", "1", "--optimizer", "sgd",
                  "--report", str(report), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["dtype"] == "float16" and all(math.isfinite(v) for v in data["loss"])
    res = run_pdv("run", str(plan), "--steps", "2", "--warmup", "1", timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("pdv: error: rank")]
    assert len(errors) == 1 and "the loss of step 1 is nan (training in float16)" in errors[0]
    assert "--optimizer sgd" in errors[0]
