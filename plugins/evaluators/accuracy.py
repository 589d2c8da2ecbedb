"""The `accuracy` evaluator: a candidate against a reference on the same inputs, with tolerance gates.

Besides the per-output tensor metrics and top-1 agreement, task metrics on named outputs (`task_metrics`,
`trtkit.metrics.parse_task_metric` syntax): positive-set IoU of detection scores, box error on matched
positives, mask / probability-map IoU and SQNR; each can be gated (min_positive_iou, max_box_mae, ...).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from trtkit import metrics
from trtkit.errors import DataError, InputFileError, OptionError, unknown_name
from trtkit.evaluation import (
    check_same_inputs,
    load_batches,
    open_model,
    parse_tolerance,
    run_batches,
    run_mode,
)
from trtkit.model import ModelArtifact
from trtkit.stages import EvaluationResult

from .shards import execution, sharded_outputs

# option -> (where the value is, metric key, direction)
_OUTPUT_GATES = {
    "min_cosine": ("cosine", ">="),
    "min_sqnr": ("sqnr_db", ">="),
    "max_abs": ("max_abs", "<="),
    "max_mean_abs": ("mean_abs", "<="),
    "max_rel": ("max_rel", "<="),
}
_TASK_GATES = {
    "min_agreement": ("agreement", ">="),
    "min_confident_agreement": ("confident_agreement", ">="),
    "min_top1": ("candidate_top1", ">="),
    "max_top1_drop": ("top1_drop", "<="),
}
# option -> (metric key in metrics.TASK_GATES, direction); the gate's names are task metric names.
_TASK_METRIC_GATES = {
    "min_positive_iou": ("positive_iou", ">="),
    "min_anchor_iou": ("anchor_iou", ">="),
    "min_box_iou": ("box_iou", ">="),
    "max_box_mae": ("box_mae", "<="),
    "min_map_iou": ("map_iou", ">="),
    "min_map_sqnr": ("map_sqnr", ">="),
}


def evaluate_accuracy(models: list[str], data: str | None, num_samples: int, batch_size: int, seed: int,
                      labels: str | None, scores: str | None, topk: list[Any], confidence: float,
                      runtime_kernels: bool, metric: str | None, task_metrics: list[Any] | None = None,
                      scores_kind: str = "auto", workers: int = 1, address: str | None = None,
                      **tolerances: str | None) -> EvaluationResult:
    if len(models) < 2:
        raise OptionError("accuracy needs a reference and at least one candidate: REFERENCE CANDIDATE...")
    ks = _ks(topk)
    reference = models[0]
    ref_runner = open_model(reference, emulate_qdq=True)
    tasks = metrics.parse_task_metrics(task_metrics, ref_runner.output_names)
    _task_gate_limits(tasks, tolerances)  # a malformed gate fails before any model runs
    ref_records = _logit_records(reference)
    run_on = execution(workers, address, data)
    if run_on.in_process:
        batches = load_batches(data, reference, num_samples or (0 if data else 64), batch_size, seed)
        if not batches:
            raise DataError(f"{data}: no samples")
        ref_out = run_batches(ref_runner, batches, "reference")
        n = _sample_count(batches)
    else:  # every model on the workers, shard by shard: the same outputs (trtkit.plugins.evaluators.shards)
        assert data is not None  # execution() refuses workers without data
        on_workers, n = sharded_outputs([(reference, True)] + [(c, not runtime_kernels) for c in models[1:]],
                                        data, num_samples, batch_size, run_on)
        ref_out = on_workers[0]
    label_array = _labels(labels, n, num_samples)
    results = []
    for position, candidate in enumerate(models[1:], start=1):
        emulate = not runtime_kernels
        cand_runner = open_model(candidate, emulate_qdq=emulate)
        check_same_inputs(reference, ref_runner, candidate, cand_runner)
        missing = [name for name in ref_runner.output_names if name not in cand_runner.output_names]
        if missing:
            raise DataError(f"{candidate} has no output '{missing[0]}' (the reference {reference} has it)")
        cand_out = (run_batches(cand_runner, batches, Path(candidate).name) if run_on.in_process
                    else on_workers[position])
        result = _compare(reference, candidate, ref_runner.output_names, ref_out, cand_out, label_array,
                          scores, scores_kind, ks, confidence, metric, tasks, ref_records, tolerances,
                          run_mode(candidate, emulate), n)
        results.append(result)
    passed = all(r["passed"] for r in results)
    data_out: dict[str, Any] = results[0] if len(results) == 1 else {"candidates": results, "passed": passed}
    return EvaluationResult(data=data_out, summary="\n".join(_summary(r) for r in results), passed=passed)


def _ks(topk: list[Any]) -> list[int]:
    try:
        ks = sorted({int(k) for k in topk})
    except (TypeError, ValueError):
        raise OptionError(f"option 'topk': expected integers, got {topk!r}") from None
    if any(k < 1 for k in ks):
        raise OptionError(f"option 'topk': k must be >= 1, got {ks}")
    return ks


def _sample_count(batches: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(b.values()))) for b in batches)


def _labels(path: str | None, n: int, num_samples: int) -> np.ndarray | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise InputFileError(f"{path}: no such file (labels)")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputFileError(f"{path}: not a .npy label file ({type(exc).__name__})") from None
    array = np.asarray(array).reshape(-1)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers, got {array.dtype}")
    if len(array) < n or (not num_samples and len(array) != n):
        raise DataError(f"{path}: {len(array)} labels for {n} evaluated samples")
    return array[:n].astype(np.int64)


def _scores_output(names: list[str], outputs: dict[str, np.ndarray], scores: str | None) -> str | None:
    if scores is not None:
        if scores not in names:
            raise unknown_name("output", scores, names)
        return scores
    for name in names:
        if outputs[name].ndim == 2 and outputs[name].shape[1] > 1:
            return name
    return None


def _logit_records(path: str) -> dict[str, Any]:
    """The remove-sigmoid record of an ONNX artefact ({output: which channels are logits}); {} otherwise."""
    if not str(path).endswith(".onnx"):
        return {}
    record = ModelArtifact.load(path).metadata.get("sigmoid_removed")
    outputs = record.get("outputs") if isinstance(record, dict) else None
    return outputs if isinstance(outputs, dict) else {}


def _scores_kind(requested: str, ref_records: dict[str, Any], score_name: str, ref_scores: np.ndarray) -> str:
    """What the class scores are: as requested, else logits of a removed Sigmoid when the reference's record
    says so, else from the values (metrics.score_kind)."""
    if requested != "auto":
        return requested
    if score_name in ref_records:
        return "sigmoid_logits"
    return metrics.score_kind(ref_scores)


def _compare(reference: str, candidate: str, names: list[str], ref_out: dict[str, np.ndarray],
             cand_out: dict[str, np.ndarray], labels: np.ndarray | None, scores: str | None, scores_kind: str,
             ks: list[int], confidence: float, metric: str | None, tasks: list[metrics.TaskMetric],
             ref_records: dict[str, Any], tolerances: dict[str, str | None], mode: str, n: int) -> dict[str, Any]:
    outputs: dict[str, dict[str, float]] = {}
    for name in names:
        if ref_out[name].shape != cand_out[name].shape:
            raise DataError(f"output '{name}': candidate shape {cand_out[name].shape} != reference "
                            f"{ref_out[name].shape}")
        outputs[name] = metrics.compare(ref_out[name], cand_out[name])
    task: dict[str, Any] = {}
    score_name = _scores_output(names, ref_out, scores)
    if score_name is not None:
        ref_scores, cand_scores = ref_out[score_name], cand_out[score_name]
        task["scores_output"] = score_name
        kind = _scores_kind(scores_kind, ref_records, score_name, ref_scores)
        task.update(metrics.top1_agreement(ref_scores, cand_scores, confidence, kind))
        task["confidence_threshold"] = confidence
        if labels is not None:
            for k in ks:
                task[f"reference_top{k}"] = metrics.topk_accuracy(ref_scores, labels, k)
                task[f"candidate_top{k}"] = metrics.topk_accuracy(cand_scores, labels, k)
            if 1 in ks:
                task["top1_drop"] = task["reference_top1"] - task["candidate_top1"]
            else:
                task["top1_drop"] = (metrics.topk_accuracy(ref_scores, labels, 1)
                                     - metrics.topk_accuracy(cand_scores, labels, 1))
                task["candidate_top1"] = metrics.topk_accuracy(cand_scores, labels, 1)
    if metric:
        task["custom"] = _custom_metric(metric, ref_out, cand_out, labels)
    task_results = metrics.measure_task_metrics(tasks, ref_out, cand_out, ref_records,
                                                _logit_records(candidate)) if tasks else {}
    checks = _checks(names, outputs, task, score_name, labels is not None, tolerances)
    checks += _task_metric_checks(tasks, task_results, tolerances)
    result = {
        "reference": reference, "candidate": candidate, "mode": mode, "num_samples": n,
        "outputs": outputs, "task": task, "checks": checks, "passed": all(c["passed"] for c in checks),
    }
    if task_results:
        result["task_metrics"] = task_results
    return result


def _custom_metric(spec: str, ref_out: dict[str, np.ndarray], cand_out: dict[str, np.ndarray],
                   labels: np.ndarray | None) -> dict[str, float]:
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise OptionError(f"option 'metric': expected 'module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise OptionError(f"option 'metric': cannot load {spec!r} ({type(exc).__name__}: {exc})") from None
    result = function(ref_out, cand_out, labels)
    if not isinstance(result, dict):
        raise OptionError(f"option 'metric': {spec} returned {type(result).__name__}, expected a dict")
    return {str(k): float(v) for k, v in result.items()}


def _checks(names: list[str], outputs: dict[str, dict[str, float]], task: dict[str, Any], score_name: str | None,
            have_labels: bool, tolerances: dict[str, str | None]) -> list[dict[str, Any]]:
    checks = []
    for option, (key, direction) in _OUTPUT_GATES.items():
        for output, limit in parse_tolerance(tolerances.get(option), names, option).items():
            checks.append(_check(output, key, direction, limit, outputs[output][key]))
    for option, (key, direction) in _TASK_GATES.items():
        spec = tolerances.get(option)
        if spec is None or str(spec).strip() == "":
            continue
        if score_name is None:
            raise OptionError(f"option '{option}' needs a class-score output: none is 2-D, name one with scores=")
        if key in ("candidate_top1", "top1_drop") and not have_labels:
            raise OptionError(f"option '{option}' needs labels (-O labels=labels.npy)")
        for output, limit in parse_tolerance(spec, [score_name], option).items():
            checks.append(_check(output, key, direction, limit, task[key]))
    return checks


def _task_gate_limits(tasks: list[metrics.TaskMetric], tolerances: dict[str, str | None],
                      ) -> list[tuple[str, str, str, dict[str, float]]]:
    """(kind, value key, direction, {metric name: limit}) per task-metric gate given; '[name:]value[,...]'
    over the names of the metrics of the gate's kind."""
    gates = []
    for option, (stem, direction) in _TASK_METRIC_GATES.items():
        spec = tolerances.get(option)
        if spec is None or str(spec).strip() == "":
            continue
        kind, key = metrics.TASK_GATES[stem]
        names = [m.name for m in tasks if m.kind == kind]
        if not names:
            raise OptionError(f"option '{option}' needs a {kind} task metric "
                              f"(--task-metric / -O task_metrics='{kind} output=NAME ...')")
        gates.append((kind, key, direction, parse_tolerance(spec, names, option)))
    return gates


def _task_metric_checks(tasks: list[metrics.TaskMetric], task_results: dict[str, dict[str, dict[str, Any]]],
                        tolerances: dict[str, str | None]) -> list[dict[str, Any]]:
    return [_check(name, key, direction, limit, task_results[kind][name][key])
            for kind, key, direction, limits in _task_gate_limits(tasks, tolerances)
            for name, limit in limits.items()]


def _check(output: str, key: str, direction: str, limit: float, value: float) -> dict[str, Any]:
    passed = False if math.isnan(value) else value >= limit if direction == ">=" else value <= limit
    return {"output": output, "metric": key, "op": direction, "limit": limit, "value": value, "passed": passed}


def _summary(result: dict[str, Any]) -> str:
    lines = [f"{Path(result['candidate']).name} vs {Path(result['reference']).name} "
             f"({result['mode']}, {result['num_samples']} samples)"]
    for name, m in result["outputs"].items():
        lines.append(f"  {name}: cosine {m['cosine']:.6f}  SQNR {m['sqnr_db']:.2f} dB  max|err| {m['max_abs']:.4g}"
                     f"  mean|err| {m['mean_abs']:.4g}  p99|err| {m['p99_abs']:.4g}")
    task = result["task"]
    if "agreement" in task:
        lines.append(f"  top-1 agreement {task['agreement']:.4f}; on confident subset "
                     f"({task['confident_fraction']:.0%} of samples) {task['confident_agreement']:.4f}")
    for key in sorted(k for k in task if k.startswith(("reference_top", "candidate_top"))):
        lines.append(f"  {key} {task[key]:.4f}")
    lines += task_metric_lines(result.get("task_metrics") or {}, "  ")
    for check in result["checks"]:
        state = "pass" if check["passed"] else "FAIL"
        lines.append(f"  [{state}] {check['output']} {check['metric']} {check['value']:.6g} {check['op']} "
                     f"{check['limit']:g}")
    return "\n".join(lines)


def task_metric_lines(task_results: dict[str, dict[str, dict[str, Any]]], indent: str = "") -> list[str]:
    """One human line per task metric (the CLI's and the summary's)."""
    lines = []
    for name, m in task_results.get("positives", {}).items():
        lines.append(f"{indent}positives {name}: IoU {m['positive_iou']:.4f} (anchors {m['anchor_iou']:.4f}), "
                     f"scores {m['score_sqnr_db']:.2f} dB; "
                     f"{m['reference_positives']:.0f} reference vs {m['candidate_positives']:.0f} candidate "
                     f"positives > {m['settings']['threshold']:g} ({_applied(m['activation'])})")
    for name, m in task_results.get("boxes", {}).items():
        lines.append(f"{indent}boxes {name}: mean IoU {m['box_iou']:.4f}, MAE {m['box_mae']:.4g}, SQNR "
                     f"{m['box_sqnr_db']:.2f} dB on {m['matched']:.0f} anchors positive in both")
    for name, m in task_results.get("map", {}).items():
        lines.append(f"{indent}map {name}: IoU {m['map_iou']:.4f} at > {m['settings']['threshold']:g}, SQNR "
                     f"{m['map_sqnr_db']:.2f} dB ({_applied(m['activation'])})")
    return lines


def _applied(activation: dict[str, str]) -> str:
    """'sigmoid applied' / 'used as probabilities', per model when they differ."""
    words = {"sigmoid": "sigmoid applied", "none": "used as probabilities"}
    ref, cand = words[activation["reference"]], words[activation["candidate"]]
    return ref if ref == cand else f"reference {ref}, candidate {cand}"
