"""Precision rules per TensorRT version: builder flags from the options and the model's Q/DQ nodes, and
layers pinned to a precision (TensorRT <= 10).

TensorRT 11 and TensorRT-RTX are strongly typed: no FP16/INT8 builder flags, no calibrators. Precision comes
from the graph (Q/DQ nodes, casts). Asking for a flag they do not have is an OptionError, not a silent no-op.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from trtkit.errors import OptionError, unknown_name

from .module import product, strongly_typed_only
from .options import LAYER_PRECISIONS

if TYPE_CHECKING:
    import tensorrt as trt

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def model_has_qdq(model_path: Path) -> bool:
    from trtkit.model import ModelArtifact

    model = ModelArtifact.load(model_path).model  # InputFileError naming the file when it is not ONNX
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def parse_layer_precisions(text: str | None) -> dict[str, str]:
    result: dict[str, str] = {}
    if not text:
        return result
    for item in text.split(","):
        pattern, sep, precision = item.strip().rpartition(":")
        precision = precision.strip().lower()
        if not sep or not pattern or precision not in LAYER_PRECISIONS:
            raise OptionError(f"option 'layer_precisions': expected NODE_OR_GLOB:{'|'.join(LAYER_PRECISIONS)}, got {item!r}")
        result[pattern.strip()] = precision
    return result


def check_options(module: ModuleType, options: Mapping[str, Any], qdq: bool) -> list[str]:
    """Refuse contradictory options for this TensorRT version; return the builder flags to set."""
    where = product(module)
    precision = options.get("precision") or "auto"
    if strongly_typed_only(module):
        reason = (f"{where} is strongly typed: it has no FP16/INT8 builder flags and no implicit INT8; "
                  "precision comes from the graph (quantize to a QDQ model with `trtkit quantize`, or cast to fp16)")
        if precision not in ("auto", "fp32"):
            raise OptionError(f"option 'precision={precision}': {reason}")
        for key in ("calibration_cache", "calibration_data"):
            if options.get(key):
                raise OptionError(f"option '{key}': {reason}")
        if options.get("layer_precisions"):
            raise OptionError(f"option 'layer_precisions': {reason}; put Cast nodes in the graph instead")
        if precision == "fp32" and qdq:
            raise OptionError(f"option 'precision=fp32' contradicts the model's Q/DQ nodes ({where} runs them in INT8); "
                              "use precision=auto or quantize nothing")
        return []
    if options.get("compute_capability"):
        raise OptionError("option 'compute_capability' is for TensorRT-RTX ahead-of-time builds; "
                          "TensorRT builds for the GPU it runs on")
    flags: list[str] = []
    if precision in ("fp16", "best"):
        flags.append("FP16")
    if precision in ("int8", "best") or qdq:
        flags.append("INT8")
    if precision == "fp32" and qdq:
        raise OptionError("option 'precision=fp32' contradicts the model's Q/DQ nodes; use precision=auto")
    if options.get("strongly_typed"):
        if precision != "auto":
            raise OptionError(f"option 'precision={precision}' contradicts strongly_typed=true (the graph decides)")
        flags = []
    implicit = precision in ("int8", "best") and not qdq
    has_cache = bool(options.get("calibration_cache"))
    has_data = bool(options.get("calibration_data"))
    if (has_cache or has_data) and qdq:
        raise OptionError("calibration_cache/calibration_data contradict the model's Q/DQ nodes "
                          "(explicit quantization already carries the scales)")
    if (has_cache or has_data) and "INT8" not in flags:
        raise OptionError("calibration_cache/calibration_data need precision=int8 or precision=best")
    if implicit and not (has_cache or has_data):
        raise OptionError("precision=int8 on a model without Q/DQ nodes needs calibration_cache or calibration_data "
                          "(or quantize it to QDQ first: `trtkit quantize`)")
    if options.get("dla_core") is not None and not ({"FP16", "INT8"} & set(flags)):
        raise OptionError("option 'dla_core': DLA runs FP16 or INT8 only; add precision=fp16, int8 or best")
    return flags


def match_layers(layer_names: list[str], wanted: Mapping[str, str]) -> dict[str, str]:
    """{layer: precision} for layers named (ONNX node name) or globbed in `wanted`; the first pattern wins.

    A pattern matching no layer is an OptionError listing close layer names.
    """
    applied: dict[str, str] = {}
    matched = dict.fromkeys(wanted, False)
    for name in layer_names:
        for pattern, precision in wanted.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                matched[pattern] = True
                applied[name] = precision
                break
    missing = [p for p, hit in matched.items() if not hit]
    if missing:
        raise OptionError(f"option 'layer_precisions': {unknown_name('layer', missing[0], layer_names)}")
    return dict(sorted(applied.items()))


def apply_layer_precisions(module: ModuleType, network: trt.INetworkDefinition, wanted: dict[str, str]) -> dict[str, str]:
    """Pin layers (matched by ONNX node name or glob) to a precision (TensorRT <= 10); returns {layer: precision}."""
    types = {"fp32": module.DataType.FLOAT, "fp16": module.DataType.HALF, "int8": module.DataType.INT8}
    layers = [network.get_layer(index) for index in range(network.num_layers)]
    applied = match_layers([layer.name for layer in layers], wanted)
    for layer in layers:
        if layer.name in applied:
            layer.precision = types[applied[layer.name]]
            for out in range(layer.num_outputs):
                if layer.get_output(out).is_execution_tensor:
                    layer.set_output_type(out, types[applied[layer.name]])
    return applied
