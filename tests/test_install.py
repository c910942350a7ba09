"""A new user's first minutes: declared dependencies, the CI/README contract, the console
script's usage errors and exit codes, `--version`, and tables that survive a pipe or an
80-column terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import tomllib

from .conftest import ROOT

PLAN_ARGS = ["plan", "profiles/gpt_small.cpu.json", "--cluster",
             "plans/clusters/inverted-2x2.cluster.json", "--global-batch", "16"]  # fmt: skip


def _console_script() -> str:
    # The entry point pip wrote next to this interpreter, as a user's shell finds it.
    beside = Path(sys.executable).with_name("pdv")
    found = str(beside) if beside.exists() else shutil.which("pdv")
    if found is None:
        pytest.skip("the pdv console script is not installed (pip install -e .)")
    return found


def _pdv_script(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run([_console_script(), *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _deptry(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("deptry")
    return subprocess.run([sys.executable, "-m", "deptry", "."], cwd=path, capture_output=True,
                          text=True, env={**os.environ, "NO_COLOR": "1"})  # fmt: skip


def test_every_import_comes_from_a_declared_dependency() -> None:
    r = _deptry(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_undeclared_import_fails_the_dependency_check(tmp_path: Path) -> None:
    # The check that guards CI must be able to fail: the same tree plus one module importing a
    # package that pyproject does not declare (click, the import that once broke a fresh install).
    copy = tmp_path / "tree"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "pdv-out"))  # fmt: skip
    (copy / "pdv" / "cli" / "_stray.py").write_text("import click\n")
    r = _deptry(copy)
    assert r.returncode != 0
    out = r.stdout + r.stderr  # deptry reports on stderr
    # DEP001 where click is not installed at all, DEP003 where another package pulled it in
    assert re.search(r"DEP00[13] 'click'", re.sub(r"\x1b\[[0-9;]*m", "", out)), out


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    main_job, tests = _readme_commands()
    assert main_job.endswith("pdv quickstart") and tests.endswith("python3 -m pytest -q")
    script = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in script.splitlines()]
    assert tests in lines, "the CI script must run the README's test command verbatim"
    venv_at = next(i for i, ln in enumerate(lines) if "-m venv" in ln)
    activate_at = next(i for i, ln in enumerate(lines) if "/bin/activate" in ln)
    assert venv_at < activate_at < lines.index(tests)
    for command in (main_job, tests):
        # the CPU wheel of torch first, and never an unpinned torch
        assert "pip install torch==2.13.0" in command
        assert not re.search(r"pip install[^;&]*\btorch\b(?!==)", command)


def test_declared_bounds_admit_what_is_installed() -> None:
    # The versions this suite runs on must be inside the bounds it claims to have tested.
    from importlib import metadata

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dist in ("typer", "rich", "pydantic", "ortools", "torch"):
        spec = next(d for d in deps if re.match(rf"{dist}\b", d))
        assert "<" in spec, f"{spec}: a major release may change the API; bound it"
        have = metadata.version(dist).split("+")[0]
        assert _admits(spec, have), f"{dist} {have} is outside {spec}"


def _admits(spec: str, version: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    ok = True
    for op, bound in re.findall(r"(>=|<=|<|>|==)\s*([\w.]+)", spec):
        a, b = key(version), key(bound)
        ok &= {">=": a >= b, "<=": a <= b, "<": a < b, ">": a > b, "==": a == b}[op]
    return ok


USAGE_ERRORS = [
    ["plan", "--nonsense"],
    ["plan"],
    ["run"],
    ["profile", "model"],
    ["no-such-command"],
    [*PLAN_ARGS[:-1], "sixteen"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a) or "-")
def test_usage_errors_print_usage_and_exit_2(args: list[str]) -> None:
    r = _pdv_script(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Usage:" in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr


def test_library_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    r = _pdv_script("validate", str(tmp_path / "missing.json"))
    assert r.returncode == 2
    assert r.stderr.startswith("pdv: error:") and r.stderr.strip().count("\n") == 0, r.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = _pdv_script("--debug", "validate", str(tmp_path / "missing.json"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_version_is_a_bug_report_block() -> None:
    r = _pdv_script("--version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    names = [ln.split()[0] for ln in lines]
    for name in ("pdv", "python", "torch", "ortools", "typer", "device"):
        assert name in names, r.stdout
    import torch

    device = lines[names.index("device")]
    assert ("cuda" in device) == torch.cuda.is_available(), device


@pytest.mark.slow
def test_usage_errors_on_the_oldest_typer(tmp_path: Path) -> None:
    # The bounds admit typer releases that raise click's own exceptions (before typer vendored
    # click): the oldest admitted typer and rich must give the same usage errors.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [re.sub(r">=([\w.]+).*", r"==\1", d) for d in deps if re.match(r"(typer|rich)\b", d)]
    target = tmp_path / "oldest"
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                          *pins], capture_output=True, text=True, timeout=600)  # fmt: skip
    if got.returncode != 0:
        pytest.skip(f"cannot install {pins}: {got.stderr[-300:]}")
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}"}
    env.pop("COLUMNS", None)
    code = ("import sys, typer, rich; from pdv.cli import main; "
            "print(typer.__version__, file=sys.stderr); sys.exit(main(sys.argv[1:]))")  # fmt: skip
    for args in USAGE_ERRORS:
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        oldest = pins[0].split("==")[1]
        assert r.stderr.splitlines()[0] in (oldest, f"{oldest}.0"), r.stderr  # "0.20" is 0.20.0
        assert r.returncode == 2, (args, r.stderr)
        assert "Usage:" in r.stderr and "Traceback" not in r.stderr, r.stderr


HEADERS = ["planner", "step time", "vs pdv", "bubble", "stages", "mbs x M", "peak mem", "solver"]


def _assert_whole(text: str) -> None:
    assert "…" not in text, text
    for head in HEADERS:
        assert head in text, (head, text)
    assert re.search(r"\b\d+(\.\d+)? (ms|s)\b", text), text


def test_compare_table_piped_keeps_every_header_and_number() -> None:
    r = _pdv_script(*PLAN_ARGS, "--compare")
    assert r.returncode == 0, r.stderr
    _assert_whole(r.stdout)
    rows = [ln for ln in r.stdout.splitlines()
            if re.match(r"\s*(pdv \*|hierarchy|uniform|pipedream)\s+\d", ln)]  # fmt: skip
    assert len(rows) == 4, r.stdout  # one line per planner, every column on it
    assert all(re.search(r"\d\.\d\dx .* \d+(\.\d+)? (ms|s)\s*$", ln) for ln in rows), rows


def test_compare_table_in_an_80_column_terminal() -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([_console_script(), *PLAN_ARGS, "--compare"], cwd=ROOT, env=env,
                            stdin=follower, stdout=follower, stderr=follower)  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    _assert_whole(text)
    assert max(len(ln) for ln in text.splitlines()) <= 80
