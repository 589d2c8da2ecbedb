"""`trtkit export SOURCE -o OUT.onnx`: a trained model to checked ONNX.

Nothing heavy is imported here: torch, onnx and onnxruntime load inside the API functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag, ThreadsFlag, options_flag, output_flag, parse_options

HELP_ORDER = 10


def _parse_inputs(values: list[str] | None) -> dict[str, str] | list[str] | None:
    """`--input NAME:1x3x64x64` (or just `1x3x64x64`) -> {name: shape} (or a list of shapes)."""
    if not values:
        return None
    named = [v.partition(":") for v in values]
    if all(sep for _, sep, _ in named):
        return {name.strip(): shape.strip() for name, _, shape in named}
    if any(sep for _, sep, _ in named):
        from trtkit.errors import OptionError

        raise OptionError("--input: give every input as NAME:SHAPE, or every input as SHAPE only")
    return list(values)


def export_command(
    source: Annotated[str, typer.Argument(help="A model factory: file.py:factory or package.module:factory "
                                          "(a callable returning a torch.nn.Module).")],
    output: Annotated[Path, output_flag("ONNX file to write.")],
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="Input NAME:SHAPE, e.g. "
                                                     "image:1x3x224x224 (repeatable, in order).")] = None,
    output_names: Annotated[list[str] | None, typer.Option("--output-name", help="Output name (repeatable, "
                                                           "in order).")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Axis 0 of inputs and outputs is "
                                                "dynamic ('batch').")] = False,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 17).")] = None,
    method: Annotated[str | None, typer.Option("--exporter", help="auto, dynamo or torchscript (auto: dynamo "
                                               "when onnxscript is installed).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="State dict to load (torch.load "
                                                    "weights_only=True).")] = None,
    exporter: Annotated[str | None, typer.Option("--with", help="Exporter plugin (default: the default "
                                                 "exporter).")] = None,
    option: Annotated[list[str] | None, options_flag("Exporter")] = None,
    threads: ThreadsFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Export a trained model to ONNX, check it, and compare onnxruntime with the framework."""
    from trtkit.exporting import export
    from trtkit.ui import console

    options = parse_options(option)
    parsed = _parse_inputs(inputs)
    with console.status(f"exporting {source}", spinner="dots"):
        artifact = export(
            source, output, exporter=exporter, input_shapes=parsed,
            output_names=list(output_names) if output_names else None,
            dynamic_batch=True if dynamic_batch else None, opset=opset, method=method,
            checkpoint=checkpoint, options=options,
        )
    info = dict(artifact.metadata.get("export", {}))
    summary = {
        "output": str(output), "exporter": info.get("exporter"), "opset": info.get("opset"),
        "nodes": len(artifact.model.graph.node), "max_abs_diff": info.get("max_abs_diff"),
        "inputs": info.get("inputs"), "outputs": [o.name for o in artifact.model.graph.output],
        "dynamic_axes": info.get("dynamic_axes"),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    diff = summary["max_abs_diff"]
    from trtkit.fileio import described

    console.print(
        f"[green]exported[/green] {described(output)} ({summary['nodes']} nodes, {summary['exporter']} exporter, "
        f"opset {summary['opset']})"
        + (f"; onnxruntime vs torch max |diff| {diff:.2e}" if diff is not None else "")
    )


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("export")(export_command)
