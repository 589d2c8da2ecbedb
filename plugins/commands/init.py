"""`trtkit init [RECIPE]`: write a commented starter recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl

HELP_ORDER = 80


def init_command(
    output: Annotated[Path, typer.Argument(help="Recipe file to write.")] = Path("recipe.toml"),
    onnx: Annotated[str | None, typer.Option("--onnx", help="Start from this ONNX file.")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Start from a torch factory "
                                               "'file.py:factory' or 'package.module:factory'.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter recipe for your model."""
    from trtkit.errors import OptionError
    from trtkit.fileio import write_text
    from trtkit.recipe import starter_recipe

    if output.exists() and not force:
        raise OptionError(f"{output} exists; pass --force to overwrite it")
    if onnx is not None and source is not None:
        raise OptionError("give --onnx or --source, not both")
    if onnx is not None:
        from trtkit.model import ModelArtifact

        ModelArtifact.load(onnx)  # a missing or damaged model is a one-line error now, not at `trtkit run`
    write_text(output, starter_recipe(onnx=onnx, source=source))
    typer.echo(f"wrote {output}; check it with: trtkit run {output} --dry-run")


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("init")(init_command)
