"""Python API of the eval stage: `trtkit.evaluate(name, models, **options)` and `write_report(path, context)`.

    import trtkit
    result = trtkit.evaluate("accuracy", ["model.onnx", "model.int8.onnx"], min_sqnr="20", labels="y.npy")
    result.passed, result.data["outputs"]["logits"]["sqnr_db"]

Helpers shared by the evaluator plugins live here too: data loading (`load_batches`), input compatibility
checks, tolerance specs (`parse_tolerance`), and what a report shows (`graph_stats`, `activation_histograms`).
`write_report` hands a report context to the evaluator that renders reports (the `report` plugin's renderer).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, InputFileError, OptionError, unknown_name

if TYPE_CHECKING:
    import numpy as np

    from .stages import EvaluationResult, Runner

# Options whose values are tolerance specs "[output:]value[,output:value...]"; numbers and dicts given from
# Python are turned into that form before validation.
TOLERANCE_OPTIONS = ("min_cosine", "min_sqnr", "max_abs", "max_mean_abs", "max_rel", "min_agreement",
                     "min_confident_agreement", "min_top1", "max_top1_drop", "min_positive_iou", "min_anchor_iou",
                     "min_box_iou", "max_box_mae", "min_map_iou", "min_map_sqnr")


def evaluate(name: str, models: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
             **options: Any) -> EvaluationResult:
    """Run the registered evaluator `name` (`trtkit plugins` lists them) on `models`.

    models: artefact paths; for comparisons the first is the reference. options: the evaluator's options
    (see `trtkit eval NAME --help` / docs/stages/evaluate.md); tolerance options also accept numbers and
    {output: value} dicts. Returns an EvaluationResult (data, summary, passed). Raises TrtkitError for bad
    input; a failed tolerance is `passed=False`, not an exception.
    """
    from .registry import get_registry

    evaluator = get_registry().evaluator(name)
    paths = [str(models)] if isinstance(models, (str, os.PathLike)) else [str(m) for m in models]
    if not paths:
        raise OptionError(f"evaluator '{name}' needs at least one model")
    given = {key: _tolerance_text(value) if key in TOLERANCE_OPTIONS else value for key, value in options.items()}
    resolved = evaluator.resolve_options(given)
    return evaluator.evaluate(paths, **resolved)


def _tolerance_text(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, Mapping):
        return ",".join(f"{key}:{float(v)!r}" for key, v in value.items())
    return value


# ---- tolerances --------------------------------------------------------------------------------------------
def parse_tolerance(spec: str | None, outputs: Sequence[str], option: str) -> dict[str, float]:
    """'[name:]value[,name:value...]' -> {output: value}. A bare value applies to every output.

    Raises OptionError naming the option for malformed values and UnknownNameError for unknown outputs.
    """
    if spec is None or str(spec).strip() == "":
        return {}
    result: dict[str, float] = {}
    default: float | None = None
    for entry in str(spec).split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, text = entry.rpartition(":")
        try:
            value = float(text)
        except ValueError:
            raise OptionError(f"option '{option}': {entry!r} is not [output:]number") from None
        if math.isnan(value):
            raise OptionError(f"option '{option}': {entry!r} is NaN")
        if not sep:
            default = value
            continue
        if name not in outputs:
            error = unknown_name("output", name, outputs)
            raise type(error)(f"option '{option}': {error}")
        result[name] = value
    if default is not None:
        for output in outputs:
            result.setdefault(output, default)
    return result


# ---- models and data ---------------------------------------------------------------------------------------
def open_model(path: str, emulate_qdq: bool = True, threads: int | None = None) -> Runner:
    """A Runner for any artefact (ONNX on onnxruntime; engines through builder plugins)."""
    from .runners import open_runner

    options: dict[str, Any] = {"emulate_qdq": emulate_qdq}
    if threads:
        options["threads"] = threads
    return open_runner(path, **options)


def model_input_specs(path: str) -> list[Any] | None:
    """Input TensorSpecs of an ONNX file, or of another artefact from what its builder's `describe` reads
    (e.g. an engine's sidecar); None when unknown."""
    from .runtime import TensorSpec, input_specs

    if str(path).endswith(".onnx"):
        from .model import ModelArtifact

        return input_specs(ModelArtifact.load(path).model)
    try:
        from .building import describe

        info = describe(path)
        if not isinstance(info.get("inputs"), list):
            return None
        return [TensorSpec(str(t["name"]), str(t.get("dtype", "float32")),
                           tuple(d if isinstance(d, int) and d > 0 else None for d in t.get("shape", [])))
                for t in info["inputs"]]
    except Exception:
        return None


def model_inputs(path: str) -> dict[str, tuple[str, tuple[Any, ...]]] | None:
    """{input: (dtype, shape)} for an ONNX file or an artefact a builder describes, None for other artefacts."""
    specs = model_input_specs(path)
    return None if specs is None else {spec.name: (spec.dtype, spec.shape) for spec in specs}


def check_same_inputs(reference: str, ref_runner: Runner, candidate: str, cand_runner: Runner) -> None:
    """Refuse a reference/candidate pair that does not take the same inputs (names, dtypes, static dims)."""
    if set(ref_runner.input_names) != set(cand_runner.input_names):
        raise DataError(
            f"{candidate} takes inputs {sorted(cand_runner.input_names)} but the reference {reference} takes "
            f"{sorted(ref_runner.input_names)}"
        )
    ref_specs, cand_specs = model_inputs(reference), model_inputs(candidate)
    if ref_specs is None or cand_specs is None:
        return
    for name, (dtype, shape) in ref_specs.items():
        other_dtype, other_shape = cand_specs[name]
        static = [(a, b) for a, b in zip(shape, other_shape, strict=False) if isinstance(a, int) and isinstance(b, int)]
        if dtype != other_dtype or len(shape) != len(other_shape) or any(a != b for a, b in static):
            raise DataError(
                f"input '{name}': {candidate} expects {other_dtype}{list(other_shape)} but the reference "
                f"{reference} expects {dtype}{list(shape)}"
            )


def load_batches(data: str | None, model: str, num_samples: int = 64, batch_size: int = 8, seed: int = 0,
                 ) -> list[dict[str, np.ndarray]]:
    """Evaluation batches for `model` (an ONNX path): from `data` when given, else deterministic random.

    data: anything `trtkit.data.load_data` accepts (.npy for a single input, .npz keyed by input name, image
    folders). At most `num_samples` samples are used
    (0 = all of `data`).
    """
    import numpy as np

    if data is None:
        return _random_batches(model, num_samples or 64, batch_size, seed)
    path = Path(data)
    if not path.exists():
        raise InputFileError(f"{path}: no such file or folder (--data)")
    from .data import load_data

    specs = model_input_specs(model)
    source = load_data(str(path), specs if specs is not None else model, batch_size=max(1, batch_size),
                       limit=num_samples or None)
    batches = [{k: np.asarray(v) for k, v in batch.items()} for batch in source.batches()]
    # trtkit.data's `limit` can overrun by part of a batch (slices are not clamped to it): trim here.
    return _limit(batches, num_samples)


def _limit(batches: list[dict[str, np.ndarray]], num_samples: int) -> list[dict[str, np.ndarray]]:
    if not num_samples:
        return batches
    kept, count = [], 0
    for batch in batches:
        if count >= num_samples:
            break
        size = len(next(iter(batch.values())))
        take = min(size, num_samples - count)
        kept.append({k: v[:take] for k, v in batch.items()} if take < size else batch)
        count += take
    return kept


def _random_batches(model: str, num_samples: int, batch_size: int, seed: int) -> list[dict[str, np.ndarray]]:
    import numpy as np

    specs = model_inputs(model)
    if specs is None:
        raise OptionError(f"{model}: give --data (random inputs need the input shapes of an ONNX model or engine)")
    rng = np.random.default_rng(seed)
    batches = []
    remaining = num_samples
    while remaining > 0:
        batch: dict[str, np.ndarray] = {}
        count = 1
        for name, (dtype, shape) in specs.items():
            dims = list(shape)
            if dims:
                first = dims[0]
                count = first if isinstance(first, int) and first > 0 else min(batch_size, remaining)
            concrete = ([count] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]) if dims else []
            if dtype.startswith(("int", "uint")):
                batch[name] = rng.integers(0, 2, size=concrete).astype(dtype)
            elif dtype == "bool":
                batch[name] = rng.random(concrete) > 0.5
            else:
                batch[name] = rng.uniform(-1.0, 1.0, size=concrete).astype(dtype)
        remaining -= max(1, count)
        batches.append(batch)
    return batches


# ---- report ------------------------------------------------------------------------------------------------
def write_report(path: str | os.PathLike[str], context: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a self-contained HTML report at `path` and a Markdown summary next to it (same name, `.md`), with
    the installed evaluator that declares `write_report` (the built-in `report` evaluator; its renderer
    documents the `context` schema: trtkit.plugins.evaluators.render.write_report). Returns (html_path,
    markdown_path)."""
    from .registry import get_registry
    from .stages import Evaluator

    for evaluator in get_registry().stages["evaluators"].values():
        if isinstance(evaluator, Evaluator) and evaluator.write_report is not None:
            return evaluator.write_report(path, context)
    raise OptionError("no installed evaluator writes reports (declares write_report)")


def graph_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts for the report: nodes, ops histogram, parameters, size, opset, inputs/outputs, trtkit metadata."""
    import numpy as np
    from onnx.external_data_helper import uses_external_data

    from .model import ModelArtifact
    from .runtime import input_specs, output_specs

    artifact = ModelArtifact.load(path)
    model = artifact.model
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    parameters = sum(int(np.prod(t.dims)) if t.dims else 1 for t in model.graph.initializer)
    return {
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "parameters": parameters,
        "size_bytes": Path(path).stat().st_size + sum(
            int({e.key: e.value for e in t.external_data}.get("length", 0))
            for t in model.graph.initializer if uses_external_data(t)),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in input_specs(model)],
        "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in output_specs(model)],
        "metadata": artifact.metadata,
    }


# ---- running -----------------------------------------------------------------------------------------------
def run_batches(runner: Runner, batches: Sequence[Mapping[str, np.ndarray]], description: str = "running",
                ) -> dict[str, np.ndarray]:
    """Run every batch; outputs concatenated along axis 0 (per-sample outputs) by name."""
    import numpy as np

    from .ui import track

    collected: dict[str, list[np.ndarray]] = {}
    for batch in track(batches, total=len(batches), description=description):
        feeds = {name: batch[name] for name in runner.input_names if name in batch}
        missing = [name for name in runner.input_names if name not in batch]
        if missing:
            raise DataError(f"the data has no input '{missing[0]}' (inputs given: {sorted(batch)})")
        for name, value in runner.run(feeds).items():
            collected.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(parts, axis=0) if parts[0].ndim else parts[0] for name, parts in collected.items()}


def is_qdq(path: str) -> bool:
    """True for ONNX files holding QuantizeLinear/DequantizeLinear nodes."""
    if not str(path).endswith(".onnx"):
        return False
    from .model import ModelArtifact

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in ModelArtifact.load(path).model.graph.node)


def run_mode(path: str, emulate_qdq: bool) -> str:
    """How an artefact is run, as reported next to its numbers."""
    if not str(path).endswith(".onnx"):
        return "engine"
    if not is_qdq(path):
        return "onnxruntime float"
    return "Q/DQ emulated in float" if emulate_qdq else "onnxruntime int8 kernels"


def jsonable(value: Any) -> Any:
    """Data made strict-JSON safe: NaN -> null, +-inf -> "inf"/"-inf", numpy scalars/arrays -> Python."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(data: Any) -> str:
    return json.dumps(jsonable(data), indent=2, sort_keys=True)


def qdq_scales(path: str) -> dict[str, float]:
    """{activation tensor: scale} from the QuantizeLinear nodes of a QDQ model (per-tensor scales only)."""
    from .model import ModelArtifact

    artifact = ModelArtifact.load(path)
    inits = artifact.initializers()
    scales: dict[str, float] = {}
    for node in artifact.model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits and node.input[0] not in inits:
            value = artifact.tensor(node.input[1])
            if value.size == 1:
                scales.setdefault(node.input[0], float(value.reshape(-1)[0]))
    return scales


def activation_histograms(reference: str, candidate: str, data: str | None = None, num_samples: int = 0,
                          batch_size: int = 8, seed: int = 0, bins: int = 128, limit: int = 12) -> dict[str, Any]:
    """The report's "histograms": |x| histograms of the activations a QDQ candidate quantizes, measured on the
    FP32 reference over `data` (random inputs without it), each with its threshold amax = 127 * scale."""
    import numpy as np

    from .model import ModelArtifact
    from .runners import OrtRunner
    from .runtime import with_outputs

    scales = qdq_scales(candidate)
    ref = ModelArtifact.load(reference)
    produced = {o for n in ref.model.graph.node for o in n.output} | {i.name for i in ref.model.graph.input}
    names = [t for t in scales if t in produced][:limit]
    if not names:
        return {}
    batches = load_batches(data, reference, num_samples or (0 if data else 32), batch_size, seed)
    values = run_batches(OrtRunner(with_outputs(ref, names)), batches, "histograms")
    result = {}
    for name in names:
        magnitude = np.abs(values[name].astype(np.float64)).ravel()
        threshold = 127.0 * scales[name]
        top = max(float(magnitude.max()) if magnitude.size else 0.0, threshold) or 1.0
        counts, edges = np.histogram(magnitude, bins=bins, range=(0.0, top))
        result[name] = {"edges": edges.tolist(), "counts": counts.tolist(), "threshold": threshold,
                        "method": "amax"}
    return result
