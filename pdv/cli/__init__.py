"""The pdv command line: the only package that imports typer and rich."""

from pdv.cli.app import app, main

__all__ = ["app", "main", "run_main"]


def run_main() -> None:
    """Console-script entry: exit with main()'s code."""
    raise SystemExit(main())
