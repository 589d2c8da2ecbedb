"""`trtkit run RECIPE`: a recipe, end to end, with caching (or a bundled example with --example)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag, ThreadsFlag, output_flag

HELP_ORDER = 70
EXAMPLES = ("digits",)


def run_command(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe (TOML).", show_default=False)] = None,
    output: Annotated[Path | None, output_flag("Output folder (default: the recipe's [output] dir, else "
                                               "trtkit-run beside it).")] = None,
    example: Annotated[str | None, typer.Option("--example", help=f"Run a bundled example: "
                                                f"{', '.join(EXAMPLES)}.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and what is cached; run nothing.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Ignore cached results.")] = False,
    threads: ThreadsFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a recipe: export -> passes -> calibrate -> quantize -> build -> eval -> report, with caching.

    Exit code 1 when a gate fails, 2 for a bad recipe, 130 when interrupted (earlier steps stay cached)."""
    from trtkit.errors import OptionError
    from trtkit.pipeline import gate_error, output_folder, plan, run_recipe
    from trtkit.recipe import load_recipe
    from trtkit.steps import is_cached
    from trtkit.ui import console

    if (recipe is None) == (example is None):
        raise OptionError("give a recipe file or --example NAME (not both)")
    if example is not None:
        if example not in EXAMPLES:
            from trtkit.errors import unknown_name

            raise unknown_name("example", example, EXAMPLES)
        from trtkit.examples.digits import prepare_example

        folder = output or Path("trtkit-example-" + example)
        recipe = prepare_example(folder)
        output = folder / "run"
        console.print(f"example recipe: {recipe}")
    assert recipe is not None
    if dry_run:
        loaded = load_recipe(recipe)
        out = output_folder(loaded, output)
        steps = plan(loaded)
        if as_json:
            typer.echo(json.dumps({"recipe": str(loaded.path), "output": str(out), "dry_run": True, "steps": [
                {"name": step.name, "key": step.key, "cached": is_cached(out, step), "needs": step.needs}
                for step in steps]}, indent=2))
            return
        for step in steps:
            typer.echo(f"{'cached' if is_cached(out, step) else 'run   '}  {step.describe()}  [{step.key}]")
        return
    result = run_recipe(recipe, output=output, force=force,
                        log=lambda message: console.print(message, markup=False))
    ran = [name for name, step in result.results.items() if not step.cached]
    console.print(f"ran {len(ran)} of {len(result.results)} steps"
                  + (f" ({', '.join(ran)})" if ran else " (everything cached)"))
    for what, ok, text in result.gates:
        console.print(f"{'PASS' if ok else 'FAIL'}  {what}: {text}", markup=False)
    if as_json:  # one document on stdout: summary.json plus where things are and the verdict
        summary = json.loads((result.output / "summary.json").read_text())
        summary.update(output=str(result.output), report=None if result.report is None else str(result.report),
                       passed=result.passed)
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        from trtkit.fileio import described

        typer.echo(f"artefacts: {described(result.output)}")
        if result.report is not None:
            typer.echo(f"report: {result.report}")
    error = gate_error(result)
    if error is not None:
        raise error


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("run")(run_command)
