"""`trtkit quantize MODEL --scales SCALES`: scales -> QDQ ONNX; with --data also adaptive rounding, checked.

`--data` calibrates first when no --scales are given, then refines the int8 weights by adaptive rounding and
measures every decision on the samples (plugins/qdq/target.py); `--target "sqnr>=20"` keeps the fewest layers
in float until the target holds.

Nothing heavy is imported here: onnx and numpy load inside the API functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from trtkit import hookimpl
from trtkit.cli_args import (
    DataFlag,
    JsonFlag,
    RayAddressFlag,
    TaskMetricFlag,
    WorkersFlag,
    execution,
    output_flag,
)

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
    target: Annotated[str | None, typer.Option("--target", help="Accuracy to reach on the --data samples, e.g. 'sqnr>=20', 'agreement>=0.95', 'positive_iou>=0.9' (with --task-metric); the fewest layers stay in float.")] = None,
    task_metric: TaskMetricFlag = None,
    adaptive_round: Annotated[bool, typer.Option("--adaptive-round/--nearest-round", help="With --data: choose int8 weights against each layer's output (kept only when it measures better).")] = True,
    recenter: Annotated[bool, typer.Option("--recenter/--no-recenter", help="With --data: shift ReLU/ReLU6 outputs onto [-amax/2, amax/2], half the int8 step (kept only when it measures better).")] = True,
    smooth: Annotated[bool, typer.Option("--smooth/--no-smooth", help="With --data: move LayerNorm output and depthwise Conv input ranges into the weights reading them (kept only when it measures better).")] = True,
    choose_ranges: Annotated[bool, typer.Option("--choose-ranges/--calibrator-ranges", help="With --data: choose each activation's range by measurement (a blend toward the full range, the least error at the reading layers, the full range; each kept only when it measures better), or keep the calibrator's ranges.")] = True,
    max_float: Annotated[int | None, typer.Option("--max-float", help="With --target: at most this many layers in float (default: a quarter of them).")] = None,
    workers: WorkersFlag = None,
    ray_address: RayAddressFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Insert int8 Q/DQ nodes where TensorRT fuses them (per-channel weights, per-tensor activations).

    The scales come from --scales, or from calibrating on --data first. With --data, int8 weights are chosen
    by adaptive rounding and every decision is measured on the samples; --target adds float fallback.
    """
    from trtkit.calibration import calibrate
    from trtkit.errors import OptionError
    from trtkit.fileio import check_output_path
    from trtkit.plugins.qdq.insert import quantize

    if scales is None and data is None:
        raise OptionError("give --scales FILE, --data DATA, or both")
    for flag, value in (("--target", target), ("--task-metric", task_metric), ("--max-float", max_float)):
        if value and data is None:
            raise OptionError(f"{flag} needs --data (the result is measured on its samples)")
    run_on = execution(workers, ray_address)  # adaptive rounding's Gram sums on workers; results identical
    output = output or model.with_name(model.stem + ".int8.onnx")
    check_output_path(output, model)
    if scales is not None:
        source: Any = scales
    elif run_on.in_process:
        source = calibrate(model, data, method=method)
    else:  # the calibration too runs on the workers (the same scales)
        from trtkit.calibration import CalibrationSettings

        settings = CalibrationSettings.create(method=method)
        source = settings.scales(settings.collect_on(run_on, model, data))
    options = {"exclude_op_types": exclude_op_type or (), "per_channel": not per_tensor,
               "reduce_range": reduce_range, "concat_max_ratio": concat_max_ratio}
    checked = None
    if data is None:
        artifact = quantize(model, source, output=output, exclude=exclude or (), **options)
    else:
        from trtkit.plugins.qdq.target import quantize_checked

        artifact, checked = quantize_checked(model, source, data, target=target, task_metrics=task_metric or (),
                                             exclude=exclude or (), adaptive_round=adaptive_round,
                                             recenter=recenter, smooth=smooth, choose_ranges=choose_ranges,
                                             max_float=max_float,
                                             quantize_options=options,
                                             execution=None if run_on.in_process else run_on)
        artifact.save(output)
    info = artifact.metadata["quantization"]
    summary = {
        "output": str(output),
        "method": info["method"],
        "quantized_nodes": info["quantized_nodes"],
        "activations": len(info["activation_amax"]),
        "weights": len(info["weights"]),
        "skipped": info["skipped"],
        "checked": info.get("checked"),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary, info, output, checked)
    if checked is not None and checked.met is False:
        from trtkit.errors import GateError

        raise GateError(f"--target {checked.target}: not met ({checked.measured:.4g}); blocked by {checked.blocking};"
                        f" {output} holds the closest model")


def _print_summary(summary: dict[str, Any], info: dict[str, Any], output: Path, checked: Any) -> None:
    from trtkit.ui import console

    console.print(f"quantized {len(info['quantized_nodes'])} nodes ({summary['activations']} activation Q/DQ, "
                  f"{summary['weights']} int8 weights); wrote {output}")
    for node, reason in info["skipped"].items():
        console.print(f"  float: {node}: {reason}")
    if checked is not None:
        from trtkit.plugins.qdq.target import print_report

        print_report(checked)


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("quantize")(quantize_command)
