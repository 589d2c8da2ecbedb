"""onnxruntime helpers shared by every stage: sessions, input specs, random inputs.

onnxruntime is imported lazily (it is slow to import and `trtkit --help` must answer fast).

QDQ models are run with Q/DQ emulated in float by default (`emulate_qdq=True`): that is what TensorRT
computes. onnxruntime's fused int8 CPU kernels saturate on x86 CPUs without VNNI and give wrong numbers;
they are used only when explicitly asked for (`emulate_qdq=False`), and reported as such.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputFileError, first_line

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime

    from .model import ModelArtifact

# An artefact whose in-memory (inline) tensors exceed this goes to onnxruntime through a temporary
# external-data copy rather than a serialized protobuf (see session()).
INLINE_SESSION_BYTES = 256 << 20

_ONNX_TO_NUMPY = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape of a graph input/output; symbolic dims are strings, unknown are None."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def concrete_shape(self, overrides: dict[str, int] | None = None, default: int = 1) -> tuple[int, ...]:
        """Shape with symbolic/unknown dims replaced (by `overrides[dim_name]`, else `default`)."""
        overrides = overrides or {}
        return tuple(
            d if isinstance(d, int) and d > 0 else overrides.get(d, default) if isinstance(d, str) else default
            for d in self.shape
        )


def value_specs(values: Any) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
        specs.append(TensorSpec(value.name, _ONNX_TO_NUMPY.get(tensor_type.elem_type, "float32"), tuple(shape)))
    return specs


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Real graph inputs (initializers listed as inputs, as old exporters do, are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    return value_specs(v for v in model.graph.input if v.name not in initializers)


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return value_specs(model.graph.output)


def random_inputs(
    model: onnx.ModelProto,
    seed: int = 0,
    low: float = -1.0,
    high: float = 1.0,
    dims: dict[str, int] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic random feeds for every input; `ranges[name]` overrides (low, high) per input."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        shape = spec.concrete_shape(dims)
        lo, hi = (ranges or {}).get(spec.name, (low, high))
        if spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) > 0.5
        elif spec.dtype.startswith(("int", "uint")):
            feeds[spec.name] = rng.integers(int(max(lo, 0)), int(max(hi, 1)) + 1, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
    return feeds


def session(
    model: str | os.PathLike[str] | onnx.ModelProto | ModelArtifact,
    emulate_qdq: bool = True,
    threads: int | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
    extra_outputs: list[str] | None = None,
) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU (by default), with Q/DQ emulated in float.

    model: a path, a ModelProto or a ModelArtifact (artefacts with external data are saved to a temporary
    folder first, since onnxruntime reads external data from disk).
    optimization: "disable", "basic", "extended" or "all".
    extra_outputs: intermediate tensors to expose as outputs (for per-layer debugging and calibration).
    """
    import onnxruntime as ort

    from .model import as_artifact

    options = session_options(emulate_qdq=emulate_qdq, threads=threads, optimization=optimization)
    providers = providers or ["CPUExecutionProvider"]

    if isinstance(model, (str, os.PathLike)) and not extra_outputs:
        path = Path(model)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        return _make_session(ort, str(path), options, providers, path)

    artifact = as_artifact(model)
    if extra_outputs:
        artifact = with_outputs(artifact, extra_outputs)
    # External weights are read by onnxruntime where they are (no copy, memory-mapped): the protobuf goes in
    # memory with the data folder named in the session config. Small external tensors are put inline first
    # (onnx shape inference inside onnxruntime cannot read shape tensors from external data).
    inline = _inline_bytes(artifact)
    if artifact.has_external_data() and artifact.base_dir is not None and inline <= INLINE_SESSION_BYTES:
        from .graph import editable

        model_bytes = editable(artifact).SerializeToString()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(artifact.base_dir).resolve()))
        return _make_session(ort, model_bytes, options, providers, artifact.source)
    # Much in memory (a big model, or a pass rewrote big weights): serialized, onnxruntime would hold it three
    # times over (and a protobuf cannot pass 2 GB). Such models are streamed into a temporary external-data
    # file, which onnxruntime maps.
    if artifact.has_external_data() or inline > INLINE_SESSION_BYTES:
        with tempfile.TemporaryDirectory(prefix="trtkit-") as folder:
            path = artifact.save(Path(folder) / "model.onnx", external_data=True)
            return _make_session(ort, str(path), options, providers, artifact.source)
    return _make_session(ort, artifact.model.SerializeToString(), options, providers, artifact.source)


def _inline_bytes(artifact: ModelArtifact) -> int:
    """Bytes of the tensors held inside the protobuf (external ones excluded)."""
    from onnx.external_data_helper import uses_external_data

    from .model import _all_tensors

    return sum(len(t.raw_data) or t.ByteSize() for t in _all_tensors(artifact.model) if not uses_external_data(t))


def session_options(emulate_qdq: bool = True, threads: int | None = None,
                    optimization: str = "all") -> onnxruntime.SessionOptions:
    """onnxruntime SessionOptions: optimization level ("disable", "basic", "extended", "all"), intra-op
    threads (None: trtkit.cpus.threads(), the CPUs this process may use or `--threads`; onnxruntime's own
    default counts the host's cores, ignoring taskset and container limits), and Q/DQ emulated in float
    unless `emulate_qdq=False`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if emulate_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    from .cpus import threads as default_threads

    options.intra_op_num_threads = threads or default_threads()
    options.log_severity_level = 3
    return options


def _make_session(ort: Any, model: Any, options: Any, providers: list[str], label: Any) -> Any:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:
        raise InputFileError(f"{label or 'model'}: onnxruntime cannot load it: {first_line(exc)}") from None


def with_outputs(artifact: ModelArtifact, names: list[str]) -> ModelArtifact:
    """A copy of the model whose graph also outputs the named intermediate tensors (type left to ORT)."""
    import onnx

    result = artifact.copy()
    existing = {o.name for o in result.model.graph.output}
    for name in names:
        if name not in existing:
            result.model.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return result


def run(sess: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session and return outputs by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
