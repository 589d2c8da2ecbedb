"""The `report` evaluator: measure a reference and its candidates and write the report (render.py).

models: [reference, candidates...]. Collects graph stats of every ONNX model, passes and calibration from the
candidates' trtkit metadata (or the scales of their QuantizeLinear nodes), accuracy of every candidate, a
speed table, per-tensor error of the first QDQ candidate and activation histograms of the quantized tensors
with their thresholds. A JSON `context` file adds to (and overrides) what is collected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtkit.errors import InputFileError, OptionError
from trtkit.evaluation import activation_histograms, graph_stats, is_qdq, qdq_scales
from trtkit.model import ModelArtifact
from trtkit.stages import EvaluationResult

from .render import write_report


def evaluate_report(models: list[str], data: str | None, num_samples: int, batch_size: int, seed: int,
                    output: str, labels: str | None, context: str | None, title: str | None, speed: bool,
                    duration_s: float, layers: bool) -> EvaluationResult:
    extra = _read_context(context)
    reference = models[0]
    ctx: dict[str, Any] = {
        "title": title or f"trtkit report: {Path(reference).name}",
        "models": [{"name": Path(m).name, "path": str(m), "role": "reference" if i == 0 else "candidate"}
                   for i, m in enumerate(models)],
        "graph": {Path(m).name: _stats(m) for m in models if str(m).endswith(".onnx")},
    }
    for key in ("graph",):
        for stats in ctx[key].values():
            stats.pop("metadata", None)
    qdq = [m for m in models[1:] if is_qdq(m)]
    if qdq:
        metadata = ModelArtifact.load(qdq[0]).metadata
        if metadata.get("passes"):
            ctx["passes"] = metadata["passes"]
        ctx["calibration"] = _calibration(qdq[0], metadata)
        checked = (metadata.get("quantization") or {}).get("checked")
        if checked:  # `quantize --data/--target`: what was decided, why, and what it measured
            ctx["quantization_checked"] = checked
    passed = True
    if len(models) >= 2:
        from .accuracy import evaluate_accuracy

        accuracy = evaluate_accuracy(models, data=data, num_samples=num_samples, batch_size=batch_size, seed=seed,
                                     labels=labels, scores=None, topk=["1", "5"], confidence=0.5,
                                     runtime_kernels=False, metric=None)
        ctx["accuracy"] = accuracy.data.get("candidates", accuracy.data)
        passed = accuracy.passed
    if speed:
        from .speed import evaluate_speed

        ctx["speed"] = evaluate_speed(models, data=data, batch_size=1, warmup_ms=100.0, duration_s=duration_s,
                                      iterations=0, min_iterations=10, threads=0, runtime_kernels=True,
                                      max_cov=0.025).data
    if layers and qdq and str(reference).endswith(".onnx"):
        from .layers import evaluate_layers

        ctx["layers"] = evaluate_layers([reference, qdq[0]], data=data, num_samples=num_samples,
                                        batch_size=batch_size, seed=seed, output=None, sensitivity="none",
                                        target_sqnr=None, target_cosine=None, top=10).data
        ctx["histograms"] = activation_histograms(reference, qdq[0], data, num_samples, batch_size, seed)
    ctx.update(extra)
    html_path, md_path = write_report(output, ctx)
    summary = f"report written: {html_path} (Markdown summary: {md_path})"
    return EvaluationResult(data={"html": str(html_path), "markdown": str(md_path),
                                  "sections": sorted(k for k in ctx if ctx[k])}, summary=summary, passed=passed)


def _read_context(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"{file}: no such file (report context)")
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise OptionError(f"{file}: the report context must be a JSON object")
    return value


def _stats(path: str) -> dict[str, Any]:
    return graph_stats(path)


def _calibration(path: str, metadata: dict[str, Any]) -> dict[str, Any]:
    found = metadata.get("calibration")
    given: dict[str, Any] = found if isinstance(found, dict) else {}
    result: dict[str, Any] = {"method": given.get("method", "read from the QDQ model's scales"),
              "num_samples": given.get("num_samples", "")}
    result["scales"] = given.get("scales") or qdq_scales(path)
    return result
