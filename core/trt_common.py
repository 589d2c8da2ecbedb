"""Code shared by the `tensorrt` and `tensorrt-rtx` builders: one build path for both Python modules.

- `import_trt(name)`: the module (`tensorrt` or `tensorrt_rtx`), or a BuildError saying why it is unusable.
- `build_engine(...)`: parse ONNX (errors per node: ONNX node name + op type), optimization profiles for
  dynamic shapes, workspace limit, timing cache load/save, precision flags where the version has them
  (TensorRT <= 10), implicit INT8 from a calibration cache or a calibrator fed through cuda-python
  (TensorRT <= 10), layer precision constraints, DLA; writes the engine and a JSON sidecar.
- `check_capability(...)`: which nodes the TensorRT parser rejects, before a long build.
- `EngineRunner` / `load_engine(...)`: checks the sidecar (TensorRT version, GPU compute capability) before
  deserializing, then runs through cuda-python device buffers.

TensorRT 11 and TensorRT-RTX are strongly typed: no FP16/INT8 builder flags, no calibrators. Precision comes
from the graph (Q/DQ nodes, casts). Asking for a flag they do not have is an OptionError, not a silent no-op.

Nothing heavy is imported at module level: tensorrt, onnx and cuda-python load inside the functions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import BuildError, InputFileError, OptionError
from .fileio import atomic_path, write_bytes, write_text
from .stages import Option

if TYPE_CHECKING:
    import numpy as np
    import tensorrt as trt

SIDECAR_FORMAT = "trtkit-engine/1"
# Builder name -> Python module name.
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PRECISIONS = ("auto", "fp32", "fp16", "int8", "best")
LAYER_PRECISIONS = ("fp32", "fp16", "int8")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

OPTIONS: dict[str, Option] = {
    "precision": Option(
        "str", "auto", choices=PRECISIONS,
        help="auto: the graph decides (Q/DQ nodes); fp16/int8/best set builder flags (TensorRT <= 10 only)",
    ),
    "min_shapes": Option("str", None, help="profile minimum shapes, trtexec style: 'x:1x3x224x224,y:...'"),
    "opt_shapes": Option("str", None, help="profile optimum shapes (default: max_shapes)"),
    "max_shapes": Option("str", None, help="profile maximum shapes"),
    "max_batch": Option("int", 1, help="max (and opt) of a dynamic first dim not given in *_shapes"),
    "workspace_mb": Option("int", None, help="workspace memory pool limit in MiB"),
    "timing_cache": Option("path", None, help="timing cache file: loaded when it exists, saved after the build"),
    "calibration_cache": Option("path", None, help="implicit INT8 calibration cache (TensorRT <= 10, DLA)"),
    "calibration_data": Option(
        "path", None, help=".npz (one array per input) or .npy batches fed to a calibrator (TensorRT <= 10)",
    ),
    "calibrator": Option("str", "entropy", choices=("entropy", "minmax"), help="calibrator class"),
    "calibration_batch_size": Option("int", 8, help="batch size fed to the calibrator"),
    "layer_precisions": Option(
        "str", None, help="keep layers in a precision: 'node_or_glob:fp32,conv*:fp16' (TensorRT <= 10)",
    ),
    "dla_core": Option("int", None, help="build for this DLA core (Jetson); needs fp16 or int8"),
    "gpu_fallback": Option("bool", True, help="let layers DLA cannot run fall back to the GPU"),
    "strongly_typed": Option("bool", False, help="strongly typed network (TensorRT 10; always on for 11/RTX)"),
    "compute_capability": Option(
        "list", None, help="target GPUs for TensorRT-RTX ahead-of-time builds, e.g. sm86,sm89 (default: all)",
    ),
    "optimization_level": Option("int", None, help="builder optimization level 0..5"),
}


# ---- the module ---------------------------------------------------------------------------------------

def import_trt(builder: str) -> ModuleType:
    """The TensorRT Python module behind a builder name; BuildError with the reason when it is not usable.

    `import tensorrt` can succeed on a bare namespace package (tensorrt-stubs installs one); a usable module
    has `Builder`.
    """
    module_name = MODULES.get(builder, builder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BuildError(f"{builder}: the Python module '{module_name}' is not installed ({type(exc).__name__})") from None
    if not hasattr(module, "Builder"):
        raise BuildError(
            f"{builder}: '{module_name}' is only a stub/namespace package here (no TensorRT libraries); "
            f"install TensorRT (JetPack on Jetson, pip install tensorrt on x86 with a GPU)"
        )
    return module


def unavailable_reason(builder: str) -> str | None:
    """Why `builder` cannot build here, or None. TensorRT builds on (and for) a GPU; TensorRT-RTX needs none."""
    try:
        module = import_trt(builder)
    except BuildError as exc:
        return str(exc)
    if not is_rtx(module):
        gpu = gpu_info()
        if isinstance(gpu, str):
            return f"{builder}: {product(module)} builds engines on the GPU they run on: {gpu}"
    return None


def is_rtx(module: ModuleType) -> bool:
    return module.__name__.split(".")[0] == "tensorrt_rtx"


def version_tuple(module: ModuleType) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(getattr(module, "__version__", "0")))
    return tuple(int(p) for p in parts[:3]) or (0,)


def version_string(module: ModuleType) -> str:
    return str(getattr(module, "__version__", "unknown"))


def product(module: ModuleType) -> str:
    return f"TensorRT-RTX {version_string(module)}" if is_rtx(module) else f"TensorRT {version_string(module)}"


def strongly_typed_only(module: ModuleType) -> bool:
    """TensorRT 11 and TensorRT-RTX: no precision flags, no implicit INT8, no calibrators."""
    return is_rtx(module) or version_tuple(module)[0] >= 11


def make_logger(module: ModuleType) -> Any:
    """An ILogger that collects messages (shown on failure) instead of printing TensorRT's log to stderr."""

    class CollectingLogger(module.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            module.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((getattr(severity, "name", str(severity)), msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR", "kERROR", "kINTERNAL_ERROR")]

        def warnings(self) -> list[str]:
            return [m for s, m in self.messages if s in ("WARNING", "kWARNING")]

    return CollectingLogger()


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """TensorRT-RTX marks timing-cache calls deprecated no-ops; the shared code still calls them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# ---- parsing --------------------------------------------------------------------------------------------

@dataclass
class ParseIssue:
    node_index: int
    node_name: str
    op_type: str
    message: str

    def describe(self) -> str:
        name = self.node_name or f"#{self.node_index}"
        return f"node '{name}' ({self.op_type or '?'}): {self.message}"


def _parser_issues(parser: Any) -> list[ParseIssue]:
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = _call(error, "node", -1)
        issues.append(ParseIssue(
            node_index=int(node) if node is not None else -1,
            node_name=str(_call(error, "node_name", "") or ""),
            op_type=str(_call(error, "node_operator", "") or ""),
            message=" ".join(str(_call(error, "desc", "") or "").split()),
        ))
    return issues


def _call(obj: Any, name: str, default: Any) -> Any:
    """Parser errors grew node_name()/node_operator() in TensorRT 10; older parsers lack them."""
    method = getattr(obj, name, None)
    if method is None:
        return default
    try:
        return method()
    except Exception:
        return default


def _onnx_nodes(model_path: Path) -> list[tuple[str, str]]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [(node.name, node.op_type) for node in model.graph.node]


def _fill_names(issues: list[ParseIssue], model_path: Path) -> None:
    """Older parsers report only the node index: look up the ONNX node name and op type."""
    if all(i.node_name and i.op_type for i in issues):
        return
    nodes = _onnx_nodes(model_path)
    for issue in issues:
        if 0 <= issue.node_index < len(nodes):
            name, op = nodes[issue.node_index]
            issue.node_name = issue.node_name or name
            issue.op_type = issue.op_type or op


def _create_network(module: ModuleType, builder: trt.Builder, strongly_typed: bool) -> trt.INetworkDefinition:
    flags = 0
    creation = module.NetworkDefinitionCreationFlag
    major = version_tuple(module)[0]
    if not is_rtx(module) and major < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed and not strongly_typed_only(module):
        if not hasattr(creation, "STRONGLY_TYPED"):
            raise OptionError(f"option 'strongly_typed': {product(module)} has no strongly typed networks (TensorRT >= 9.2)")
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return builder.create_network(flags)


def parse_onnx(module: ModuleType, builder: trt.Builder, network: trt.INetworkDefinition, logger: Any,
               model_path: Path) -> Any:
    """Parse the ONNX file into `network`; BuildError listing every failing node by ONNX name and op type."""
    parser = module.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(model_path))
    if not ok:
        issues = _parser_issues(parser)
        _fill_names(issues, model_path)
        detail = "; ".join(i.describe() for i in issues) or "; ".join(logger.errors()[-3:]) or "unknown error"
        raise BuildError(f"{model_path}: {product(module)} parser failed: {detail}")
    return parser


def check_capability(builder_name: str, model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Which nodes the TensorRT parser supports, before a long build. Raises BuildError when no TensorRT."""
    from .model import ModelArtifact

    module = import_trt(builder_name)
    path = _check_model_file(model_path)
    model = ModelArtifact.load(path).model
    logger = make_logger(module)
    builder = module.Builder(logger)
    network = _create_network(module, builder, strongly_typed=False)
    parser = module.OnnxParser(network, logger)
    nodes = [(node.name, node.op_type) for node in model.graph.node]
    if hasattr(parser, "supports_model_v2"):
        supported = bool(parser.supports_model_v2(path.read_bytes(), str(path)))
    else:  # TensorRT 8.6
        supported = bool(parser.supports_model(path.read_bytes(), str(path))[0])
    issues = _parser_issues(parser)
    _fill_names(issues, path)
    by_index: dict[int, ParseIssue] = {}
    for issue in issues:
        by_index.setdefault(issue.node_index, issue)
    # Ops the parser has no importer for, even where the first failure hid them.
    for index, (name, op) in enumerate(nodes):
        if index not in by_index and hasattr(parser, "supports_operator") and not parser.supports_operator(op):
            by_index[index] = ParseIssue(index, name, op, "no importer for this operator")
    unsupported = [
        {"index": i.node_index, "node": i.node_name, "op_type": i.op_type, "reason": i.message}
        for _, i in sorted(by_index.items())
    ]
    return {
        "model": str(path),
        "builder": builder_name,
        "tensorrt": product(module),
        "nodes": len(nodes),
        "supported": supported and not unsupported,
        "unsupported": unsupported,
        "unsupported_op_types": sorted({u["op_type"] for u in unsupported}),
    }


def _check_model_file(model_path: str | os.PathLike[str]) -> Path:
    path = Path(model_path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.suffix.lower() != ".onnx":
        raise InputFileError(f"{path}: expected an ONNX model (.onnx)")
    return path


# ---- shapes and profiles ----------------------------------------------------------------------------------

def parse_shapes(text: str | None, option: str) -> dict[str, tuple[int, ...]]:
    """'x:1x3x224x224,y:2x5' -> {'x': (1, 3, 224, 224), 'y': (2, 5)} (trtexec --minShapes syntax)."""
    result: dict[str, tuple[int, ...]] = {}
    if not text:
        return result
    for item in re.split(r",(?=[^,:]+:)", text.strip()):
        name, sep, dims = item.strip().rpartition(":")
        if not sep or not name:
            raise OptionError(f"option '{option}': expected NAME:DxDxD, got {item!r}")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims.strip() else ()
        except ValueError:
            raise OptionError(f"option '{option}': bad dims {dims!r} for input '{name}' (use e.g. 1x3x224x224)") from None
        if any(d <= 0 for d in shape):
            raise OptionError(f"option '{option}': dims of input '{name}' must be positive, got {dims!r}")
        result[name.strip().strip("'\"")] = shape
    return result


def _dims(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def make_profiles(network: trt.INetworkDefinition, options: Mapping[str, Any]) -> list[dict[str, dict[str, list[int]]]]:
    """One profile {input: {min, opt, max}} covering every input with dynamic dims ([] when all are static)."""
    mins = parse_shapes(options.get("min_shapes"), "min_shapes")
    opts = parse_shapes(options.get("opt_shapes"), "opt_shapes")
    maxs = parse_shapes(options.get("max_shapes"), "max_shapes")
    inputs = {network.get_input(i).name: _dims(network.get_input(i).shape) for i in range(network.num_inputs)}
    for option, given in (("min_shapes", mins), ("opt_shapes", opts), ("max_shapes", maxs)):
        for name in given:
            if name not in inputs:
                from .errors import unknown_name

                raise OptionError(f"option '{option}': {unknown_name('input', name, inputs)}")
    max_batch = int(options.get("max_batch") or 1)
    if max_batch < 1:
        raise OptionError("option 'max_batch' must be >= 1")
    profile: dict[str, dict[str, list[int]]] = {}
    for name, shape in inputs.items():
        if all(d >= 0 for d in shape) and name not in mins and name not in maxs and name not in opts:
            continue
        entry: dict[str, list[int]] = {}
        # Shapes given for this input fill its missing ones (trtexec: one shape means min = opt = max).
        fallback = [g[name] for g in (opts, maxs, mins) if name in g]
        for kind, given in (("min", mins), ("max", maxs)):
            if name in given or fallback:
                entry[kind] = list(given.get(name, fallback[0]))
                continue
            dims = []
            for axis, d in enumerate(shape):
                if d >= 0:
                    dims.append(d)
                elif axis == 0:
                    dims.append(1 if kind == "min" else max_batch)
                else:
                    example = "x".join(str(x if x > 0 else 1) for x in shape)
                    raise OptionError(
                        f"input '{name}' has a dynamic dim {axis}: give its range with options "
                        f"min_shapes/opt_shapes/max_shapes (e.g. max_shapes={name}:{example})"
                    )
            entry[kind] = dims
        entry["opt"] = list(opts[name]) if name in opts else list(entry["max"])
        for kind in ("min", "opt", "max"):
            if len(entry[kind]) != len(shape):
                raise OptionError(f"option '{kind}_shapes': input '{name}' has rank {len(shape)}, got {entry[kind]}")
            for axis, (d, fixed) in enumerate(zip(entry[kind], shape, strict=True)):
                if fixed >= 0 and d != fixed:
                    raise OptionError(f"option '{kind}_shapes': input '{name}' dim {axis} is fixed at {fixed}, got {d}")
        if not all(a <= b <= c for a, b, c in zip(entry["min"], entry["opt"], entry["max"], strict=True)):
            raise OptionError(f"input '{name}': profile needs min <= opt <= max, got {entry}")
        profile[name] = {k: entry[k] for k in ("min", "opt", "max")}
    return [profile] if profile else []


# ---- precision --------------------------------------------------------------------------------------------

def model_has_qdq(model_path: Path) -> bool:
    from .model import ModelArtifact

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
        from .errors import unknown_name

        raise OptionError(f"option 'layer_precisions': {unknown_name('layer', missing[0], layer_names)}")
    return dict(sorted(applied.items()))


def _apply_layer_precisions(module: ModuleType, network: trt.INetworkDefinition, wanted: dict[str, str]) -> dict[str, str]:
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


# ---- calibration (TensorRT <= 10 implicit INT8) --------------------------------------------------------------

def load_calibration_batches(data: Any, model_path: Path, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Full batches of `batch_size` from any trtkit data source (`trtkit.data.load_data`: .npz/.npy files,
    image folders, arrays); TensorRT calibrators need a constant batch size, so a remainder is dropped."""
    import numpy as np

    from .data import load_data

    source = load_data(data, model_path, batch_size=batch_size)
    batches = []
    for feeds in source.batches():
        if next(iter(feeds.values())).shape[0] != batch_size:
            continue
        batches.append({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in feeds.items()})
    if not batches:
        raise InputFileError(f"{data}: fewer samples than calibration_batch_size={batch_size}")
    return batches


def make_calibrator(module: ModuleType, kind: str, batches: list[dict[str, np.ndarray]], cache_path: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator feeding `batches` through cuda-python device buffers."""
    base = module.IInt8EntropyCalibrator2 if kind == "entropy" else module.IInt8MinMaxCalibrator

    class Calibrator(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.batches = batches
            self.index = 0
            self.device: dict[str, int] = {}

        def get_batch_size(self) -> int:
            first = next(iter(batches[0].values())) if batches else None
            return int(first.shape[0]) if first is not None else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            pointers = []
            for name in names:
                array = batch[name]
                if name not in self.device:
                    self.device[name] = cuda_malloc(array.nbytes)
                # Synchronous copy: TensorRT reads the buffer on its own stream right after get_batch returns.
                cudart = _cudart()
                _check(cudart.cudaMemcpy(self.device[name], array.ctypes.data, array.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "copy to device")
                pointers.append(self.device[name])
            return pointers

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                write_bytes(cache_path, bytes(cache))

        def free(self) -> None:
            for pointer in self.device.values():
                cuda_free(pointer)
            self.device.clear()

    return Calibrator()


# ---- cuda-python -----------------------------------------------------------------------------------------

def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError:
            raise BuildError("cuda-python is not installed (pip install cuda-python)") from None
    return cudart


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BuildError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else rest


def gpu_info() -> dict[str, Any] | str:
    """{'name', 'compute_capability', 'count'} of CUDA device 0, or the reason no GPU is usable."""
    try:
        cudart = _cudart()
    except BuildError as exc:
        return str(exc)
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # pragma: no cover - broken driver installs
        return f"CUDA is not usable ({type(exc).__name__}: {exc})"
    if int(err) != 0 or not count:
        return f"no CUDA GPU usable here ({getattr(err, 'name', err) if int(err) else 'no devices'})"
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return f"cannot query CUDA device 0 ({getattr(err, 'name', err)})"
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}", "count": int(count)}


def cuda_malloc(nbytes: int) -> int:
    return int(_check(_cudart().cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))


def cuda_free(pointer: int) -> None:
    _cudart().cudaFree(pointer)


def cuda_memcpy_htod(pointer: int, array: np.ndarray, stream: int = 0) -> None:
    cudart = _cudart()
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream), "copy to device")


def cuda_memcpy_dtoh(array: np.ndarray, pointer: int, stream: int = 0) -> None:
    cudart = _cudart()
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _check(cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream), "copy to host")


# ---- timing cache -------------------------------------------------------------------------------------------

def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None, where: str) -> tuple[Any, bool]:
    data = b""
    loaded = False
    if path is not None and path.is_file():
        data = path.read_bytes()
        loaded = True
    with _quiet_deprecations():
        try:
            cache = config.create_timing_cache(data)
        except Exception:
            cache = None
        if cache is None:
            raise InputFileError(f"{path}: not a timing cache {where} can read (delete it to start a new one)")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise InputFileError(f"{path}: timing cache was made by another TensorRT version or GPU; delete it")
    return cache, loaded


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> int:
    with _quiet_deprecations():
        cache = config.get_timing_cache()
        data = bytes(memoryview(cache.serialize())) if cache is not None else b""
    write_bytes(path, data)
    return len(data)


# ---- progress ---------------------------------------------------------------------------------------------

def make_progress_monitor(module: ModuleType, console: Any) -> Any:
    """An IProgressMonitor (TensorRT >= 10, RTX) drawing TensorRT's build phases as rich progress bars on
    `console`; None when the module has no progress monitor. Returns (monitor, progress) via attributes."""
    if not hasattr(module, "IProgressMonitor"):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                        transient=True)

    class ProgressMonitor(module.IProgressMonitor):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            module.IProgressMonitor.__init__(self)
            self.progress = progress
            self.tasks: dict[str, Any] = {}
            self.parents: dict[str, str | None] = {}
            self.phases: list[str] = []

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth, parent = 0, parent_phase
            while parent is not None and depth < 8:
                depth += 1
                parent = self.parents.get(parent)
            self.parents[phase_name] = parent_phase
            self.phases.append(phase_name)
            self.tasks[phase_name] = self.progress.add_task("  " * depth + phase_name, total=max(num_steps, 1))

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.tasks:
                self.progress.update(self.tasks[phase_name], completed=step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            task = self.tasks.pop(phase_name, None)
            if task is not None:
                self.progress.remove_task(task)

    return ProgressMonitor()


# ---- build --------------------------------------------------------------------------------------------------

def _dtype_name(module: ModuleType, dtype: Any) -> str:
    try:
        import numpy as np

        return str(np.dtype(module.nptype(dtype)))
    except Exception:
        return str(getattr(dtype, "name", dtype)).lower()


def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class BuildResult:
    engine: Path
    sidecar: Path
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_engine(builder_name: str, model: str | os.PathLike[str], output: str | os.PathLike[str],
                 options: Mapping[str, Any], progress_console: Any = None) -> BuildResult:
    """Build a serialized engine for `model` with TensorRT or TensorRT-RTX; write engine + JSON sidecar.

    progress_console: a rich Console for TensorRT's build-phase progress bars (default: trtkit's stderr
    console when it is a terminal, else none).
    """
    from .fileio import check_output_path, sha256_file

    module = import_trt(builder_name)
    model_path = _check_model_file(model)
    out = check_output_path(output, model_path)
    options = dict(options)
    qdq = model_has_qdq(model_path)
    flags = check_options(module, options, qdq)
    logger = make_logger(module)
    builder = module.Builder(logger)
    strongly = bool(options.get("strongly_typed")) or strongly_typed_only(module)
    network = _create_network(module, builder, bool(options.get("strongly_typed")))
    parse_onnx(module, builder, network, logger, model_path)

    config = builder.create_builder_config()
    if options.get("workspace_mb") is not None:
        if options["workspace_mb"] <= 0:
            raise OptionError("option 'workspace_mb' must be > 0")
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, int(options["workspace_mb"]) << 20)
    if options.get("optimization_level") is not None:
        level = int(options["optimization_level"])
        if not 0 <= level <= 5:
            raise OptionError(f"option 'optimization_level' must be 0..5, got {level}")
        config.builder_optimization_level = level
    for flag in flags:
        config.set_flag(getattr(module.BuilderFlag, flag))

    profiles = make_profiles(network, options)
    for entry in profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in entry.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)

    targets: list[str] = []
    if options.get("compute_capability"):
        targets = _set_compute_capabilities(module, config, options["compute_capability"])

    layer_precisions: dict[str, str] = {}
    if options.get("layer_precisions"):
        layer_precisions = _apply_layer_precisions(module, network, parse_layer_precisions(options["layer_precisions"]))
        config.set_flag(module.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    dla_core = options.get("dla_core")
    if dla_core is not None:
        available = int(builder.num_DLA_cores)
        if not 0 <= dla_core < available:
            raise OptionError(f"option 'dla_core={dla_core}': this device has {available} DLA core(s)"
                              + (" (DLA exists on Jetson Xavier/Orin only)" if available == 0 else ""))
        config.default_device_type = module.DeviceType.DLA
        config.DLA_core = int(dla_core)
        if options.get("gpu_fallback", True):
            config.set_flag(module.BuilderFlag.GPU_FALLBACK)

    calibrator = None
    notes: list[str] = []
    calibration: dict[str, Any] | None = None
    cache_path = Path(options["calibration_cache"]) if options.get("calibration_cache") else None
    if options.get("calibration_data"):
        batches = load_calibration_batches(options["calibration_data"], model_path,
                                           int(options.get("calibration_batch_size") or 8))
        calibrator = make_calibrator(module, options.get("calibrator") or "entropy", batches, cache_path)
        calibration = {"source": "data", "calibrator": options.get("calibrator"), "batches": len(batches)}
    elif cache_path is not None:
        if not cache_path.is_file():
            raise InputFileError(f"{cache_path}: no such calibration cache")
        kind, cache_version = calibrator_for_cache(cache_path)
        from .trtcache import version_number

        here = version_number(".".join(map(str, version_tuple(module))))
        if cache_version != here:
            notes.append(f"calibration cache {cache_path.name} was written for TensorRT {cache_version}, "
                         f"this is {here}: check the build log if TensorRT ignores it")
        calibrator = make_calibrator(module, kind, [], cache_path)
        calibration = {"source": "cache", "calibrator": kind, "cache_sha256": sha256_file(cache_path)}
    if calibrator is not None:
        config.int8_calibrator = calibrator
        if profiles:  # calibration runs at one shape: the calibration batch's (else the profile's opt)
            profile = builder.create_optimization_profile()
            first = calibrator.batches[0] if calibrator.batches else {}
            for name, shapes in profiles[0].items():
                shape = list(first[name].shape) if name in first else shapes["opt"]
                profile.set_shape(name, shape, shape, shape)
            config.set_calibration_profile(profile)

    timing_path = Path(options["timing_cache"]) if options.get("timing_cache") else None
    timing_loaded = False
    if timing_path is not None:
        _, timing_loaded = _load_timing_cache(config, timing_path, product(module))

    if progress_console is None:
        import sys

        from .ui import console as ui_console

        progress_console = ui_console if sys.stderr.isatty() else None
    monitor = make_progress_monitor(module, progress_console) if progress_console is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        if monitor is not None:
            with monitor.progress:
                serialized = builder.build_serialized_network(network, config)
        else:
            serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None and hasattr(calibrator, "free"):
            calibrator.free()
    if serialized is None:
        detail = "; ".join(" ".join(m.split()) for m in logger.errors()[-3:]) or "no reason given"
        raise BuildError(f"{model_path}: {product(module)} build failed: {detail}")
    data = bytes(memoryview(serialized))

    timing_bytes = _save_timing_cache(config, timing_path) if timing_path is not None else None
    if timing_path is not None and is_rtx(module):
        notes.append("TensorRT-RTX accepts a timing cache but does not use it (it compiles kernels at run time)")

    device = None if is_rtx(module) else gpu_info()
    info: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "builder": builder_name,
        "module": module.__name__,
        "tensorrt_version": version_string(module),
        "device": device if isinstance(device, dict) else None,
        "compute_capabilities": targets or (["all supported by " + product(module)] if is_rtx(module) else []),
        "precision": {
            "mode": options.get("precision") or "auto",
            "flags": flags,
            "strongly_typed": strongly,
            "qdq": qdq,
            "layer_precisions": layer_precisions,
            "calibration": calibration,
        },
        "dla_core": dla_core,
        "inputs": [_tensor_entry(module, network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [_tensor_entry(module, network.get_output(i)) for i in range(network.num_outputs)],
        "profiles": profiles,
        "source": {"file": model_path.name, "sha256": sha256_file(model_path)},
        "engine": {"file": out.name, "bytes": len(data), "sha256": sha256_bytes(data)},
        "timing_cache": None if timing_path is None else {"file": str(timing_path), "loaded": timing_loaded,
                                                           "bytes": timing_bytes},
        "trtkit_version": _trtkit_version(),
        "notes": notes,
    }
    sidecar = sidecar_path(out)
    # The sidecar goes first: an engine never appears without the facts needed to check it before loading.
    write_text(sidecar, json.dumps(info, indent=2, sort_keys=True) + "\n")
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return BuildResult(out, sidecar, info, notes + logger.warnings())


def _trtkit_version() -> str:
    from . import __version__

    return __version__


def _tensor_entry(module: ModuleType, tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": _dtype_name(module, tensor.dtype), "shape": _dims(tensor.shape)}


def _set_compute_capabilities(module: ModuleType, config: Any, wanted: list[str]) -> list[str]:
    members = {name.lower(): value for name, value in module.ComputeCapability.__members__.items()}
    chosen = []
    for item in wanted:
        key = item.strip().lower().replace(".", "")
        key = key if key.startswith("sm") or key in members else "sm" + key
        if key not in members or key == "none":
            from .errors import unknown_name

            choices = [m for m in members if m != "none"]
            raise OptionError(f"option 'compute_capability': {unknown_name('compute capability', item, choices)}")
        chosen.append(key)
    chosen = sorted(set(chosen))
    config.num_compute_capabilities = len(chosen)
    for index, key in enumerate(chosen):
        config.set_compute_capability(members[key], index)
    return chosen


CACHE_CALIBRATORS = {"EntropyCalibration2": "entropy", "MinMaxCalibration": "minmax"}


def calibrator_for_cache(path: Path) -> tuple[str, int]:
    """(calibrator kind, header version) for a TensorRT calibration cache.

    TensorRT only reads a cache whose header algorithm matches the calibrator class asking for it (an entropy
    calibrator ignores a MinMax cache and then has no data to calibrate with), so the cache decides the class.
    """
    from .trtcache import read_cache

    scales = read_cache(path)  # InputFileError naming the file and line for malformed caches
    options = getattr(scales, "options", {}) or {}
    algorithm = str(options.get("algorithm"))
    if algorithm not in CACHE_CALIBRATORS:
        raise InputFileError(f"{path}: calibration cache algorithm '{algorithm}' is not supported "
                             f"(use {' or '.join(CACHE_CALIBRATORS)})")
    return CACHE_CALIBRATORS[algorithm], int(options.get("trt_version") or 0)


# ---- loading and running -------------------------------------------------------------------------------------

def read_sidecar(engine: str | os.PathLike[str]) -> dict[str, Any]:
    engine = Path(engine)
    side = sidecar_path(engine)
    if not side.is_file():
        raise InputFileError(f"{engine}: no sidecar {side.name} (written by `trtkit build`); cannot check this "
                             "engine matches this TensorRT version and GPU, so it is not loaded")
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputFileError(f"{side}: corrupt engine sidecar (not JSON)") from None
    if not isinstance(info, dict) or info.get("format") != SIDECAR_FORMAT:
        raise InputFileError(f"{side}: not a trtkit engine sidecar (format {info.get('format') if isinstance(info, dict) else None!r})")
    return info


def check_engine_compatible(engine: Path, info: Mapping[str, Any], module: ModuleType,
                            gpu: dict[str, Any] | str) -> None:
    """One-line InputFileError when the engine was built for another TensorRT version or GPU."""
    built = str(info.get("tensorrt_version"))
    here = version_string(module)
    if tuple(re.findall(r"\d+", built)[:3]) != tuple(re.findall(r"\d+", here)[:3]):
        raise InputFileError(f"{engine}: built with {info.get('module')} {built}, this is {product(module)}; "
                             "engines do not transfer across TensorRT versions: rebuild it here")
    if isinstance(gpu, str):
        raise InputFileError(f"{engine}: cannot run a TensorRT engine here: {gpu}")
    built_device = info.get("device") or {}
    built_cc = built_device.get("compute_capability")
    if built_cc and built_cc != gpu["compute_capability"]:
        raise InputFileError(f"{engine}: built for {built_device.get('name', 'a GPU')} (compute capability {built_cc}), "
                             f"this GPU is {gpu['name']} ({gpu['compute_capability']}); rebuild it on this device")
    targets = [t for t in info.get("compute_capabilities") or [] if t.startswith("sm")]
    here_sm = "sm" + gpu["compute_capability"].replace(".", "")
    if targets and here_sm not in targets:
        raise InputFileError(f"{engine}: built for {', '.join(targets)}, this GPU is {gpu['name']} ({here_sm}); "
                             "rebuild with compute_capability including it")


class EngineRunner:
    """A deserialized TensorRT engine behind the Runner protocol; buffers and stream through cuda-python."""

    def __init__(self, path: str | os.PathLike[str], builder_name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(f"{self.path}: no such file")
        self.info = read_sidecar(self.path)
        name = builder_name or str(self.info.get("builder"))
        if builder_name is not None and self.info.get("builder") != builder_name:
            raise InputFileError(f"{self.path}: engine was built by '{self.info.get('builder')}', not '{builder_name}'")
        try:
            module = import_trt(name)
        except BuildError as exc:
            raise InputFileError(f"{self.path}: built with {self.info.get('module')} "
                                 f"{self.info.get('tensorrt_version')}, which is not usable here ({exc})") from None
        data = self.path.read_bytes()
        if sha256_bytes(data) != (self.info.get("engine") or {}).get("sha256"):
            raise InputFileError(f"{self.path}: engine does not match its sidecar (modified or truncated); rebuild it")
        check_engine_compatible(self.path, self.info, module, gpu_info())
        self.module = module
        self.logger = make_logger(module)
        self.runtime = module.Runtime(self.logger)
        if self.info.get("dla_core") is not None:
            self.runtime.DLA_core = int(self.info["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            detail = " ".join(" ".join(self.logger.errors()[-1:]).split()) or "no reason given"
            raise InputFileError(f"{self.path}: {product(module)} cannot deserialize this engine: {detail}")
        self.context = self.engine.create_execution_context()
        self.input_names = [t["name"] for t in self.info["inputs"]]
        self.output_names = [t["name"] for t in self.info["outputs"]]
        self.stream = int(_check(_cudart().cudaStreamCreate(), "cudaStreamCreate"))

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            from .errors import DataError

            raise DataError(f"{self.path}: missing input '{missing[0]}'")
        pointers: list[int] = []
        staged: list[Any] = []  # host copies stay alive until the stream is synchronized
        try:
            for spec in self.info["inputs"]:
                array = np.ascontiguousarray(feeds[spec["name"]], dtype=spec["dtype"])
                staged.append(array)
                if not self.context.set_input_shape(spec["name"], array.shape):
                    from .errors import DataError

                    raise DataError(f"{self.path}: input '{spec['name']}' shape {array.shape} is outside the engine's "
                                    f"profile {self.info.get('profiles')}")
                pointer = cuda_malloc(array.nbytes)
                pointers.append(pointer)
                cuda_memcpy_htod(pointer, array, self.stream)
                self.context.set_tensor_address(spec["name"], pointer)
            outputs: dict[str, Any] = {}
            for spec in self.info["outputs"]:
                shape = tuple(self.context.get_tensor_shape(spec["name"]))
                result = np.empty(shape, dtype=spec["dtype"])
                pointer = cuda_malloc(result.nbytes)
                pointers.append(pointer)
                self.context.set_tensor_address(spec["name"], pointer)
                outputs[spec["name"]] = (result, pointer)
            if not self.context.execute_async_v3(self.stream):
                raise BuildError(f"{self.path}: TensorRT execution failed")
            for result, pointer in outputs.values():
                cuda_memcpy_dtoh(result, pointer, self.stream)
            _check(_cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return {name: result for name, (result, _) in outputs.items()}
        finally:
            for pointer in pointers:
                cuda_free(pointer)


    def close(self) -> None:
        """Release the CUDA stream (device buffers are freed after every run)."""
        if getattr(self, "stream", None):
            _cudart().cudaStreamDestroy(self.stream)
            self.stream = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def load_engine(builder_name: str, path: str | os.PathLike[str], **_options: Any) -> EngineRunner:
    """Builder.load for engines: InputFileError unless this is an engine with a sidecar naming this builder."""
    path = Path(path)
    if path.suffix == ".onnx":
        raise InputFileError(f"{path}: an ONNX model, not a TensorRT engine")
    return EngineRunner(path, builder_name)
