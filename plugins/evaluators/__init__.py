"""Built-in evaluators: accuracy, speed, layers (per-layer debugging + mixed-precision search), report.

Only the option schemas live here; the work is in the submodules, imported when an evaluator runs (so
`trtkit --help` stays fast). Usage: `trtkit eval NAME MODELS... [--data D] [-O key=value] [--json]`, or
`trtkit.evaluate(NAME, [paths], **options)`. Documentation: docs/stages/evaluate.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtkit import hookimpl
from trtkit.stages import EvaluationResult, Evaluator, Option

_TOL = "[output:]value[,output:value...]; a bare value applies to every output"

DATA_OPTIONS = {
    "data": Option("path", None, "evaluation inputs (.npy, .npz by input name, image folder); random if absent"),
    "num_samples": Option("int", 0, "samples to use (0: all of --data, 64 random samples without data)"),
    "batch_size": Option("int", 8, "batch size for models with a dynamic batch axis"),
    "seed": Option("int", 0, "seed of the random inputs"),
}

# Where the models run (trtkit.engine): --workers / --ray-address of `trtkit eval`; results identical.
EXECUTION_OPTIONS = {
    "workers": Option("int", 1, "run on this many workers of the execution engine (Ray), each one CPU, on "
                      "shards of --data; 1: in this process"),
    "address": Option("str", None, "cluster address of the execution engine (Ray: `ray start --head` prints it)"),
}

ACCURACY_OPTIONS = {
    **DATA_OPTIONS,
    **EXECUTION_OPTIONS,
    "labels": Option("path", None, "integer class labels (.npy, one per sample) for top-k accuracy"),
    "scores": Option("str", None, "output holding class scores for task metrics (default: first 2-D output)"),
    "topk": Option("list", ["1", "5"], "k values for top-k accuracy"),
    "confidence": Option("float", 0.5, "reference top-1 probability above which a sample is 'confident'"),
    "runtime_kernels": Option("bool", False, "run QDQ candidates on onnxruntime's int8 kernels, not Q/DQ in float"),
    "metric": Option("str", None, "custom metric 'module:function'(reference, candidate, labels) -> dict"),
    "min_cosine": Option("str", None, f"minimum cosine similarity; {_TOL}"),
    "min_sqnr": Option("str", None, f"minimum SQNR in dB; {_TOL}"),
    "max_abs": Option("str", None, f"maximum absolute error; {_TOL}"),
    "max_mean_abs": Option("str", None, f"maximum mean absolute error; {_TOL}"),
    "max_rel": Option("str", None, f"maximum relative error; {_TOL}"),
    "min_agreement": Option("str", None, "minimum top-1 agreement with the reference (0..1)"),
    "min_confident_agreement": Option("str", None, "minimum top-1 agreement on the confident subset (0..1)"),
    "min_top1": Option("str", None, "minimum candidate top-1 accuracy (needs labels)"),
    "max_top1_drop": Option("str", None, "maximum top-1 accuracy drop vs the reference (needs labels)"),
    "scores_kind": Option("str", "auto", "what the scores output holds, for the confident subset: auto (from the "
                          "values and the remove-sigmoid record), logits, probabilities, sigmoid, sigmoid_logits",
                          choices=("auto", "logits", "probabilities", "sigmoid", "sigmoid_logits")),
    "task_metrics": Option("list", [], "task metrics 'KIND key=value ...' (positives, boxes, map), e.g. "
                           "'positives output=out axis=1 start=4 threshold=0.25'; see docs/stages/evaluate.md"),
    "min_positive_iou": Option("str", None, "minimum IoU of the positive sets of a positives task metric; "
                               "[name:]value[,name:value...]"),
    "min_anchor_iou": Option("str", None, "minimum IoU of the positive anchors of a positives task metric"),
    "min_box_iou": Option("str", None, "minimum mean box IoU on matched positives of a boxes task metric"),
    "max_box_mae": Option("str", None, "maximum mean absolute box error on matched positives (boxes task metric)"),
    "min_map_iou": Option("str", None, "minimum pixel IoU of a map task metric"),
    "min_map_sqnr": Option("str", None, "minimum SQNR (dB) of a map task metric (after its activation)"),
}

SPEED_OPTIONS = {
    "data": DATA_OPTIONS["data"],
    "batch_size": Option("int", 1, "batch size for models with a dynamic batch axis"),
    "warmup_ms": Option("float", 200.0, "warm-up time per model (ms)"),
    "duration_s": Option("float", 3.0, "measured time per model (s), unless iterations is given"),
    "iterations": Option("int", 0, "measured iterations per model (0: run for duration_s)"),
    "min_iterations": Option("int", 10, "at least this many measured iterations"),
    "threads": Option("int", 0, "intra-op threads for onnxruntime (0: its default)"),
    "runtime_kernels": Option("bool", True, "QDQ models on onnxruntime's int8 kernels (false: Q/DQ emulated)"),
    "max_cov": Option("float", 0.025, "warn when the latency coefficient of variation exceeds this"),
}

LAYERS_OPTIONS = {
    **DATA_OPTIONS,
    **EXECUTION_OPTIONS,
    "num_samples": Option("int", 0, "samples to use (0: all of --data, 32 random samples without data)"),
    "output": Option("str", None, "model output judged by sensitivity and search (default: the first)"),
    "sensitivity": Option("str", "single", "per-layer sensitivity: quantize one layer alone ('single'), "
                          "leave one layer in float ('leave-one-out') or 'none'",
                          choices=("single", "leave-one-out", "none")),
    "target_sqnr": Option("float", None, "mixed-precision search: output SQNR (dB) to reach"),
    "target_cosine": Option("float", None, "mixed-precision search: output cosine similarity to reach"),
    "top": Option("int", 10, "offenders shown in the summary"),
}

REPORT_OPTIONS = {
    **DATA_OPTIONS,
    "output": Option("path", None, "HTML report to write (a Markdown summary is written next to it)",
                     required=True),
    "labels": ACCURACY_OPTIONS["labels"],
    "context": Option("path", None, "JSON file with extra report context (passes, calibration, histograms...)"),
    "title": Option("str", None, "report title"),
    "speed": Option("bool", True, "include a speed comparison"),
    "duration_s": Option("float", 1.0, "measured time per model for the speed section"),
    "layers": Option("bool", True, "include per-layer error and activation histograms (QDQ candidates)"),
}


def _accuracy(models: list[str], **options: Any) -> EvaluationResult:
    from .accuracy import evaluate_accuracy

    return evaluate_accuracy(models, **options)


def _speed(models: list[str], **options: Any) -> EvaluationResult:
    from .speed import evaluate_speed

    return evaluate_speed(models, **options)


def _layers(models: list[str], **options: Any) -> EvaluationResult:
    from .layers import evaluate_layers

    return evaluate_layers(models, **options)


def _report(models: list[str], **options: Any) -> EvaluationResult:
    from .report import evaluate_report

    return evaluate_report(models, **options)


def _write_report(path: str | os.PathLike[str], context: Mapping[str, Any]) -> tuple[Path, Path]:
    from .render import write_report

    return write_report(path, context)


@hookimpl
def register_evaluators(register: Any) -> None:
    register(Evaluator(
        name="accuracy",
        description="Compare a candidate with a reference: cosine, SQNR, errors, top-k, gates (exit 3 on fail)",
        options=ACCURACY_OPTIONS, evaluate=_accuracy, report_section="accuracy"))
    register(Evaluator(
        name="speed",
        description="trtexec-style latency/throughput benchmark; several artefacts compared in one table",
        options=SPEED_OPTIONS, evaluate=_speed, compares="all", report_section="speed"))
    register(Evaluator(
        name="layers",
        description="Per-layer INT8 error by ONNX node name, sensitivity, mixed-precision --exclude search",
        options=LAYERS_OPTIONS, evaluate=_layers, report_section="layers"))
    register(Evaluator(
        name="report",
        description="Self-contained HTML report + Markdown summary (accuracy, speed, layers, histograms)",
        options=REPORT_OPTIONS, evaluate=_report, write_report=_write_report))
