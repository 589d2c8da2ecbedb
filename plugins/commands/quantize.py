"""`trtkit quantize MODEL --scales SCALES`: scales -> QDQ ONNX (or calibrate first with --data).

Nothing heavy is imported here: onnx and numpy load inside the API functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from trtkit import hookimpl
from trtkit.cli_args import DataFlag, JsonFlag, output_flag

HELP_ORDER = 40


def quantize_command(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    scales: Annotated[Path | None, typer.Option("--scales", "-s", help="Scales JSON (from `trtkit calibrate`), YAML or TensorRT cache.")] = None,
    output: Annotated[Path | None, output_flag("QDQ ONNX model to write (default: MODEL.int8.onnx).")] = None,
    data: DataFlag = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Calibrator when --data is given (default: percentile).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", "-x", help="Node name to keep in float (repeatable).")] = None,
    exclude_op_type: Annotated[list[str] | None, typer.Option("--exclude-op-type", help="Op type to keep in float (repeatable).")] = None,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="One scale per weight tensor instead of per channel.")] = False,
    reduce_range: Annotated[bool, typer.Option("--reduce-range", help="7-bit weights (onnxruntime on CPUs without VNNI); not for TensorRT.")] = False,
    concat_max_ratio: Annotated[float, typer.Option("--concat-max-ratio", help="No shared Concat scale when input ranges differ more than this.")] = 32.0,
    as_json: JsonFlag = False,
) -> None:
    """Insert int8 Q/DQ nodes where TensorRT fuses them (per-channel weights, per-tensor activations).

    The scales come from --scales, or from calibrating on --data first.
    """
    from trtkit.calibration import calibrate
    from trtkit.errors import OptionError
    from trtkit.fileio import check_output_path
    from trtkit.plugins.qdq.insert import quantize
    from trtkit.ui import console

    if (scales is None) == (data is None):
        raise OptionError("give exactly one of --scales FILE or --data DATA")
    output = output or model.with_name(model.stem + ".int8.onnx")
    check_output_path(output, model)
    source: Any = scales if scales is not None else calibrate(model, data, method=method)
    artifact = quantize(model, source, output=output, exclude=exclude or (), exclude_op_types=exclude_op_type or (),
                        per_channel=not per_tensor, reduce_range=reduce_range, concat_max_ratio=concat_max_ratio)
    info = artifact.metadata["quantization"]
    summary = {
        "output": str(output),
        "method": info["method"],
        "quantized_nodes": info["quantized_nodes"],
        "activations": len(info["activation_amax"]),
        "weights": len(info["weights"]),
        "skipped": info["skipped"],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    console.print(f"quantized {len(info['quantized_nodes'])} nodes ({summary['activations']} activation Q/DQ, "
                  f"{summary['weights']} int8 weights); wrote {output}")
    for node, reason in info["skipped"].items():
        console.print(f"  float: {node}: {reason}")


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("quantize")(quantize_command)
