"""The example plans in plans/ are what plans/regenerate.py makes today (byte for byte)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pdv import artifacts
from tests.conftest import ROOT


def _regenerate_module():
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "plans" / "regenerate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_example_plans_are_fresh(tmp_path: Path) -> None:
    written = _regenerate_module().regenerate(tmp_path)
    assert written
    for fresh in sorted(tmp_path.rglob("*.json")):
        committed = ROOT / "plans" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing; run python plans/regenerate.py"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale; run python plans/regenerate.py"
        )


def test_example_plans_are_valid_and_predicted() -> None:
    plans = sorted((ROOT / "plans").glob("*.plan.json"))
    assert len(plans) >= 4
    for path in plans:
        plan = artifacts.load_as(path, "plan")
        assert plan.predicted is not None and plan.predicted.step_time_s > 0
        assert plan.planner.name == "pdv"
