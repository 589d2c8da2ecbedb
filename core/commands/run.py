"""`trtkit run` (a recipe, end to end) and `trtkit init` (a commented starter recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = ("digits",)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        recipe: Annotated[Path | None, typer.Argument(help="The recipe (TOML).", show_default=False)] = None,
        output: Annotated[Path | None, typer.Option("-o", "--output", help="Output folder (default: the "
                                                    "recipe's [output] dir, else trtkit-run beside it).")] = None,
        example: Annotated[str | None, typer.Option("--example", help=f"Run a bundled example: "
                                                    f"{', '.join(EXAMPLES)}.")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and what is cached; run nothing.")]
        = False,
        force: Annotated[bool, typer.Option("--force", help="Ignore cached results.")] = False,
    ) -> None:
        """Run a recipe: export -> passes -> calibrate -> quantize -> build -> eval -> report, with caching."""
        from ..errors import OptionError
        from ..recipe import gate_error, load_recipe, output_folder, plan, run_recipe
        from ..ui import console

        if (recipe is None) == (example is None):
            raise OptionError("give a recipe file or --example NAME (not both)")
        if example is not None:
            if example not in EXAMPLES:
                from ..errors import unknown_name

                raise unknown_name("example", example, EXAMPLES)
            from ..examples.digits import prepare_example

            folder = output or Path("trtkit-example-" + example)
            recipe = prepare_example(folder)
            output = folder / "run"
            console.print(f"example recipe: {recipe}")
        assert recipe is not None
        if dry_run:
            loaded = load_recipe(recipe)
            out = output_folder(loaded, output)
            for step in plan(loaded):
                cached = (out / "cache" / step.name.replace(":", "-") / step.key / "step.json").is_file()
                typer.echo(f"{'cached' if cached else 'run   '}  {step.describe()}  [{step.key}]")
            return
        result = run_recipe(recipe, output=output, force=force,
                            log=lambda message: console.print(message, markup=False))
        ran = [name for name, step in result.results.items() if not step.cached]
        console.print(f"ran {len(ran)} of {len(result.results)} steps"
                      + (f" ({', '.join(ran)})" if ran else " (everything cached)"))
        for what, ok, text in result.gates:
            console.print(f"{'PASS' if ok else 'FAIL'}  {what}: {text}", markup=False)
        typer.echo(f"artefacts: {result.output}")
        if result.report is not None:
            typer.echo(f"report: {result.report}")
        error = gate_error(result)
        if error is not None:
            raise error

    @app.command("init")
    def init_command(
        output: Annotated[Path, typer.Argument(help="Recipe file to write.")] = Path("recipe.toml"),
        onnx: Annotated[str | None, typer.Option("--onnx", help="Start from this ONNX file.")] = None,
        source: Annotated[str | None, typer.Option("--source", help="Start from a torch factory "
                                                   "'file.py:factory' or 'package.module:factory'.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    ) -> None:
        """Write a commented starter recipe for your model."""
        from ..errors import OptionError
        from ..fileio import write_text
        from ..recipe import starter_recipe

        if output.exists() and not force:
            raise OptionError(f"{output} exists; pass --force to overwrite it")
        if onnx is not None and source is not None:
            raise OptionError("give --onnx or --source, not both")
        if onnx is not None:
            from ..model import ModelArtifact

            ModelArtifact.load(onnx)  # a missing or damaged model is a one-line error now, not at `trtkit run`
        write_text(output, starter_recipe(onnx=onnx, source=source))
        typer.echo(f"wrote {output}; check it with: trtkit run {output} --dry-run")
