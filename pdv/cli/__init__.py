"""The pdv command line: the only package that imports typer and rich."""

# Each command module registers its commands on the app when imported. Torch is imported
# inside command bodies only, so `pdv plan` and `pdv --help` start without it.
from pdv.cli import (  # noqa: F401
    artifacts_cmd,
    check_cmd,
    plan_cmd,
    profile_cluster_cmd,
    profile_model_cmd,
    quickstart_cmd,
    replan_cmd,
    run_cmd,
    simulate_cmd,
)
from pdv.cli.app import app, main

__all__ = ["app", "main", "run_main"]


def run_main() -> None:
    """Console-script entry: exit with main()'s code."""
    raise SystemExit(main())
