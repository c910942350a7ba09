"""Artifact contract: validation, one-line errors with exit 2, atomic deterministic writes."""

from __future__ import annotations

import json

import pytest

from pdv import artifacts
from pdv.errors import PdvError

from .conftest import run_pdv

MINIMAL_CLUSTER = {
    "schema": "pdv.cluster/v1",
    "devices": [
        {"rank": 0, "host": "a", "kind": "cpu", "memory_bytes": 2**30},
        {"rank": 1, "host": "b", "kind": "cpu", "memory_bytes": 2**30},
    ],
    "links": {"latency_s": [[0, 1e-4], [1e-4, 0]], "bandwidth_Bps": [[0, 1e8], [2e8, 0]]},
}


def test_hand_written_cluster_defaults_to_declared(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(MINIMAL_CLUSTER))
    cluster = artifacts.load(path)
    assert cluster.provenance.method == "declared"
    assert cluster.links.bandwidth_Bps[1][0] == 2e8


def test_round_trip_is_byte_identical(tmp_path):
    cluster = artifacts.parse(MINIMAL_CLUSTER)
    a = artifacts.write(tmp_path / "a.json", cluster)
    b = artifacts.write(tmp_path / "b.json", artifacts.load(a))
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    path = artifacts.write(tmp_path / "c.json", artifacts.parse(MINIMAL_CLUSTER))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "fsync", boom)
    with pytest.raises(OSError):
        artifacts.write(path, artifacts.parse(MINIMAL_CLUSTER))
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**MINIMAL_CLUSTER, "links": {"latency_s": [[0]], "bandwidth_Bps": [[0]]}}, "2x2"),
        ({**MINIMAL_CLUSTER, "devices": MINIMAL_CLUSTER["devices"][::-1]}, "by rank"),
        ({**MINIMAL_CLUSTER, "bogus": 1}, "bogus"),
    ],
)
def test_invalid_cluster_names_the_problem(bad, message):
    with pytest.raises(PdvError, match=message):
        artifacts.parse(bad)


def _one_line_exit_2(result):
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_validate_truncated_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(MINIMAL_CLUSTER)[:40])
    result = run_pdv("validate", str(path))
    _one_line_exit_2(result)
    assert "not valid JSON" in result.stderr


def test_validate_wrong_schema_version(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**MINIMAL_CLUSTER, "schema": "pdv.cluster/v9"}))
    result = run_pdv("validate", str(path))
    _one_line_exit_2(result)
    assert "pdv.cluster/v9 is not supported" in result.stderr


def test_validate_other_kind_where_one_is_expected(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(MINIMAL_CLUSTER))
    with pytest.raises(PdvError, match="expected a pdv.plan/v2 artifact, got pdv.cluster/v1"):
        artifacts.load_as(path, "plan")
    # and a file of a kind pdv does not know at all
    path.write_text(json.dumps({"schema": "other.thing/v1"}))
    _one_line_exit_2(run_pdv("validate", str(path)))


def test_validate_and_show_a_good_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(MINIMAL_CLUSTER))
    ok = run_pdv("validate", str(path))
    assert ok.returncode == 0 and "valid pdv.cluster/v1" in ok.stdout
    shown = run_pdv("show", str(path))
    assert shown.returncode == 0 and "bandwidth" in shown.stdout and "1.6 Gbit/s" in shown.stdout


@pytest.mark.parametrize("kind", list(artifacts.KINDS))
def test_schema_export(kind):
    result = run_pdv("schema", kind)
    assert result.returncode == 0
    assert "properties" in json.loads(result.stdout)


def test_help_and_version():
    result = run_pdv("--help")
    assert result.returncode == 0 and "profile" in result.stdout
    version = run_pdv("--version")
    assert version.returncode == 0 and version.stdout.startswith("pdv ")


def test_written_artifact_is_readable_by_others(tmp_path):
    path = artifacts.write(tmp_path / "c.json", artifacts.parse(MINIMAL_CLUSTER))
    umask = artifacts.os.umask(0)
    artifacts.os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_typer_exit_code_reaches_the_shell():
    import typer

    from pdv.cli.app import app, main

    @app.command("_exit-probe", hidden=True)
    def _probe() -> None:
        raise typer.Exit(3)

    try:
        assert main(["_exit-probe"]) == 3
    finally:
        app.registered_commands.pop()


def _plan_with_devices(schema: str, devices: list[dict]) -> dict:
    return {
        "schema": schema,
        "stages": [{"layers": [0, 2], "ranks": [1, 2], "dp": 2}, {"layers": [2, 4], "ranks": [3]}],
        "micro_batch_size": 2,
        "num_micro_batches": 2,
        "global_batch_size": 4,
        "devices": devices,
    }


def test_plan_devices_are_written_as_runs_and_read_back() -> None:
    devices = [{"rank": r, "host": "h0" if r < 3 else "h1", "kind": "gpu",
                "memory_bytes": 1 << 30} for r in (1, 2, 3)]  # fmt: skip
    plan = artifacts.parse(_plan_with_devices("pdv.plan/v2", devices))
    data = json.loads(artifacts.dumps(plan))
    assert data["devices"] == [
        {"ranks": [1, 2], "host": "h0", "kind": "gpu", "memory_bytes": 1 << 30},
        {"ranks": [3, 3], "host": "h1", "kind": "gpu", "memory_bytes": 1 << 30},
    ]
    again = artifacts.parse(data)
    assert again == plan and [d.rank for d in again.devices] == [1, 2, 3]
    assert artifacts.digest(again) == artifacts.digest(plan)


def test_v1_plan_is_read_as_v2() -> None:
    devices = [{"rank": r, "host": "h0", "kind": "gpu", "memory_bytes": 1 << 30}
               for r in range(6)]  # fmt: skip
    plan = artifacts.parse(_plan_with_devices("pdv.plan/v1", devices))
    assert [d.rank for d in plan.devices] == list(range(6))
    data = json.loads(artifacts.dumps(plan))
    assert data["schema"] == "pdv.plan/v2"
    assert data["devices"] == [{"ranks": [0, 5], "host": "h0", "kind": "gpu",
                                "memory_bytes": 1 << 30}]  # fmt: skip
    bad = _plan_with_devices("pdv.plan/v2", [{"ranks": [3, 1], "host": "h0", "kind": "gpu",
                                              "memory_bytes": 1}])  # fmt: skip
    with pytest.raises(PdvError, match=r"ranks \[3, 1\] must be \[first, last\]"):
        artifacts.parse(bad)


def test_a_profile_without_backward_peaks_keeps_its_bytes_and_digest() -> None:
    """backward_bytes is written only where measured: a profile from before the field keeps
    the bytes, and the digest its plans name it by; a measured one keeps its figures."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "profiles" / "gpt_tiny.cpu.json"
    old = artifacts.load_as(path, "model-profile")
    assert artifacts.dumps(old) == path.read_text()
    assert "backward_bytes" not in path.read_text()
    layers = [x.model_copy(update={"backward_bytes": 1000 + i}) for i, x in
              enumerate(old.layers)]
    new = old.model_copy(update={"layers": layers})
    again = json.loads(artifacts.dumps(new))
    assert [x["backward_bytes"] for x in again["layers"]] == [1000 + i for i in
                                                              range(len(layers))]
    assert artifacts.digest(new) != artifacts.digest(old)
