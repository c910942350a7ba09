"""pdv show / validate / schema: commands that work on any artifact."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pdv import artifacts
from pdv.cli.app import app, console
from pdv.cli.render import render
from pdv.errors import PdvError


@app.command()
def show(
    file: Path = typer.Argument(..., help="Any pdv artifact (profile, cluster, plan, report)."),
    as_json: bool = typer.Option(False, "--json", help="Print the validated JSON instead."),
) -> None:
    """Render an artifact as tables."""
    artifact = artifacts.load(file)
    if as_json:
        typer.echo(artifacts.dumps(artifact), nl=False)
    else:
        render(artifact, console)


@app.command()
def validate(
    file: Path = typer.Argument(..., help="The artifact to check."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON verdict."),
) -> None:
    """Check one artifact against its schema; exit 2 with one line if it is invalid."""
    artifact = artifacts.load(file)
    if as_json:
        typer.echo(json.dumps({"file": str(file), "schema": artifact.schema_, "valid": True}))
    else:
        console.print(f"{file}: valid {artifact.schema_}", highlight=False)


@app.command()
def schema(kind: str = typer.Argument(..., help=f"One of: {', '.join(artifacts.KINDS)}.")) -> None:
    """Print the JSON Schema of an artifact kind."""
    model = artifacts.KINDS.get(kind)
    if model is None:
        raise PdvError(f"unknown kind {kind!r}; choose one of: {', '.join(artifacts.KINDS)}")
    typer.echo(json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True))
