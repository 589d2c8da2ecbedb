"""Quantization that checks itself: adaptive weight rounding by default, float fallback until a target holds.

    trtkit quantize MODEL --data D                      # calibrate, insert Q/DQ, adaptive rounding
    trtkit quantize MODEL --data D --target "sqnr>=20"  # ... then keep the fewest layers in float for 20 dB

At most twice `round_samples` + `check_samples` samples are read, and that many taken evenly spread. Every
result is measured against the FP32 model with Q/DQ emulated in float (what TensorRT computes). Each decision
is judged on the samples nothing was fitted to: a decision that fits nothing to the data (range blend, range
per tensor, recentring, float fallback) on all of them; adaptive rounding and the range search, which fit to
part of the data, on evenly spread samples held out from that fit (a quarter, at least `min_check_samples`,
at most `check_samples`). Judging on all samples gives a detection metric four times the positives (YOLOv8n,
96 zoo crops: 135 FP32 positives, against 41 in the 24 held out, where the default model measured 0.95 while
0.86 on all and 0.71 on the evaluation crops). Each decision is recorded (what, why, the metric before and
after) in the artefact's metadata["quantization"]["checked"]:

0. Smoothing (plugins/ptq/smooth.py) of LayerNorm outputs read by MatMuls and of depthwise Conv inputs, kept
   only if it measures better;
1. ranges: every clipped range moved toward its full observed range by one common step; per activation read
   by Conv/Gemm/MatMul, the range with the least error at those layers' outputs (plugins/qdq/range_search.py);
   then per tensor still clipped, the full observed range where it measures better;
2. adaptive rounding of every int8 weight (plugins/ptq/adaptive_round.py) and recentring of one-sided
   activations (plugins/ptq/recenter.py), each kept only if it measures better;
3. if a target is given and not met: the sensitivity of each activation quantizer (the metric with that one
   Q/DQ pair removed, everything else quantized), then the most sensitive layers go to float one at a time,
   measured each time, until the target holds or `max_float` layers are float;
4. the chosen layers are excluded from quantization and the model is quantized and rounded again; that model
   is kept unless the model of step 3 (their input quantizers removed, weights still int8) measures better by
   the refinement metric. A target that still fails names the layer that blocks it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.errors import OptionError

if TYPE_CHECKING:
    import numpy as np

    from trtkit.metrics import TaskMetric
    from trtkit.model import ModelArtifact

FEW_POSITIVES = 100  # below this many FP32 positives in the samples judged on, the report warns
BLEND_STEPS = (0.25, 0.5, 0.75, 1.0)  # exponents tried by _blend_ranges (1: every tensor's full range)
BUILTIN_METRICS = {"sqnr": ">=", "cosine": ">=", "agreement": ">="}  # higher is better
# Task-metric values the decisions may be judged by without being a --target (metric -> (kind, value key)).
JUDGE_ONLY = {"score_sqnr": ("positives", "score_sqnr_db")}
SET_METRICS = ("positive_iou", "anchor_iou")  # targets on thresholded sets, refined by their scores' SQNR
SET_IOU_METRICS = (*SET_METRICS, "map_iou")  # IoUs of thresholded sets: near 1 on easy samples
SATURATED_IOU = 0.999  # such an IoU at or above this on the samples judged on earns a note in the report
_SPEC = re.compile(r"^\s*(?:(?P<output>[^:<>=]+):)?\s*(?P<metric>[a-z_0-9]+)\s*(?P<op>>=|<=)\s*(?P<value>[-+0-9.eE]+)\s*$")


@dataclass(frozen=True, kw_only=True)
class Target:
    """`[OUTPUT:]METRIC>=VALUE` (or `<=` for error metrics such as box_mae)."""

    metric: str
    op: str
    value: float
    output: str | None = None
    text: str = ""

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value

    def better(self, a: float, b: float) -> bool:
        """a is strictly better than b."""
        return a > b if self.op == ">=" else a < b


def parse_target(spec: str, outputs: Sequence[str], task_metrics: Sequence[TaskMetric] = ()) -> Target:
    """Parse --target. Metrics: sqnr (dB, the worst output unless OUTPUT: is given), cosine, agreement (top-1
    agreement, 0..1) and the task metrics of `--task-metric` specs (positive_iou, box_mae, map_iou, ...)."""
    from trtkit.errors import close_matches
    from trtkit.metrics import TASK_GATES

    match = _SPEC.match(spec or "")
    if not match:
        raise OptionError(f"--target: expected [OUTPUT:]METRIC>=VALUE (e.g. 'sqnr>=20'), got {spec!r}")
    metric, op, output = match["metric"], match["op"], match["output"]
    known = {**BUILTIN_METRICS, **{name: ("<=" if name.endswith("mae") else ">=") for name in TASK_GATES}}
    if metric not in known:
        raise OptionError(f"--target: unknown metric '{metric}'{close_matches(metric, known)} "
                          f"(choices: {', '.join(sorted(known))})")
    if op != known[metric]:
        raise OptionError(f"--target: '{metric}' needs {known[metric]} (higher is better)" if known[metric] == ">="
                          else f"--target: '{metric}' needs <= (lower is better)")
    if output is not None and output.strip() not in outputs:
        raise OptionError(f"--target: the model has no output '{output.strip()}'{close_matches(output, outputs)}")
    if metric in TASK_GATES and not any(m.kind == TASK_GATES[metric][0] for m in task_metrics):
        raise OptionError(f"--target: '{metric}' needs a --task-metric of kind '{TASK_GATES[metric][0]}'")
    try:
        value = float(match["value"])
    except ValueError:
        raise OptionError(f"--target: '{match['value']}' is not a number") from None
    return Target(metric=metric, op=op, value=value, output=output.strip() if output else None, text=spec.strip())


def measure(target: Target, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
            task_metrics: Sequence[TaskMetric] = ()) -> float:
    """The target's metric of `candidate` outputs against `reference` outputs (all samples pooled)."""
    from trtkit.metrics import TASK_GATES, cosine, measure_task_metrics, sqnr_db, top1_agreement

    names = [target.output] if target.output else sorted(reference)
    if target.metric == "sqnr":
        return min(sqnr_db(reference[n], candidate[n]) for n in names)
    if target.metric == "cosine":
        return min(cosine(reference[n], candidate[n]) for n in names)
    if target.metric == "agreement":
        return min(float(top1_agreement(reference[n], candidate[n])["agreement"]) for n in names)
    kind, key = {**TASK_GATES, **JUDGE_ONLY}[target.metric]
    results = measure_task_metrics(task_metrics, reference, candidate)
    values = [float(entry[key]) for entry in results.get(kind, {}).values()]
    return min(values) if target.op == ">=" else max(values)


@dataclass(frozen=True)
class _Judge:
    """One metric on one set of samples: the FP32 outputs there, and a candidate model's score."""

    metric: Target
    arrays: Mapping[str, np.ndarray]
    reference: Mapping[str, np.ndarray]
    task_metrics: Sequence[TaskMetric] = ()

    @property
    def samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def score(self, model: Any) -> float:
        return measure(self.metric, self.reference, _run(model, self.arrays), self.task_metrics)


@dataclass
class Decision:
    action: str  # "smooth", "range-blend", "range-search", "range", "adaptive-round", "recenter", "float", "final"
    what: str
    why: str
    before: float | None
    after: float | None

    def as_dict(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None else round(float(x), 4)

        return {"action": self.action, "what": self.what, "why": self.why, "before": num(self.before),
                "after": num(self.after)}


@dataclass
class TargetReport:
    metric: str
    target: str | None
    measured: float | None = None
    met: bool | None = None
    check_samples: int = 0   # held out from adaptive rounding and the range search, which are judged there
    round_samples: int = 0
    samples: int = 0         # every sample: the other decisions and the target are judged on all of them
    refined_by: str = ""     # the metric of the refinement decisions (ranges, rounding, recentring)
    decisions: list[Decision] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    blocking: str | None = None
    notes: list[str] = field(default_factory=list)  # what limits how far the check can be trusted

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "target": self.target,
                "measured": None if self.measured is None else round(float(self.measured), 4), "met": self.met,
                "check_samples": self.check_samples, "round_samples": self.round_samples, "samples": self.samples,
                "refined_by": self.refined_by,
                "decisions": [d.as_dict() for d in self.decisions], "float_nodes": self.float_nodes,
                "blocking": self.blocking, "notes": self.notes}


def _split(data: Any, model: ModelArtifact, round_samples: int, check_samples: int,
           min_check_samples: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(rounding part, held-out check part) of the data, as arrays per input."""
    import numpy as np

    from trtkit.data import batch_len, load_data
    from trtkit.errors import DataError

    parts: list[dict[str, np.ndarray]] = []
    total = 0
    wanted = round_samples + check_samples
    # Read up to twice what is used and take evenly spread samples: files are often ordered by source.
    for feeds in load_data(data, model.model, batch_size=8, limit=2 * wanted).batches():
        parts.append(feeds)
        total += batch_len(feeds)
    if total < min_check_samples + 1:
        raise DataError(f"--data: {total} samples; quantization with a check needs at least {min_check_samples + 1}")
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    if total > wanted:
        keep = np.round(np.linspace(0, total - 1, wanted)).astype(int)
        arrays, total = {n: a[keep] for n, a in arrays.items()}, wanted
    held = max(min_check_samples, min(check_samples, total // 4))
    # Every k-th sample is held out, not the tail: data files are often ordered by source (one photo's crops,
    # then the next), and a tail would check on one source only.
    check_index = np.round(np.linspace(0, total - 1, held)).astype(int)
    fit_index = np.setdiff1d(np.arange(total), check_index)
    return ({n: a[fit_index] for n, a in arrays.items()}, {n: a[check_index] for n, a in arrays.items()})


def _run(model: ModelArtifact | Any, arrays: Mapping[str, np.ndarray], batch: int = 8) -> dict[str, np.ndarray]:
    import numpy as np

    from trtkit.model import as_artifact
    from trtkit.runtime import session

    sess = session(as_artifact(model))
    names = [o.name for o in sess.get_outputs()]
    total = len(next(iter(arrays.values())))
    fixed = sess.get_inputs()[0].shape[0]  # a model exported with a fixed batch runs in steps of that batch
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    runs = [sess.run(names, {k: v[i:i + step] for k, v in arrays.items()}) for i in range(0, total, step)]
    return {name: np.concatenate([r[k] for r in runs]) for k, name in enumerate(names)}


def _activation_quantizers(model: Any) -> list[tuple[str, list[str]]]:
    """(activation tensor, compute nodes reading its Q/DQ) for every activation quantizer of a QDQ model."""
    from trtkit.graph import GraphIndex

    from .placement import COMPUTE_OPS

    index = GraphIndex(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or index.is_constant(node.input[0]):
            continue
        readers = [r for dq in index.readers(node.output[0]) if dq.op_type == "DequantizeLinear"
                   for r in index.readers(dq.output[0])]
        layers = [r.name for r in readers if r.op_type in COMPUTE_OPS and r.name]
        if layers:
            found.append((node.input[0], layers))
    return found


def _without_quantizers(model: Any, tensors: Iterable[str]) -> Any:
    """A copy of the QDQ model whose activation Q/DQ pairs on `tensors` are removed (readers take the float)."""
    from trtkit.graph import GraphIndex

    result = copy.deepcopy(model)
    index = GraphIndex(result.graph)
    drop = set(tensors)
    removed = []
    for node in result.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in drop:
            for dq in index.readers(node.output[0]):
                index.rewire(dq.output[0], node.input[0])
                removed.append(dq)
            removed.append(node)
    for node in removed:
        result.graph.node.remove(node)
    return result


def _named(source: ModelArtifact, scales: Any) -> tuple[ModelArtifact, Any]:
    """(`source`, `scales`), or a copy of `source` whose unnamed nodes are named `OPTYPE_INDEX` (the placement's
    name for them) with the scales' model fingerprint moved to it: the float fallback excludes layers by name,
    so a model without node names (onnx.helper, some exporters) could otherwise keep no layer in float."""
    from trtkit.graph import unique_name
    from trtkit.scales import as_scales, model_fingerprint

    nodes = source.model.graph.node
    if all(node.name for node in nodes):
        return source, scales
    named = source.copy()
    taken = {node.name for node in nodes if node.name}
    for index, node in enumerate(named.model.graph.node):
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{index}", taken)
            taken.add(node.name)
    given = as_scales(scales)
    if given.model.get("sha256") == model_fingerprint(source.model):
        given = _rescaled(given, dict(given.items()), (), given.method, model=named)
    return named, given


def quantize_checked(
    model: ModelArtifact | str,
    scales: Any,
    data: Any,
    target: str | None = None,
    task_metrics: Sequence[str | Mapping[str, Any]] = (),
    exclude: Iterable[str] = (),
    adaptive_round: bool = True,
    round_samples: int = 64,
    check_samples: int = 32,
    min_check_samples: int = 4,
    max_float: int | None = None,
    quantize_options: Mapping[str, Any] | None = None,
    choose_ranges: bool = True,
    recenter: bool = True,
    smooth: bool = True,
    execution: Any = None,
) -> tuple[ModelArtifact, TargetReport]:
    """Quantize `model` with `scales`, refine with adaptive rounding on `data`, and (with `target`) keep the
    fewest layers in float until the target holds on `data`. Returns (QDQ artefact, report).

    task_metrics: task metric specs as `trtkit eval --task-metric` takes them (a target may name their metrics).
    max_float: most layers kept in float for the target (default: a quarter of the quantized layers).
    choose_ranges: choose each activation's range by measurement (a blend toward the full observed range, the
      least error at the reading layers, the full range), each kept where it measures better; False keeps the
      calibrator's ranges (for calibration data known to differ from deployment data).
    recenter: shift ReLU/ReLU6 activations between linear layers onto [-amax/2, amax/2] (plugins/ptq/recenter.py)
      where that measures better.
    smooth: move LayerNorm output and depthwise Conv input ranges into the weights reading them
      (plugins/ptq/smooth.py) where that measures better.
    """
    import numpy as np

    from trtkit.metrics import parse_task_metrics
    from trtkit.model import as_artifact
    from trtkit.plugins.ptq.adaptive_round import adaptive_round as round_weights
    from trtkit.plugins.ptq.recenter import recenter as recenter_activations
    from trtkit.runtime import output_specs
    from trtkit.ui import console, track

    from .insert import quantize

    if max_float is not None and max_float < 0:
        raise OptionError(f"--max-float must be >= 0, got {max_float}")
    source, scales = _named(as_artifact(model, "model"), scales)
    outputs = [spec.name for spec in output_specs(source.model)]
    metrics = parse_task_metrics(list(task_metrics), outputs) if task_metrics else []
    goal = parse_target(target, outputs, metrics) if target else None
    # A target on thresholded positives is checked on itself, but the refinements before it are judged by the
    # positives' score SQNR: an IoU that moves by whole positives decides them on noise (see _check_metric).
    metric = _check_metric(metrics) if goal is None or goal.metric in SET_METRICS else goal
    fit, check = _split(data, source, round_samples, check_samples, min_check_samples)
    every = {name: np.concatenate([fit[name], check[name]]) for name in fit}
    reference = _run(source, every)
    held_from = len(next(iter(fit.values())))  # outputs are batch-first (_run concatenates runs on axis 0)
    judge = _Judge(metric, every, reference, metrics)  # decisions that fit nothing to the data
    held = _Judge(metric, check, {name: value[held_from:] for name, value in reference.items()}, metrics)
    report = TargetReport(metric=(goal or metric).metric, target=goal.text if goal else None,
                          check_samples=held.samples, round_samples=held_from, samples=judge.samples,
                          refined_by=metric.metric)
    report.notes.extend(_support_notes(metrics, reference))
    options = dict(quantize_options or {})
    user_exclude = list(exclude)
    if smooth:
        source, scales = _smooth(source, scales, data, fit, held, user_exclude, options, report)
    if choose_ranges:
        scales, measured = _blend_ranges(source, scales, judge, user_exclude, options, report)
        scales, searched = _search_ranges(source, scales, held, fit, user_exclude, options, report)
        scales = _choose_ranges(source, scales, judge, user_exclude, options, report,
                                current=None if searched else measured)

    def build(float_nodes: list[str]) -> tuple[ModelArtifact, float]:
        nearest = quantize(source, scales, exclude=user_exclude + float_nodes, **options)
        # Rounding and recentring are judged together: what one is worth depends on the other (EfficientNet-Lite2,
        # 32 held-out calibration crops: adaptive rounding alone +0.0006 dB, and on top of recentring +2.3 dB; on
        # the evaluation crops 14.7 -> 21.5 dB with both). Each rounding gets its better recentring (judged on
        # all samples: it fits nothing), then the roundings are compared on the samples held out from the fit.
        # Recentring runs on the rounded model: shifting it is exact, while rounding a shifted model would need
        # the shift undone in each layer's float target (its bias holds s * sum of the int8 weights).
        variants, rounded_layers = {False: nearest}, 0
        if adaptive_round:
            variants[True], rounding = round_weights(nearest, source, fit, execution=execution)  # execution: Gram sums
            rounded_layers = len(rounding.layers)
        chosen: dict[bool, tuple[ModelArtifact, float, Decision | None]] = {}
        for rounded, candidate in variants.items():
            value, shift_decision = judge.score(candidate), None
            if recenter:
                shifted, shifts = recenter_activations(candidate)
                if shifts.shifted:
                    moved = judge.score(shifted)
                    keep = metric.better(moved, value)
                    shift_decision = Decision(
                        "recenter", f"{len(shifts.shifted)} ReLU/ReLU6 activations",
                        ("kept" if keep else "dropped") + ": shifted onto [-amax/2, amax/2] (exact; half the step)"
                        + ("" if keep else ", not better"), value, moved)
                    candidate, value = (shifted, moved) if keep else (candidate, value)
            chosen[rounded] = (candidate, value, shift_decision)
        rounded = False
        if adaptive_round:
            plain, fitted = held.score(chosen[False][0]), held.score(chosen[True][0])
            rounded = metric.better(fitted, plain)
            report.decisions.append(Decision(
                "adaptive-round", f"{rounded_layers} layers",
                ("kept" if rounded else "dropped") + f": judged on the {held.samples} samples held out from the "
                "fit" + ("" if rounded else ", not better there"), plain, fitted))
        model_chosen, value, shift_decision = chosen[rounded]
        if shift_decision is not None:
            report.decisions.append(shift_decision)
        return model_chosen, value

    # The float fallback and the verdict are judged by the target itself.
    verdict = judge if goal is None or goal is metric else _Judge(goal, every, reference, metrics)
    result, value = build([])
    value = verdict.score(result) if verdict is not judge else value
    report.measured = value
    if verdict.metric.metric in SET_IOU_METRICS and value >= SATURATED_IOU:
        report.notes.append(
            f"{verdict.metric.metric} measures {value:.4g} on these {judge.samples} samples: at that level they "
            "cannot tell decisions apart, and the verdict says little about other data (PP-OCR's text map: "
            "0.9999 on 48 zoo calibration crops, 0.88 on the evaluation crops); data with more borderline "
            "content judges better")
    if goal is None or goal.met(value):
        report.met = None if goal is None else True
        return _finish(result, report)

    # Sensitivity: the metric with one activation quantizer removed, all else quantized.
    quantizers = _activation_quantizers(result.model)
    limit = max_float if max_float is not None else max(1, len(quantizers) // 4)
    gains = []
    for tensor, layers in track(quantizers, description="quantizer sensitivity"):
        trial = verdict.score(_without_quantizers(result.model, [tensor]))
        gains.append((trial if goal.op == ">=" else -trial, tensor, layers))
    gains.sort(key=lambda g: (-g[0], g[1]))
    chosen_layers: list[str] = []
    tensors: list[str] = []
    current = value
    for _, tensor, layers in gains:
        if goal.met(current) or len(chosen_layers) >= limit:
            break
        trial = verdict.score(_without_quantizers(result.model, tensors + [tensor]))
        if not goal.better(trial, current):
            continue
        report.decisions.append(Decision("float", ", ".join(layers), f"input '{tensor}' is the most sensitive "
                                         "quantizer left", current, trial))
        tensors.append(tensor)
        chosen_layers.extend(n for n in layers if n not in chosen_layers)
        current = trial
    if chosen_layers:
        console.print(f"quantize: {len(chosen_layers)} layer(s) kept in float for {goal.text}; quantizing again")
        rebuilt, rebuilt_refined = build(chosen_layers)
        # The re-built model (those layers excluded, rounding and recentring decided again) is kept unless the
        # model of the fallback step (their input quantizers removed, weights still int8) measures better, by
        # the refinement metric: a thresholded-set target decides on noise (YOLOv8n, positive_iou>=0.9: on the
        # calibration crops 0.888 for the fallback step's model, 0.765 re-built). That alone does not pick the
        # model the evaluation crops prefer there: by score SQNR on the calibration crops the fallback step's
        # model wins too (15.4 against 12.9 dB), while on 96 evaluation crops the re-built one is better on
        # every measure (0.777 against 0.729 positive IoU, scores 14.2 against 11.7 dB).
        fallback = dataclasses.replace(result, model=_without_quantizers(result.model, tensors),
                                       metadata=copy.deepcopy(result.metadata))
        fallback_refined = judge.score(fallback)
        if metric.better(fallback_refined, rebuilt_refined):
            result, value = fallback, current
            why = (f"kept the model with their input quantizers removed (their weights stay int8): {metric.metric} "
                   f"{fallback_refined:.4g}, re-built without them {rebuilt_refined:.4g}")
        else:
            result = rebuilt
            value = verdict.score(rebuilt) if verdict is not judge else rebuilt_refined
            why = "re-quantized and re-rounded without them" + (
                "" if verdict is judge else f": {metric.metric} {rebuilt_refined:.4g}, {fallback_refined:.4g} "
                "with their input quantizers removed")
        report.decisions.append(Decision("final", f"{len(chosen_layers)} layers in float", why,
                                         report.measured, value))
    report.float_nodes = chosen_layers
    report.measured = value
    report.met = goal.met(value)
    if not report.met:
        left = [g for g in gains if g[1] not in tensors]
        report.blocking = (f"{', '.join(left[0][2])} (input '{left[0][1]}')" if left else
                           "no activation quantizer left to remove")
    return _finish(result, report)


def _check_metric(task_metrics: Sequence[TaskMetric]) -> Target:
    """What the decisions are judged by without a target: what the first task metric says matters (a detector's
    scores, not the box coordinates that dominate its output's SQNR), else the outputs' SQNR. For positives, the
    SQNR of their scores over every anchor rather than the IoU of the thresholded sets: the IoU moves by whole
    positives, so on calibration data with few objects it decides on noise (YOLOv8n, 96 zoo crops judged by
    positive IoU: 0.87 there, 0.70 on the evaluation crops)."""
    judged_by = {"positives": "score_sqnr", "map": "map_iou", "boxes": "box_iou"}
    name = next((judged_by[m.kind] for m in task_metrics if m.kind in judged_by), "sqnr")
    return Target(metric=name, op=">=", value=float("-inf"), text="")


def _full_ranges(given: Any) -> dict[str, float]:
    """Each scaled tensor's full observed range, max |x| from the calibration statistics the scales keep."""
    return {name: max(abs(float(st.get("min", 0.0))), abs(float(st.get("max", 0.0))))
            for name, st in given.stats.items() if name in given}


def _rescaled(given: Any, amax: Mapping[str, float], changed: Iterable[str], source_label: str,
              stats: Mapping[str, Any] | None = None, model: ModelArtifact | None = None) -> Any:
    """`given` Scales with the ranges `amax`; the tensors `changed` are recorded as coming from `source_label`.
    stats: the statistics to keep instead of `given`'s; model: the model they now belong to (its fingerprint
    replaces `given`'s, so quantizing that model does not warn of another graph)."""
    from trtkit.scales import Scales, model_fingerprint

    changed = set(changed)
    sources = {name: (source_label if name in changed else given.sources.get(name, given.method)) for name in amax}
    info = given.model if model is None else {**given.model, "sha256": model_fingerprint(model.model)}
    return Scales(dict(amax), method=given.method, options=given.options, model=info, data=given.data,
                  sources=sources, stats=given.stats if stats is None else stats)


def _smooth(source: ModelArtifact, scales: Any, data: Any, fit: Mapping[str, np.ndarray], held: _Judge,
            exclude: list[str], options: Mapping[str, Any], report: TargetReport) -> tuple[ModelArtifact, Any]:
    """The FP32 model with its LayerNorm outputs and depthwise Conv inputs smoothed (plugins/ptq/smooth.py,
    channel ranges from the `fit` samples) and those tensors calibrated again with the scales' own calibrator on
    `data`, where that measures better on the held-out samples. A residual Add's restored input gets the original output's range (same
    values). Returns (the FP32 model to quantize, its scales)."""
    from trtkit.calibration import calibrate, find_calibrator
    from trtkit.errors import UnknownNameError
    from trtkit.plugins.ptq.smooth import smooth
    from trtkit.scales import as_scales

    from .insert import quantize

    given = as_scales(scales)
    smoothed, smoothing = smooth(source, fit, verify=False)
    if not smoothing.layers:
        return source, scales
    try:
        find_calibrator(given.method)
    except UnknownNameError:
        report.notes.append(f"smoothing not tried: the scales come from '{given.method}', not a "
                            "calibrator that can measure the smoothed tensors")
        return source, scales
    fresh = calibrate(smoothed, data, method=given.method, options=given.options, tensors=smoothing.tensors,
                      progress=False)
    amax, stats = dict(given.items()), dict(given.stats)
    for layer in smoothing.layers:
        amax[layer["tensor"]], stats[layer["tensor"]] = fresh[layer["tensor"]], fresh.stats[layer["tensor"]]
        if layer["restored"] and layer["tensor"] in given:
            amax[layer["restored"]] = given[layer["tensor"]]
            stats[layer["restored"]] = given.stats.get(layer["tensor"], {})
    changed = [name for layer in smoothing.layers for name in (layer["tensor"], layer["restored"]) if name]
    candidate = _rescaled(given, amax, changed, "smooth", stats=stats, model=smoothed)
    before = held.score(quantize(source, given, exclude=exclude, **options))
    after = held.score(quantize(smoothed, candidate, exclude=exclude, strict_names=False, **options))
    keep = held.metric.better(after, before)
    report.decisions.append(Decision(
        "smooth", _smooth_subject(smoothing.layers),
        ("kept" if keep else "dropped") + ": channel ranges moved into the weights reading them (exact in "
        f"float); judged on the {held.samples} samples held out from the fit" + ("" if keep else ", not better"),
        before, after))
    return (smoothed, candidate) if keep else (source, scales)


def _smooth_subject(layers: list[dict[str, Any]]) -> str:
    """What the smoothing touched, by kind: '12 LayerNorm outputs', '14 depthwise Conv inputs'."""
    kinds = [layer["kind"] for layer in layers]
    parts = [f"{kinds.count(kind)} {label}" for kind, label in (("layernorm", "LayerNorm outputs"),
                                                                ("depthwise", "depthwise Conv inputs")) if kind in kinds]
    return ", ".join(parts)


def _blend_ranges(source: ModelArtifact, scales: Any, judge: _Judge, exclude: list[str],
                  options: Mapping[str, Any], report: TargetReport) -> tuple[Any, float]:
    """Every clipped range moved toward its tensor's full observed range by one common step,
    amax = calibrated^(1-a) * full^a for a in BLEND_STEPS, the step measuring best by `judge` kept
    (none unless strictly better). How much to clip is a property of the model as much as of each tensor: a
    detector's class scores live in the tails a percentile clips (YOLOX judged by positive IoU: a = 0.25,
    held-out 0.67 -> 0.86; 0.73 -> 0.88 on evaluation crops with the steps after it),
    a classifier's logits hardly care (EfficientNet-Lite2: +0.03 dB at a = 0.5); and one exponent for all tensors
    is a choice few samples can make reliably. Returns (the scales to use, their metric)."""
    from trtkit.scales import as_scales

    from .insert import quantize

    given = as_scales(scales)
    calibrated = dict(given.items())
    full = {name: max(value, calibrated[name]) for name, value in _full_ranges(given).items()}
    current = judge.score(quantize(source, given, exclude=exclude, **options))
    if all(full[name] <= 1.01 * calibrated[name] for name in full):
        return scales, current
    best: tuple[float, float, dict[str, float]] | None = None  # (metric, step, ranges)
    trials = []
    for step in BLEND_STEPS:
        amax = {**calibrated, **{name: calibrated[name] ** (1 - step) * full[name] ** step for name in full}}
        value = judge.score(quantize(source, amax, exclude=exclude, strict_names=False, **options))
        trials.append(f"{step:g}: {value:.4g}")
        if judge.metric.better(value, current if best is None else best[0]):
            best = (value, step, amax)
    if best is None:
        report.decisions.append(Decision("range-blend", "a = 0", "the calibrator's ranges measured best (a "
                                         + ", ".join(trials) + ")", current, current))
        return scales, current
    value, step, amax = best
    report.decisions.append(Decision("range-blend", f"a = {step:g}", "ranges calibrated^(1-a) * full^a measured "
                                     "best (a " + ", ".join(trials) + ")", current, value))
    changed = [name for name in full if full[name] > 1.01 * calibrated[name]]
    return _rescaled(given, amax, changed, f"blend {step:g}"), value


def _search_ranges(source: ModelArtifact, scales: Any, held: _Judge, fit: Mapping[str, np.ndarray],
                   exclude: list[str], options: Mapping[str, Any], report: TargetReport, samples: int = 16
                   ) -> tuple[Any, bool]:
    """Per activation read by Conv/Gemm/MatMul, the range with the least error at those layers' outputs
    (plugins/qdq/range_search.py, on up to `samples` of the `fit` samples); kept if the metric on the samples
    held out from them (`held`) improves. Returns (the scales to use, whether the search's ranges were kept)."""
    from trtkit.scales import as_scales

    from .insert import quantize
    from .range_search import search_ranges

    given = as_scales(scales)
    base = quantize(source, given, exclude=exclude, **options)
    readers = {tensor: layers for tensor, layers in _activation_quantizers(base.model)}
    subset = {name: array[:samples] for name, array in fit.items()}
    chosen = search_ranges(source, dict(given.items()), _full_ranges(given), readers, subset)
    if not chosen:
        return scales, False
    current = held.score(base)
    amax = {**dict(given.items()), **chosen}
    trial = held.score(quantize(source, amax, exclude=exclude, strict_names=False, **options))
    keep = held.metric.better(trial, current)
    report.decisions.append(Decision(
        "range-search", f"{len(chosen)} of {len(readers)} tensors",
        ("kept" if keep else "dropped") + ": ranges with the least error at their layers' outputs"
        + f" {'measured better' if keep else 'not better'} on the {held.samples} samples held out from the fit",
        current, trial))
    return (_rescaled(given, amax, chosen, "layer-error"), True) if keep else (scales, False)


def _choose_ranges(source: ModelArtifact, scales: Any, judge: _Judge, exclude: list[str],
                   options: Mapping[str, Any], report: TargetReport, current: float | None = None) -> Any:
    """Per activation tensor, the calibrator's (clipped) range or the full observed range (max |x|, recorded by
    calibration): each clipped tensor in turn is tried unclipped and kept so where `judge`'s metric improves.
    One calibrator is rarely right for every tensor (percentile clips detector score logits whose extremes are
    the detections; minmax wastes levels on outliers elsewhere). `current`: `judge`'s metric of `scales` when
    already measured. Returns the scales to use."""
    from trtkit.scales import as_scales

    from .insert import quantize

    given = as_scales(scales)
    full = _full_ranges(given)
    clipped = sorted(name for name, value in full.items() if value > 1.01 * given[name])
    if not clipped:
        return scales
    amax = dict(given.items())
    if current is None:
        current = judge.score(quantize(source, given, exclude=exclude, **options))
    kept = []
    for name in clipped:
        trial_amax = {**amax, name: full[name]}
        trial = judge.score(quantize(source, trial_amax, exclude=exclude, strict_names=False, **options))
        if judge.metric.better(trial, current):
            report.decisions.append(Decision("range", name, f"full range {full[name]:.4g} instead of the "
                                             f"calibrator's {given[name]:.4g}", current, trial))
            amax, current = trial_amax, trial
            kept.append(name)
    return _rescaled(given, amax, kept, "max") if kept else scales


def _support_notes(task_metrics: Sequence[TaskMetric], reference: Mapping[str, np.ndarray]) -> list[str]:
    """A note per detection metric whose samples hold few FP32 positives: the decisions are judged on them, and
    one positive more or less moves the IoU by about 1/count (YOLOv8n on zoo crops: 0.95 measured on 24
    calibration crops with 41 positives, 0.72 on evaluation crops)."""
    from trtkit.metrics import measure_task_metrics

    if not any(metric.kind == "positives" for metric in task_metrics):
        return []
    notes = []
    for name, entry in measure_task_metrics(task_metrics, reference, reference).get("positives", {}).items():
        count = int(entry["reference_positives"])
        if count < FEW_POSITIVES:
            notes.append(f"the samples hold {count} FP32 positives for '{name}': decisions on its IoU "
                         f"move by about {1 / max(count, 1):.2g} per positive; data with more objects judges "
                         "them better")
    return notes


def _finish(result: ModelArtifact, report: TargetReport) -> tuple[ModelArtifact, TargetReport]:
    result.metadata.setdefault("quantization", {})["checked"] = report.as_dict()
    return result, report


def print_report(report: TargetReport) -> None:
    """The decisions as a table on the console, then one line with the verdict."""
    from rich.table import Table

    from trtkit.ui import console

    refined = "" if report.refined_by in ("", report.metric) else f"; refinements by {report.refined_by}"
    table = Table(title=f"{report.metric} on {report.samples} samples (rounding and range search: on the "
                        f"{report.check_samples} held out from their fit{refined})")
    for column in ("decision", "what", "why", "before", "after"):
        table.add_column(column)
    for d in report.decisions:
        table.add_row(d.action, d.what, d.why, "" if d.before is None else f"{d.before:.4g}",
                      "" if d.after is None else f"{d.after:.4g}")
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.target is None:
        console.print(f"{report.metric} {report.measured:.4g} on {report.samples} samples")
        return
    verdict = "met" if report.met else f"NOT met (blocked by {report.blocking})"
    console.print(f"target {report.target}: {verdict}; measured {report.measured:.4g}; "
                  f"{len(report.float_nodes)} layer(s) in float")
