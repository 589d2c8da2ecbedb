"""Built-in `qdq` builder: an FP32 ONNX model + scales -> a QDQ INT8 ONNX model for TensorRT.

It declares `scale_tensors` (the activations it quantizes), which is what `trtkit calibrate` observes by
default. This module only registers; the work is in the submodules, imported when the builder is used:
  placement.py  where Q/DQ go (plan_qdq, activation_candidates)
  insert.py     the rewrite (quantize: `trtkit.quantize` in the Python API)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtkit import hookimpl
from trtkit.stages import Builder, Option


def _build(model: Any, output: Any, scales: str | None = None, exclude: list[str] | None = None,
           exclude_op_types: list[str] | None = None, per_channel: bool = True, reduce_range: bool = False,
           concat_max_ratio: float = 32.0, data: str | None = None, adaptive_round: bool = True,
           recenter: bool = True, smooth: bool = True, choose_ranges: bool = True, target: str | None = None, task_metrics: list[Any] | None = None, max_float: int | None = None,
           workers: int | None = None, address: str | None = None, engine: str | None = None) -> Path:
    from trtkit.errors import OptionError

    from .insert import quantize

    if not scales:
        raise OptionError("builder 'qdq' needs option 'scales' (a scales JSON from `trtkit calibrate`)")
    options: dict[str, Any] = {"exclude_op_types": exclude_op_types or (), "per_channel": per_channel,
                               "reduce_range": reduce_range, "concat_max_ratio": concat_max_ratio}
    if not data:
        if target:
            raise OptionError("builder 'qdq' option 'target' needs option 'data'")
        quantize(model, scales, output=output, exclude=exclude or (), **options)
        return Path(output)
    from trtkit.engine import Execution

    from .target import quantize_checked

    execution = Execution.create(engine=engine, workers=workers, address=address,
                                 where="builder 'qdq' option 'workers'")
    artifact, report = quantize_checked(model, scales, data, target=target, task_metrics=task_metrics or (),
                                        exclude=exclude or (), adaptive_round=adaptive_round, recenter=recenter,
                                        smooth=smooth, choose_ranges=choose_ranges, max_float=max_float,
                                        quantize_options=options,
                                        execution=None if execution.in_process else execution)
    artifact.save(output)
    if report.met is False:  # like a failed gate: the closest model is written, the run says it failed
        from trtkit.errors import GateError

        raise GateError(f"target {report.target}: not met ({report.measured:.4g}); blocked by {report.blocking}; "
                        f"{output} holds the closest model")
    return Path(output)


def _scale_tensors(model: Any) -> list[str]:
    from .placement import activation_candidates

    return activation_candidates(model)


@hookimpl
def register_builders(register: Any) -> None:
    register(Builder(
        name="qdq",
        description="Insert int8 Q/DQ (TensorRT explicit-quantization placement) using calibrated scales.",
        options={
            "scales": Option("path", None, "scales JSON / YAML / TensorRT cache", required=True),
            "exclude": Option("list", [], "node names to keep in float"),
            "exclude_op_types": Option("list", [], "op types to keep in float"),
            "per_channel": Option("bool", True, "per-output-channel weight scales"),
            "reduce_range": Option("bool", False, "7-bit weights (onnxruntime CPUs without VNNI)"),
            "concat_max_ratio": Option("float", 32.0, "no shared Concat scale when input ranges differ more"),
            "data": Option("path", None, "calibration data: refine by adaptive rounding, check on held-out samples"),
            "adaptive_round": Option("bool", True, "with data: int8 weights chosen against each layer's output"),
            "recenter": Option("bool", True, "with data: ReLU/ReLU6 outputs shifted onto [-amax/2, amax/2]"),
            "smooth": Option("bool", True, "with data: LayerNorm output and depthwise Conv input ranges moved into the weights"),
            "choose_ranges": Option("bool", True, "with data: each activation's range chosen by measurement, not the "
                                    "calibrator's"),
            "target": Option("str", None, "with data: accuracy to reach, e.g. 'sqnr>=20' (float fallback)"),
            "task_metrics": Option("list", [], "task metric specs the target may name (see `trtkit eval`)"),
            "max_float": Option("int", None, "with a target: at most this many layers in float"),
            "workers": Option("int", None, "with data: adaptive rounding's statistics on this many engine workers"),
            "address": Option("str", None, "with data: the engine's cluster (a Ray address)"),
            "engine": Option("str", None, "with data: the execution engine (default: the default one, Ray)"),
        },
        build=_build,
        scale_tensors=_scale_tensors,
    ))
