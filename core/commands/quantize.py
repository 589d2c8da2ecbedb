"""`trtkit calibrate` (data -> scales JSON, optional TensorRT cache) and `trtkit quantize` (scales -> QDQ ONNX)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from . import parse_key_values


def _print_json(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True))


def _positions(method: str, value: int | None) -> int | None:
    from ..calibration import histogram_positions
    from ..errors import OptionError

    if value is not None and value < 0:
        raise OptionError(f"--histogram-positions must be >= 0 (0: every value), got {value}")
    return histogram_positions(method, "auto" if value is None else value or None)


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_command(
        model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
        data: Annotated[str, typer.Option("--data", "-d", help=".npy, .npz or a folder of images.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Scales JSON to write.")] = Path("scales.json"),
        method: Annotated[str, typer.Option("--method", "-m", help="Calibrator: percentile (99.99), entropy (TensorRT's EntropyCalibrator2), minmax, mse, ...")] = "percentile",
        option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Calibrator option KEY=VALUE (repeatable).")] = None,
        override: Annotated[Path | None, typer.Option("--override", help="Custom scales (JSON/YAML tensor -> amax, or a TensorRT cache) pinning chosen tensors.")] = None,
        cache: Annotated[Path | None, typer.Option("--cache", help="Also write a TensorRT calibration cache here.")] = None,
        trt_version: Annotated[str, typer.Option("--trt-version", help="TensorRT version for the cache header (8.6.1 -> TRT-8601-...).")] = "8.6.1",
        tensors: Annotated[str, typer.Option("--tensors", help="quantizable (what `quantize` uses) or all (every float activation; default with --cache).")] = "",
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per onnxruntime run.")] = 32,
        limit: Annotated[int | None, typer.Option("--limit", "-n", help="Use at most this many samples.")] = None,
        preprocess: Annotated[list[str] | None, typer.Option("--preprocess", "-P", help="Image preprocessing KEY=VALUE: resize, crop, scale, mean, std, channels, layout.")] = None,
        per_sample: Annotated[int | None, typer.Option("--histogram-positions", help="Histogram at most this many evenly spread positions of each sample of each tensor (min/max stay exact); 0: every value. Default: 4096, every value for entropy.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
    ) -> None:
        """Run the model over calibration data once and write per-tensor ranges (amax, scale = amax/127)."""
        from ..calibration import collect
        from ..fileio import check_output_path
        from ..registry import get_registry
        from ..trtcache import version_number, write_cache
        from ..ui import console

        calibrator = get_registry().calibrator(method)
        options = calibrator.resolve_options(parse_key_values(option, "--option"))
        if cache is not None:
            version_number(trt_version)  # a bad version fails before any work
        if override is not None:
            from ..calibration import _read_overrides_file

            _read_overrides_file(override)
        check_output_path(output, model)
        which = tensors or ("all" if cache is not None else "quantizable")
        stats = collect(model, data, tensors=which, batch_size=batch_size, limit=limit,
                        preprocess=parse_key_values(preprocess, "--preprocess") or None,
                        histograms=method != "minmax", per_item=_positions(method, per_sample))
        scales = stats.compute(method, overrides=override, options=options)
        scales.save(output)
        if cache is not None:
            check_output_path(cache, model)
            write_cache(scales, cache, trt_version=trt_version)
        if as_json:
            _print_json({"output": str(output), "cache": str(cache) if cache else None, **scales.to_dict()})
            return
        from rich.table import Table

        table = Table(title=f"{method} calibration: {stats.num_samples} samples, {len(scales)} tensors")
        for column in ("tensor", "min", "max", "amax", "scale", "clipped", "source"):
            table.add_column(column)
        for name, amax in scales.items():
            summary = scales.stats.get(name, {})
            clipped = summary.get("clipped")
            table.add_row(name, f"{summary.get('min', float('nan')):.4g}", f"{summary.get('max', float('nan')):.4g}",
                          f"{amax:.4g}", f"{amax / 127:.4g}", "-" if clipped is None else f"{clipped:.2%}",
                          scales.sources.get(name, method))
        console.print(table)
        heavy = sorted(((s.get("clipped") or 0.0, n) for n, s in scales.stats.items()), reverse=True)
        heavy = [(c, n) for c, n in heavy if c > 0.01]
        if heavy:
            console.print(f"[yellow]warning:[/yellow] {method} clips more than 1% of the values of {len(heavy)} "
                          f"tensor(s) (most: {heavy[0][1]}, {heavy[0][0]:.1%}); if accuracy suffers, try "
                          "--method percentile or mse, or pin them with --override")
        console.print(f"wrote {output}" + (f" and {cache}" if cache else ""))

    @app.command("quantize")
    def quantize_command(
        model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
        scales: Annotated[Path | None, typer.Option("--scales", "-s", help="Scales JSON (from `trtkit calibrate`), YAML or TensorRT cache.")] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="QDQ ONNX model to write.")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Calibrate on this data first (instead of --scales).")] = None,
        method: Annotated[str, typer.Option("--method", "-m", help="Calibrator when --data is given.")] = "percentile",
        exclude: Annotated[list[str] | None, typer.Option("--exclude", "-x", help="Node name to keep in float (repeatable).")] = None,
        exclude_op_type: Annotated[list[str] | None, typer.Option("--exclude-op-type", help="Op type to keep in float (repeatable).")] = None,
        per_tensor: Annotated[bool, typer.Option("--per-tensor", help="One scale per weight tensor instead of per channel.")] = False,
        reduce_range: Annotated[bool, typer.Option("--reduce-range", help="7-bit weights (onnxruntime on CPUs without VNNI); not for TensorRT.")] = False,
        concat_max_ratio: Annotated[float, typer.Option("--concat-max-ratio", help="No shared Concat scale when input ranges differ more than this.")] = 32.0,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary on stdout.")] = False,
    ) -> None:
        """Insert int8 Q/DQ nodes where TensorRT fuses them (per-channel weights, per-tensor activations)."""
        from ..calibration import calibrate
        from ..errors import OptionError
        from ..fileio import check_output_path
        from ..qdq import quantize
        from ..ui import console

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
            _print_json(summary)
            return
        console.print(f"quantized {len(info['quantized_nodes'])} nodes ({summary['activations']} activation Q/DQ, "
                      f"{summary['weights']} int8 weights); wrote {output}")
        for node, reason in info["skipped"].items():
            console.print(f"  float: {node}: {reason}")
