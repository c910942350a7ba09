"""The typer app, its global options, and the one place where errors become exit codes.

Torch is imported inside command bodies only, so ``pdv plan`` and ``pdv --help`` start fast on a
login node without torch.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from pdv import __version__
from pdv.errors import PdvError

__all__ = ["app", "main", "console", "err_console", "profile_app", "cluster_app"]

console = Console(emoji=False)  # "hf:llama:..." is a model name, not an emoji code
err_console = Console(stderr=True, emoji=False)

app = typer.Typer(
    name="pdv",
    help="pipeDejavu: profile real hardware, plan hybrid-parallel training on the measurements, "
    "run the plan and check the prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profile_app = typer.Typer(
    help="Measure layers (per device kind) and links (between every pair of ranks).",
    no_args_is_help=True,
)
cluster_app = typer.Typer(
    help="Clusters that are not at hand: declare them for what-if planning.", no_args_is_help=True
)
app.add_typer(profile_app, name="profile")
app.add_typer(cluster_app, name="cluster")


def version_lines() -> list[str]:
    """The block people paste into a bug report: pdv, Python, key packages, the device seen."""
    import platform
    from importlib import metadata

    lines = [f"pdv {__version__}", f"python {platform.python_version()} ({sys.executable})"]
    for dist in ("torch", "ortools", "typer", "rich", "pydantic"):
        try:
            lines.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    lines.append(f"device {_device_seen()}")
    lines.append(f"platform {platform.platform()}")
    return lines


def _device_seen() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch not installed)"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"cuda: {n}x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"cpu ({os.cpu_count()} cores; no CUDA device)"


def _version(value: bool) -> None:
    if value:
        for line in version_lines():
            console.print(line, markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print pdv, Python, torch, ortools and typer versions and the device seen; exit.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """pipeDejavu."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; a PdvError is one line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        # Standalone mode lets typer's own click (real or vendored, depending on the typer
        # version) print usage errors and exit 2; pdv never names click's exception classes.
        command.main(args=args, prog_name="pdv", standalone_mode=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except PdvError as exc:
        if debug:
            raise
        err_console.print(f"pdv: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("pdv: interrupted")
        return 130
    return 0


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    # sys.exit("message") prints the message and means failure
    print(code, file=sys.stderr)
    return 1
