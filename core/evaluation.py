"""Python API of the eval stage: `trtkit.evaluate(name, models, **options)` and `write_report(path, context)`.

    import trtkit
    result = trtkit.evaluate("accuracy", ["model.onnx", "model.int8.onnx"], min_sqnr="20", labels="y.npy")
    result.passed, result.data["outputs"]["logits"]["sqnr_db"]

Helpers shared by the evaluator plugins live here too: data loading (`load_batches`), input compatibility
checks, tolerance specs (`parse_tolerance`). The report writer renders a documented `context` dict (see
`write_report`) into a self-contained HTML file plus a Markdown summary.
"""

from __future__ import annotations

import base64
import html
import io
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
    """Run the evaluator `name` (accuracy, speed, layers, report, jetson, or a plugin's) on `models`.

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
    """Write a self-contained HTML report at `path` and a Markdown summary next to it (same name, `.md`).

    Returns (html_path, markdown_path). Every key of `context` is optional; sections without data are left out:

    - "title": str.
    - "models": list of {"name": str, "path": str, "role": str}            (e.g. role "reference"/"candidate").
    - "graph": {label: stats} with stats as returned by `graph_stats(path)`: nodes, initializers, parameters,
      size_bytes, opset, ops {op_type: count}, inputs/outputs [{"name", "dtype", "shape"}].
    - "passes": list of str, or of {"name": str, "options": dict, "detail": str}.
    - "calibration": {"method": str, "num_samples": int, "scales": {tensor: scale}} (amax = 127 * scale).
    - "accuracy": the `data` of the accuracy evaluator: {"reference", "candidate", "mode", "num_samples",
      "outputs": {output: {"cosine", "sqnr_db", "max_abs", "mean_abs", "max_rel", "mean_rel", "p99_abs"...}},
      "task": {...}, "checks": [{"output", "metric", "limit", "value", "passed"}], "passed": bool}.
      A list of such dicts (one per candidate) is accepted too.
    - "speed": the `data` of the speed evaluator: {"models": [{"model", "latency": {"median_ms", "mean_ms",
      "p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "cov"}, "throughput_qps", "samples_per_s",
      "speedup", "mode", "unstable"}]}.
    - "layers": the `data` of the layers evaluator: {"tensors": [{"tensor", "node", "op", "sqnr_db",
      "cosine"}] in graph order, "sensitivity": [{"node", "sqnr_db"}], "search": {"exclude": [...], ...}}.
    - "histograms": {tensor: {"edges": [float] (len n+1), "counts": [int] (len n), "threshold": float,
      "method": str}} - activation |x| histograms with the chosen clipping threshold (amax).
    - "tables": extra tables, list of {"title": str, "columns": [str], "rows": [[cell]]}.
    - "notes": list of str.

    The output is deterministic (no timestamps; PNG metadata stripped).
    """
    from .fileio import write_text

    target = Path(path)
    markdown_path = target.with_suffix(".md") if target.suffix.lower() in (".html", ".htm") else Path(
        str(target) + ".md")
    sections = _report_sections(context)
    title = str(context.get("title") or "trtkit report")
    write_text(target, _render_html(title, sections))
    write_text(markdown_path, _render_markdown(title, sections))
    return target, markdown_path


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


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if value is None:
        return ""
    return str(value)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"kind": "table", "title": title, "columns": columns, "rows": [[_fmt(c) for c in row] for row in rows]}


def _image(title: str, png: bytes) -> dict[str, Any]:
    return {"kind": "image", "title": title, "png": png}


def _report_sections(context: Mapping[str, Any]) -> list[dict[str, Any]]:
    sections: list[dict[str, Any]] = []
    if context.get("models"):
        sections.append(_table("Models", ["name", "role", "path"],
                               [[m.get("name", ""), m.get("role", ""), m.get("path", "")] for m in context["models"]]))
    for label, stats in (context.get("graph") or {}).items():
        rows = [[key, stats.get(key)] for key in ("nodes", "initializers", "parameters", "size_bytes", "opset")
                if key in stats]
        rows += [[f"op {op}", count] for op, count in (stats.get("ops") or {}).items()]
        rows += [[f"input {t['name']}", f"{t.get('dtype', '')} {t.get('shape', '')}"] for t in stats.get("inputs", [])]
        rows += [[f"output {t['name']}", f"{t.get('dtype', '')} {t.get('shape', '')}"]
                 for t in stats.get("outputs", [])]
        sections.append(_table(f"Graph: {label}", ["property", "value"], rows))
    if context.get("passes"):
        rows = []
        for item in context["passes"]:
            if isinstance(item, Mapping):
                rows.append([item.get("name", ""), json.dumps(item.get("options", {}), sort_keys=True),
                             item.get("detail", "")])
            else:
                rows.append([str(item), "", ""])
        sections.append(_table("Passes applied", ["pass", "options", "detail"], rows))
    calibration = context.get("calibration")
    if calibration:
        head = [["method", calibration.get("method", "")], ["samples", calibration.get("num_samples", "")]]
        sections.append(_table("Calibration", ["property", "value"], head))
        scales = calibration.get("scales") or {}
        if scales:
            sections.append(_table("Calibration scales", ["tensor", "scale", "amax"],
                                   [[t, float(s), 127.0 * float(s)] for t, s in scales.items()]))
    accuracy = context.get("accuracy")
    for data in ([accuracy] if isinstance(accuracy, Mapping) else list(accuracy or [])):
        sections.extend(_accuracy_sections(data))
    if context.get("speed"):
        sections.extend(_speed_sections(context["speed"]))
    if context.get("layers"):
        sections.extend(_layer_sections(context["layers"]))
    if context.get("histograms"):
        sections.append(_image("Activation histograms with chosen thresholds", _histogram_png(context["histograms"])))
    for table in context.get("tables") or []:
        sections.append(_table(table.get("title", ""), list(table.get("columns", [])),
                               [list(r) for r in table.get("rows", [])]))
    if context.get("notes"):
        sections.append({"kind": "notes", "title": "Notes", "items": [str(n) for n in context["notes"]]})
    return sections


_ACCURACY_COLUMNS = ("cosine", "sqnr_db", "max_abs", "mean_abs", "max_rel", "p99_abs")


def _accuracy_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    title = f"Accuracy: {Path(str(data.get('candidate', 'candidate'))).name} vs " \
            f"{Path(str(data.get('reference', 'reference'))).name}"
    if data.get("mode"):
        title += f" ({data['mode']})"
    rows = [[name, *[metrics.get(c) for c in _ACCURACY_COLUMNS]] for name, metrics in (data.get("outputs") or {}).items()]
    sections = [_table(title, ["output", *_ACCURACY_COLUMNS], rows)]
    task = data.get("task") or {}
    if task:
        sections.append(_table("Task metrics", ["metric", "value"], [[k, v] for k, v in task.items()
                                                                     if not isinstance(v, (dict, list))]))
    checks = data.get("checks") or []
    if checks:
        sections.append(_table("Tolerance checks", ["output", "metric", "limit", "value", "result"],
                               [[c["output"], c["metric"], c["limit"], c["value"], "pass" if c["passed"] else "FAIL"]
                                for c in checks]))
    return sections


def _speed_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for item in data.get("models", []):
        lat = item.get("latency", {})
        rows.append([Path(str(item.get("model", ""))).name, item.get("mode", ""), lat.get("median_ms"),
                     lat.get("mean_ms"), lat.get("p90_ms"), lat.get("p99_ms"), lat.get("cov"),
                     item.get("throughput_qps"), item.get("speedup")])
    columns = ["model", "mode", "median ms", "mean ms", "p90 ms", "p99 ms", "CoV", "qps", "speedup"]
    sections = [_table("Speed", columns, rows)]
    if rows:
        sections.append(_image("Latency (median, with p90-p99 whiskers)", _speed_png(data)))
    return sections


def _layer_sections(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    sections = []
    tensors = data.get("tensors") or []
    if tensors:
        sections.append(_image("Per-layer error (SQNR dB, graph order)", _layers_png(tensors)))
        worst = sorted(tensors, key=lambda t: _sort_key(t.get("sqnr_db")))[:15]
        sections.append(_table("Worst tensors", ["tensor", "node", "op", "SQNR dB", "cosine"],
                               [[t["tensor"], t.get("node", ""), t.get("op", ""), t.get("sqnr_db"), t.get("cosine")]
                                for t in worst]))
    sensitivity = data.get("sensitivity") or []
    if sensitivity:
        sections.append(_table(f"Sensitivity ({data.get('sensitivity_mode', '')})", ["node", "op", "output SQNR dB"],
                               [[s["node"], s.get("op", ""), s.get("sqnr_db")] for s in sensitivity]))
    search = data.get("search") or {}
    if search:
        sections.append(_table("Mixed-precision search", ["property", "value"],
                               [[k, v] for k, v in search.items() if not isinstance(v, dict)]))
    return sections


def _sort_key(value: Any) -> float:
    return float("inf") if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    _figure().close(fig)
    return buffer.getvalue()


def _layers_png(tensors: list[Mapping[str, Any]]) -> bytes:
    plt = _figure()
    values = [min(_sort_key(t.get("sqnr_db")), 100.0) for t in tensors]
    labels = [str(t.get("node") or t["tensor"]) for t in tensors]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(values)), 3.6))
    colors = ["#c0392b" if v < 20 else "#e67e22" if v < 30 else "#27ae60" for v in values]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB, capped at 100)")
    ax.axhline(20, color="#888", lw=0.8, ls="--")
    fig.tight_layout()
    return _png(fig)


def _speed_png(data: Mapping[str, Any]) -> bytes:
    import numpy as np

    plt = _figure()
    items = data.get("models", [])
    names = [Path(str(i.get("model", ""))).name for i in items]
    median = np.array([i["latency"]["median_ms"] for i in items])
    p90 = np.array([i["latency"]["p90_ms"] for i in items])
    p99 = np.array([i["latency"]["p99_ms"] for i in items])
    fig, ax = plt.subplots(figsize=(6.0, 0.6 * len(items) + 1.2))
    y = np.arange(len(items))
    ax.barh(y, median, color="#2980b9")
    ax.errorbar(p90, y, xerr=[np.zeros_like(p90), p99 - p90], fmt="|", color="k")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("latency (ms)")
    fig.tight_layout()
    return _png(fig)


def _histogram_png(histograms: Mapping[str, Mapping[str, Any]]) -> bytes:
    import numpy as np

    plt = _figure()
    names = list(histograms)[:12]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        item = histograms[name]
        edges = np.asarray(item["edges"], dtype=float)
        counts = np.asarray(item["counts"], dtype=float)
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#7f8c8d")
        ax.set_yscale("log")
        if item.get("threshold") is not None:
            ax.axvline(float(item["threshold"]), color="#c0392b", lw=1.2,
                       label=f"{item.get('method', 'amax')} {float(item['threshold']):.3g}")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.6em}
h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:.85em;text-align:left}th{background:#f3f3f3}
td.FAIL{color:#b00;font-weight:bold}img{max-width:100%;border:1px solid #eee}"""


def _render_html(title: str, sections: list[dict[str, Any]]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section['title'])}</h2>")
        if section["kind"] == "table":
            parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in section["columns"])
                         + "</tr></thead><tbody>")
            for row in section["rows"]:
                cells = "".join(f"<td class=\"{'FAIL' if c == 'FAIL' else ''}\">{html.escape(c)}</td>" for c in row)
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</tbody></table>")
        elif section["kind"] == "image":
            data = base64.b64encode(section["png"]).decode("ascii")
            parts.append(f"<img alt=\"{html.escape(section['title'])}\" src=\"data:image/png;base64,{data}\">")
        else:
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in section["items"]) + "</ul>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _render_markdown(title: str, sections: list[dict[str, Any]]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section['title']}", ""]
        if section["kind"] == "table":
            lines.append("| " + " | ".join(section["columns"]) + " |")
            lines.append("|" + "|".join("---" for _ in section["columns"]) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in section["rows"]]
        elif section["kind"] == "image":
            lines.append("_(plot in the HTML report)_")
        else:
            lines += [f"- {item}" for item in section["items"]]
        lines.append("")
    return "\n".join(lines)


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
