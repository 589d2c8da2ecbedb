"""`trtkit inspect ARTIFACT`: what a built artefact is (reads an engine's .json sidecar, or the ONNX model).

Nothing heavy is imported here: the builders load onnx/onnxruntime/tensorrt inside their functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag

HELP_ORDER = 55


def inspect_command(
    artifact: Annotated[Path, typer.Argument(help="A built engine (reads its .json sidecar) or ONNX model.")],
    as_json: JsonFlag = False,
    load: Annotated[bool, typer.Option("--load", help="Also open it for running here (checks TensorRT "
                                       "version and GPU against the sidecar).")] = False,
) -> None:
    """Show what a built artefact is: TensorRT version, device, precision, inputs/outputs, profiles."""
    import json

    from trtkit.building import describe
    from trtkit.ui import stdout

    info = describe(artifact)
    if load:
        from trtkit.runners import open_runner

        runner = open_runner(artifact)
        info["runnable_here"] = {"inputs": list(runner.input_names), "outputs": list(runner.output_names)}
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table(title=str(artifact), show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key in sorted(info):
        value = info[key]
        table.add_row(key, json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value))
    stdout.print(table)


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("inspect")(inspect_command)
