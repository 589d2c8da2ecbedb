"""`trtkit calibrate MODEL --data DATA`: calibration data -> scales JSON (optionally a TensorRT cache).

Nothing heavy is imported here: onnxruntime and numpy load inside the API functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl
from trtkit.cli_args import (
    BatchSizeFlag,
    CastFlag,
    DataFlag,
    JsonFlag,
    NumSamplesFlag,
    PreprocessFlag,
    RayAddressFlag,
    ThreadsFlag,
    WorkersFlag,
    execution,
    options_flag,
    output_flag,
    parse_options,
    parse_preprocess,
)

HELP_ORDER = 30


def calibrate_command(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    data: DataFlag,
    output: Annotated[Path, output_flag("Scales JSON to write (default: scales.json).")] = Path("scales.json"),
    method: Annotated[str | None, typer.Option("--method", "-m", help="Calibrator: percentile (99.99; the default), entropy (TensorRT's EntropyCalibrator2), minmax, mse, ...")] = None,
    option: Annotated[list[str] | None, options_flag("Calibrator")] = None,
    override: Annotated[Path | None, typer.Option("--override", help="Custom scales (JSON/YAML tensor -> amax, or a TensorRT cache) pinning chosen tensors.")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Also write a TensorRT calibration cache here.")] = None,
    trt_version: Annotated[str, typer.Option("--trt-version", help="TensorRT version for the cache header (8.6.1 -> TRT-8601-...).")] = "8.6.1",
    tensors: Annotated[str, typer.Option("--tensors", help="quantizable (what `quantize` uses) or all (every float activation; default with --cache).")] = "",
    batch_size: BatchSizeFlag = 32,
    num_samples: NumSamplesFlag = None,
    preprocess: PreprocessFlag = None,
    cast: CastFlag = False,
    histogram_positions: Annotated[int | None, typer.Option("--histogram-positions", help="Histogram at most this many evenly spread positions of each sample of each tensor (min/max stay exact); 0: every value. Default: 4096, every value for entropy.")] = None,
    threads: ThreadsFlag = None,
    workers: WorkersFlag = None,
    ray_address: RayAddressFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Run the model over calibration data once and write per-tensor ranges (amax, scale = amax/127)."""
    from trtkit.calibration import CalibrationSettings
    from trtkit.data import load_data
    from trtkit.fileio import check_output_path
    from trtkit.trtcache import version_number, write_cache
    from trtkit.ui import console

    settings = CalibrationSettings.from_flags(  # every flag checked here, before any work
        method=method, options=parse_options(option), histogram_positions=histogram_positions,
        tensors=tensors or ("all" if cache is not None else "quantizable"), batch_size=batch_size,
        limit=num_samples, preprocess=parse_preprocess(preprocess), overrides=override)
    method = settings.calibrator.name
    run_on = execution(workers, ray_address)
    if cache is not None:
        version_number(trt_version)  # a bad version fails before any work
    check_output_path(output, model)
    assert data is not None  # typer: a required option
    source = load_data(data, model, batch_size=settings.batch_size, limit=settings.limit,
                       preprocess=settings.preprocess, cast=cast)  # integer data for float inputs: only with --cast
    stats = (settings.collect(model, source) if run_on.in_process
             else settings.collect_on(run_on, model, data, source, cast=cast))
    scales = settings.scales(stats)
    scales.save(output)
    if cache is not None:
        check_output_path(cache, model)
        write_cache(scales, cache, trt_version=trt_version)
    if as_json:
        from trtkit.calibration import calibration_threads

        typer.echo(json.dumps({"output": str(output), "cache": str(cache) if cache else None,
                               "threads": calibration_threads(), **scales.to_dict()}, indent=2, sort_keys=True))
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
    from trtkit.fileio import described

    console.print(f"wrote {described(output)}" + (f" and {described(cache)}" if cache else ""))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("calibrate")(calibrate_command)
