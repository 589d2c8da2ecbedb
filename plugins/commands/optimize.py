"""`trtkit optimize IN.onnx -o OUT.onnx --pass NAME ...`: graph passes, each checked numerically.

Nothing heavy is imported here: onnx and onnxruntime load inside the API functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag, ThreadsFlag, options_flag, output_flag, parse_options

HELP_ORDER = 20


def _parse_ranges(values: list[str] | None) -> dict[str, tuple[float, float]]:
    from trtkit.errors import OptionError

    ranges: dict[str, tuple[float, float]] = {}
    for value in values or []:
        name, sep, bounds = value.partition("=")
        low, comma, high = bounds.partition(",")
        try:
            if not sep or not comma:
                raise ValueError
            ranges[name.strip()] = (float(low), float(high))
        except ValueError:
            raise OptionError(f"--range expects NAME=LOW,HIGH, got {value!r}") from None
    return ranges


def _parse_dims(values: list[str] | None) -> dict[str, int]:
    from trtkit.errors import OptionError

    dims: dict[str, int] = {}
    for value in values or []:
        name, sep, size = value.partition("=")
        try:
            if not sep:
                raise ValueError
            dims[name.strip()] = int(size)
        except ValueError:
            raise OptionError(f"--dim expects NAME=SIZE, got {value!r}") from None
    return dims


def optimize_command(
    model: Annotated[Path | None, typer.Argument(help="Input ONNX model (never modified).",
                                                 show_default=False)] = None,
    output: Annotated[Path | None, output_flag("Optimized ONNX file to write.")] = None,
    passes: Annotated[list[str] | None, typer.Option("--pass", "-p", help="Pass to run, in order "
                                                     "(repeatable; default: simplify, optimize).")] = None,
    option: Annotated[list[str] | None, options_flag("Pass", "PASS.KEY=VALUE for one pass")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the numerical check after each pass.")]
    = False,
    ranges: Annotated[list[str] | None, typer.Option("--range", help="Input value range for the check, "
                                                     "NAME=LOW,HIGH (default -1,1).")] = None,
    dims: Annotated[list[str] | None, typer.Option("--dim", help="Size of a symbolic dimension for the "
                                                   "check, NAME=SIZE (default 1).")] = None,
    check_data: Annotated[Path | None, typer.Option("--check-data", help="Inputs for the check: a .npz keyed "
                                                    "by input name (default: generated ones the model runs on).")]
    = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Check tolerance relative to each output's range "
                                               "(max - min; default 1e-4).")] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="Absolute check tolerance (default 1e-6).")]
    = None,
    threshold: Annotated[list[float] | None, typer.Option("--threshold", help="Probability threshold(s) to "
                                                          "convert to logits (with remove-sigmoid).")] = None,
    list_passes: Annotated[bool, typer.Option("--list", help="List the available passes and options.")]
    = False,
    threads: ThreadsFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Rewrite an ONNX graph with passes; each pass is checked numerically; prints a summary table."""
    from trtkit.errors import OptionError
    from trtkit.optimizing import DEFAULT_ATOL, DEFAULT_RTOL, default_passes, optimize
    from trtkit.ui import console, stdout

    if list_passes:
        _list_passes(as_json)
        return
    if model is None or output is None:
        raise OptionError("optimize needs MODEL and -o OUTPUT (or --list to see the passes)")
    if no_check and (rtol is not None or atol is not None or ranges or check_data is not None):
        raise OptionError("--no-check contradicts --rtol/--atol/--range/--check-data (they only set the check)")
    selected: list[Any] = list(passes) if passes else default_passes()
    options = parse_options(option)
    if threshold:
        if "remove-sigmoid" not in selected:
            raise OptionError("--threshold needs --pass remove-sigmoid (thresholds become logits only when "
                              "the Sigmoid is removed)")
        if len(threshold) == 1:
            options["remove-sigmoid.threshold"] = threshold[0]
        else:
            raise OptionError("--threshold: give one value, or per-output values with "
                              '-O thresholds=\'{"NAME": P}\'')
    duplicates = sorted({name for name in selected if selected.count(name) > 1})
    if duplicates and any("." in key and key.split(".")[0] in duplicates for key in options):
        raise OptionError(f"pass '{duplicates[0]}' is selected twice; PASS.KEY options would be ambiguous")
    result = optimize(
        model, selected, output=output, check=not no_check, options=options,
        rtol=DEFAULT_RTOL if rtol is None else rtol, atol=DEFAULT_ATOL if atol is None else atol,
        ranges=_parse_ranges(ranges), dims=_parse_dims(dims), check_data=check_data, progress=True,
    )
    data = result.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    console.print(result.table())
    if any(r.checked == "by the pass" for r in result.reports):
        console.print("* checked by the pass itself against its exact relation (outputs change by design)")
    for name, entry in sorted(result.thresholds.items()):
        stdout.print(f"threshold {name}: probability {entry['probability']:g} -> logit {entry['logit']:.6g}")
    from trtkit.fileio import described

    console.print(f"[green]wrote[/green] {described(output)} ({data['nodes_before']} -> {data['nodes_after']} nodes)")


def _list_passes(as_json: bool) -> None:
    from trtkit.optimizing import default_passes
    from trtkit.registry import get_registry
    from trtkit.ui import stdout

    passes = get_registry().stages["passes"]
    defaults = default_passes()
    rows = [{
        "name": name, "description": p.description, "default": p.default, "exact": p.exact,  # type: ignore[attr-defined]
        "options": {k: {"type": o.type, "default": o.default, "help": o.help} for k, o in p.options.items()},
    } for name, p in sorted(passes.items())]
    if as_json:
        typer.echo(json.dumps({"passes": rows, "default": defaults}, indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table(title="graph passes (default: " + ", ".join(defaults) + ")")
    for column in ("pass", "description", "options"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["description"], ", ".join(row["options"]))
    stdout.print(table)


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("optimize")(optimize_command)
