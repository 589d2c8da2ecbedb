"""Vectorised numpy metrics for comparing a candidate's outputs with a reference's.

Every function takes arrays of any shape (flattened where it matters) and returns plain Python floats or
dicts of floats, so results go straight into JSON. No per-element Python loops.

- `cosine(ref, cand)`: cosine similarity of the flattened tensors (1.0 = same direction).
- `sqnr_db(ref, cand)`: signal-to-quantization-noise ratio, 10*log10(sum(ref^2) / sum((ref-cand)^2)) in dB;
  +inf when the tensors are identical.
- `error_stats(ref, cand)`: max/mean absolute and relative error and absolute-error percentiles.
- `topk_accuracy(scores, labels, k)`: fraction of rows whose label is among the k highest scores.
- `top1_agreement(ref_scores, cand_scores, confidence, kind)`: fraction of rows with the same argmax, overall and
  on the subset where the reference's top-1 probability exceeds `confidence`; `score_kind(scores)` tells
  logits (softmax), probabilities (rows sum to 1) and sigmoid scores apart so that probability is right.

Task metrics (detection scores, boxes, probability maps), also usable on their own:

- `positive_iou(ref, got, threshold)` / `map_iou(ref, got, threshold)`: IoU (Jaccard) of the element sets
  above `threshold`, e.g. the FP32 positive anchors vs the INT8 ones, or the pixels of a text map.
- `box_iou(ref_boxes, got_boxes, format)`, `box_error(ref_boxes, got_boxes, mask, format)`: paired-box IoU and
  the error of boxes on matched positives ("cxcywh" or "xyxy", coordinates on the last axis).
- `TaskMetric` / `parse_task_metrics(specs, outputs)` / `measure_task_metrics(metrics, ref_outputs,
  cand_outputs)`: the same on named model outputs, with channel slices of concatenated outputs (YOLOv8
  [N, 4+C, anchors], YOLOX [N, anchors, 5+C]) and logits told apart from probabilities; the spec syntax
  `KIND key=value ...` (see `parse_task_metric`) is what `trtkit eval accuracy --task-metric` takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import DataError, OptionError, unknown_name

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_TINY = np.finfo(np.float64).tiny


def _pair(ref: Any, cand: Any) -> tuple[np.ndarray, np.ndarray]:
    ref_array = np.asarray(ref, dtype=np.float64)
    cand_array = np.asarray(cand, dtype=np.float64)
    if ref_array.shape != cand_array.shape:
        raise ValueError(f"shapes differ: reference {ref_array.shape} vs candidate {cand_array.shape}")
    return ref_array, cand_array


def cosine(ref: Any, cand: Any) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zeros, 0.0 when only one is."""
    a, b = _pair(ref, cand)
    a, b = a.ravel(), b.ravel()
    na, nb = float(np.sqrt(np.dot(a, a))), float(np.sqrt(np.dot(b, b)))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def sqnr_db(ref: Any, cand: Any) -> float:
    """10*log10(signal power / noise power) in dB, noise = cand - ref. +inf for identical tensors."""
    a, b = _pair(ref, cand)
    noise = float(np.sum(np.square(b - a)))
    signal = float(np.sum(np.square(a)))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def error_stats(ref: Any, cand: Any, percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, float]:
    """max_abs, mean_abs, max_rel, mean_rel and p<q>_abs for q in `percentiles`.

    Relative error is |cand - ref| / |ref| over the elements where ref != 0 (0.0 if there are none).
    """
    a, b = _pair(ref, cand)
    diff = np.abs(b - a).ravel()
    magnitude = np.abs(a).ravel()
    stats: dict[str, float] = {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
    }
    nonzero = magnitude > 0
    rel = diff[nonzero] / magnitude[nonzero]
    stats["max_rel"] = float(rel.max()) if rel.size else 0.0
    stats["mean_rel"] = float(rel.mean()) if rel.size else 0.0
    if diff.size:
        values = np.percentile(diff, percentiles)
        for q, value in zip(percentiles, values, strict=True):
            stats[f"p{q:g}_abs"] = float(value)
    return stats


def compare(ref: Any, cand: Any) -> dict[str, float]:
    """All tensor metrics at once: cosine, sqnr_db and error_stats."""
    return {"cosine": cosine(ref, cand), "sqnr_db": sqnr_db(ref, cand), **error_stats(ref, cand)}


def _rows(scores: Any) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim < 2:
        raise ValueError(f"class scores need shape [N, classes], got {array.shape}")
    return array.reshape(array.shape[0], -1)


def softmax(scores: Any) -> np.ndarray:
    """Row-wise softmax of [N, classes] scores (numerically stable)."""
    rows = _rows(scores)
    shifted = rows - rows.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def probabilities(scores: Any) -> np.ndarray:
    """Scores as probabilities: rows already in [0, 1] summing to 1 are kept, anything else is softmaxed."""
    rows = _rows(scores)
    if rows.size and rows.min() >= 0.0 and rows.max() <= 1.0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
        return rows
    return softmax(rows)


def topk_accuracy(scores: Any, labels: Any, k: int = 1) -> float:
    """Fraction of rows whose integer label is among the k highest scores."""
    rows = _rows(scores)
    target = np.asarray(labels).reshape(-1).astype(np.int64)
    if target.shape[0] != rows.shape[0]:
        raise ValueError(f"{target.shape[0]} labels for {rows.shape[0]} score rows")
    if rows.shape[0] == 0:
        return 0.0
    k = max(1, min(int(k), rows.shape[1]))
    label_scores = np.take_along_axis(rows, target[:, None], axis=1)
    # Rank = number of classes scoring strictly higher than the label (ties count in the label's favour).
    rank = np.sum(rows > label_scores, axis=1)
    return float(np.mean(rank < k))


SCORE_KINDS = ("logits", "probabilities", "sigmoid", "sigmoid_logits")


def score_kind(scores: Any) -> str:
    """What class scores are, from their values: "probabilities" (rows in [0, 1] summing to 1, a softmax),
    "sigmoid" (in [0, 1] but not summing to 1: independent sigmoid scores) or "logits" (anything else).

    Logits of a removed Sigmoid look like softmax logits; only a remove-sigmoid record (or the user) can say
    "sigmoid_logits".
    """
    rows = _rows(scores)
    if rows.size == 0 or rows.min() < 0.0 or rows.max() > 1.0:
        return "logits"
    return "probabilities" if np.allclose(rows.sum(axis=1), 1.0, atol=1e-3) else "sigmoid"


def class_probabilities(scores: Any, kind: str) -> np.ndarray:
    """[N, classes] scores of `kind` (see SCORE_KINDS) as per-class probabilities."""
    rows = _rows(scores)
    if kind == "logits":
        return softmax(rows)
    if kind == "sigmoid_logits":
        return sigmoid(rows)
    if kind in ("probabilities", "sigmoid"):
        return rows
    raise ValueError(f"score kind must be one of {', '.join(SCORE_KINDS)}, got {kind!r}")


def top1_agreement(ref_scores: Any, cand_scores: Any, confidence: float = 0.5,
                   kind: str | None = None) -> dict[str, Any]:
    """Argmax agreement overall and on the reference-confident subset.

    Returns {"agreement", "confident_agreement", "confident_fraction", "confident_count", "scores_kind"}; on
    the confident subset (reference top-1 probability > confidence) argmax flips mean real damage, not noise.
    The top-1 probability follows `kind` (SCORE_KINDS; None: `score_kind` of the reference): softmax of
    logits, the probabilities themselves, the sigmoid scores, or the sigmoid of removed-sigmoid logits.
    confident_agreement is NaN when no row is confident.
    """
    ref_rows, cand_rows = _rows(ref_scores), _rows(cand_scores)
    if ref_rows.shape != cand_rows.shape:
        raise ValueError(f"shapes differ: reference {ref_rows.shape} vs candidate {cand_rows.shape}")
    kind = kind or score_kind(ref_rows)
    if ref_rows.shape[0] == 0:
        return {"agreement": float("nan"), "confident_agreement": float("nan"), "confident_fraction": 0.0,
                "confident_count": 0.0, "scores_kind": kind}
    same = ref_rows.argmax(axis=1) == cand_rows.argmax(axis=1)
    confident = class_probabilities(ref_rows, kind).max(axis=1) > confidence
    count = int(confident.sum())
    return {
        "agreement": float(same.mean()),
        "confident_agreement": float(same[confident].mean()) if count else float("nan"),
        "confident_fraction": float(count / ref_rows.shape[0]),
        "confident_count": float(count),
        "scores_kind": kind,
    }


def latency_stats(seconds: Any) -> dict[str, float]:
    """Latency statistics in milliseconds from per-iteration durations in seconds (trtexec's set) + CoV."""
    ms = np.asarray(seconds, dtype=np.float64).ravel() * 1000.0
    if ms.size == 0:
        raise ValueError("no latency samples")
    p90, p95, p99 = np.percentile(ms, (90, 95, 99))
    mean = float(ms.mean())
    return {
        "min_ms": float(ms.min()), "max_ms": float(ms.max()), "mean_ms": mean, "median_ms": float(np.median(ms)),
        "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
        "std_ms": float(ms.std()), "cov": float(ms.std() / mean) if mean > 0 else 0.0,
    }


# ---- task metrics: detection scores, boxes, probability maps ------------------------------------------------
def sigmoid(values: Any) -> np.ndarray:
    """Logistic function, overflow-free for any magnitude."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))


def jaccard(ref_mask: Any, got_mask: Any) -> float:
    """|A & B| / |A | B| of two boolean masks; 1.0 when both are empty (the sets are equal)."""
    a, b = np.asarray(ref_mask, dtype=bool), np.asarray(got_mask, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: reference {a.shape} vs candidate {b.shape}")
    union = int(np.count_nonzero(a | b))
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def positive_iou(ref: Any, got: Any, threshold: float = 0.25) -> float:
    """IoU of the positive sets {ref > threshold} and {got > threshold}, element by element (scores already
    probabilities: apply `sigmoid` to logits first). 1.0 when neither has a positive."""
    a, b = _pair(ref, got)
    return jaccard(a > threshold, b > threshold)


def map_iou(ref: Any, got: Any, threshold: float = 0.5) -> float:
    """Pixel IoU of a mask / probability map thresholded at `threshold` (same definition as positive_iou)."""
    return positive_iou(ref, got, threshold)


BOX_FORMATS = ("cxcywh", "xyxy")


def _corners(boxes: np.ndarray, box_format: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes need 4 coordinates on the last axis, got shape {boxes.shape}")
    a, b, c, d = np.moveaxis(boxes, -1, 0)
    if box_format == "xyxy":
        return a, b, c, d
    if box_format == "cxcywh":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    raise ValueError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")


def box_iou(ref_boxes: Any, got_boxes: Any, box_format: str = "cxcywh") -> np.ndarray:
    """IoU of paired boxes [..., 4] -> [...]. Negative widths count as empty; two empty boxes have IoU 1 when
    identical, else 0."""
    a, b = _pair(ref_boxes, got_boxes)
    ax1, ay1, ax2, ay2 = _corners(a, box_format)
    bx1, by1, bx2, by2 = _corners(b, box_format)
    inter = (np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
             * np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None))
    area_a = np.clip(ax2 - ax1, 0, None) * np.clip(ay2 - ay1, 0, None)
    area_b = np.clip(bx2 - bx1, 0, None) * np.clip(by2 - by1, 0, None)
    union = area_a + area_b - inter
    identical = np.all(a == b, axis=-1).astype(np.float64)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), identical)


def box_error(ref_boxes: Any, got_boxes: Any, mask: Any = None, box_format: str = "cxcywh") -> dict[str, float]:
    """Error of boxes [..., 4] on the matched positives `mask` [...] (None: every box).

    Returns {"box_mae": mean |got - ref| over matched coordinates, "box_iou": mean IoU of matched box pairs,
    "box_sqnr_db": SQNR of the matched boxes, "matched": how many}; the means are NaN when nothing matched.
    """
    a, b = _pair(ref_boxes, got_boxes)
    if a.shape[-1:] != (4,):
        raise ValueError(f"boxes need 4 coordinates on the last axis, got shape {a.shape}")
    keep = np.ones(a.shape[:-1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if keep.shape != a.shape[:-1]:
        raise ValueError(f"mask shape {keep.shape} does not match boxes {a.shape[:-1]}")
    matched = int(np.count_nonzero(keep))
    if not matched:
        return {"box_mae": float("nan"), "box_iou": float("nan"), "box_sqnr_db": float("nan"), "matched": 0.0}
    ref_kept, got_kept = a[keep], b[keep]
    return {
        "box_mae": float(np.mean(np.abs(got_kept - ref_kept))),
        "box_iou": float(np.mean(box_iou(ref_kept, got_kept, box_format))),
        "box_sqnr_db": sqnr_db(ref_kept, got_kept),
        "matched": float(matched),
    }


def channel_slice(array: Any, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """array[..., start:stop, ...] along `axis`, with that axis moved last: [N, 4+C, A] with axis=1, start=4
    gives the class scores as [N, A, C]. Raises ValueError for an axis or range outside the shape."""
    values = np.asarray(array)
    if not -values.ndim <= axis < values.ndim:
        raise ValueError(f"axis {axis} is outside an output of shape {values.shape}")
    axis %= values.ndim
    size = values.shape[axis]
    end = size if stop is None else stop
    if not 0 <= start < end <= size:
        raise ValueError(f"channels {start}:{end} are outside axis {axis} of size {size} (shape {values.shape})")
    return np.moveaxis(np.take(values, np.arange(start, end), axis=axis), axis, -1)


# ---- task metric specs ---------------------------------------------------------------------------------------
TASK_KINDS = ("positives", "boxes", "map")
ACTIVATIONS = ("auto", "sigmoid", "none")
_KEYS = {
    "positives": ("output", "name", "axis", "start", "stop", "threshold", "activation", "objectness"),
    "boxes": ("output", "name", "axis", "start", "stop", "format", "positives"),
    "map": ("output", "name", "axis", "start", "stop", "threshold", "activation"),
}
_INT_KEYS = ("axis", "start", "stop", "objectness")
_DEFAULT_THRESHOLD = {"positives": 0.25, "map": 0.5}
# Gate stem -> (kind, value key): `min_positive_iou` gates `positive_iou` of the positives metrics, and so on.
TASK_GATES = {
    "positive_iou": ("positives", "positive_iou"),
    "anchor_iou": ("positives", "anchor_iou"),
    "box_iou": ("boxes", "box_iou"),
    "box_mae": ("boxes", "box_mae"),
    "map_iou": ("map", "map_iou"),
    "map_sqnr": ("map", "map_sqnr_db"),
}


@dataclass(frozen=True, kw_only=True)
class TaskMetric:
    """One task metric on one model output (see `parse_task_metric` for the meaning of each field).

    kind "positives": scores (channels start:stop of `axis`, times the `objectness` channel when given) above
    `threshold` after `activation`; values positive_iou (over elements = anchor x class), anchor_iou (an anchor
    is positive when any class is), score_sqnr_db (SQNR of those scores over every anchor), counts. kind
    "boxes": the 4 channels start:stop of `axis` as boxes of `format`, compared on the anchors positive in both
    models according to the positives metric `positives`.
    kind "map": elements above `threshold` after `activation`; values map_iou, map_sqnr_db.
    """

    kind: str
    output: str
    name: str
    axis: int = -1
    start: int = 0
    stop: int | None = None
    threshold: float = 0.25
    activation: str = "auto"
    objectness: int | None = None
    format: str = "cxcywh"
    positives: str | None = None

    def settings(self) -> dict[str, Any]:
        """The fields that apply to this kind (for JSON results)."""
        return {key: value for key, value in asdict(self).items()
                if key in _KEYS[self.kind] and key not in ("name", "output")}


def parse_task_metric(spec: str | Mapping[str, Any], outputs: Sequence[str] | None = None,
                      option: str = "task_metrics") -> TaskMetric:
    """`KIND key=value ...` (or a mapping {"kind": KIND, key: value}) -> TaskMetric.

    KIND positives: output, name, axis (-1), start (0), stop (end), threshold (0.25), activation, objectness.
    KIND boxes: output, name, axis (-1), start (0), stop (start+4), format (cxcywh | xyxy), positives.
    KIND map: output, name, axis (-1), start (0), stop (end; no slice without start/stop), threshold (0.5),
    activation.
    output: the model output (may be left out when the model has one output); name: what gates and results
    call it (default: the output name); activation: auto (sigmoid for logits: a remove-sigmoid record covering
    the channels, or reference values outside [0, 1]), sigmoid, or none (already probabilities); threshold:
    a probability, compared after the activation; objectness: the channel along `axis` that multiplies the
    class scores (YOLOX); positives: the name of the positives metric whose anchors the boxes are matched on
    (default: the only one). Raises OptionError naming `option` for anything malformed.
    """
    text = spec if isinstance(spec, str) else repr(dict(spec))

    def fail(message: str) -> OptionError:
        return OptionError(f"option '{option}': {text!r}: {message}")

    if isinstance(spec, str):
        kind, *pairs = spec.split()
        if not kind:
            raise fail("empty")
        given: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key or not value:
                raise fail(f"{pair!r} is not key=value")
            given[key] = value
    elif isinstance(spec, Mapping):
        given = {str(key): value for key, value in spec.items()}
        kind = str(given.pop("kind", ""))
    else:
        raise OptionError(f"option '{option}': expected 'KIND key=value ...' or a mapping, got {spec!r}")
    if kind not in TASK_KINDS:
        error = unknown_name("task metric kind", kind, TASK_KINDS)
        raise fail(str(error))
    for key in given:
        if key not in _KEYS[kind]:
            error = unknown_name(f"{kind} setting", key, _KEYS[kind])
            raise fail(str(error))
    values: dict[str, Any] = {}
    for key, value in given.items():
        if key in _INT_KEYS:
            try:
                values[key] = int(value)
            except (TypeError, ValueError):
                raise fail(f"{key} must be an integer, got {value!r}") from None
            if isinstance(value, float) and value != int(value):
                raise fail(f"{key} must be an integer, got {value!r}")
        elif key == "threshold":
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                raise fail(f"threshold must be a number, got {value!r}") from None
            if not math.isfinite(values[key]):
                raise fail(f"threshold must be finite, got {value!r}")
        else:
            values[key] = str(value)
    if values.get("activation", "auto") not in ACTIVATIONS:
        raise fail(f"activation must be one of {', '.join(ACTIVATIONS)}, got {values['activation']!r}")
    if values.get("format", "cxcywh") not in BOX_FORMATS:
        raise fail(f"format must be one of {', '.join(BOX_FORMATS)}, got {values['format']!r}")
    if "output" not in values:
        if outputs is None or len(outputs) != 1:
            raise fail("name the output (output=NAME)" + (f"; outputs: {', '.join(outputs)}" if outputs else ""))
        values["output"] = outputs[0]
    if outputs is not None and values["output"] not in outputs:
        raise fail(str(unknown_name("output", values["output"], outputs)))
    start = values.get("start", 0)
    if start < 0:
        raise fail(f"start must be >= 0, got {start}")
    if kind == "boxes":
        values.setdefault("stop", start + 4)
        if values["stop"] - start != 4:
            raise fail(f"boxes need 4 channels, got start={start} stop={values['stop']}")
    if "stop" in values and values["stop"] <= start:
        raise fail(f"stop must be > start, got start={start} stop={values['stop']}")
    objectness = values.get("objectness")
    if objectness is not None and start <= objectness < values.get("stop", math.inf):
        raise fail(f"objectness channel {objectness} lies inside the scores {start}:{values.get('stop', '')}")
    if kind in _DEFAULT_THRESHOLD:
        values.setdefault("threshold", _DEFAULT_THRESHOLD[kind])
    values.setdefault("name", values["output"])
    return TaskMetric(kind=kind, **values)


def parse_task_metrics(specs: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]] | None,
                       outputs: Sequence[str] | None = None, option: str = "task_metrics") -> list[TaskMetric]:
    """Several specs (see `parse_task_metric`); names unique per kind, boxes linked to their positives."""
    if specs is None:
        return []
    items = [specs] if isinstance(specs, (str, Mapping)) else list(specs)
    parsed = [parse_task_metric(item, outputs, option) for item in items if not isinstance(item, str)
              or item.strip()]
    seen: set[tuple[str, str]] = set()
    for metric in parsed:
        if (metric.kind, metric.name) in seen:
            raise OptionError(f"option '{option}': two {metric.kind} metrics are called '{metric.name}'; "
                              "tell them apart with name=...")
        seen.add((metric.kind, metric.name))
    positives = [m.name for m in parsed if m.kind == "positives"]
    linked = []
    for metric in parsed:
        if metric.kind == "boxes":
            if metric.positives is None:
                if len(positives) != 1:
                    raise OptionError(
                        f"option '{option}': boxes '{metric.name}' needs positives=NAME of a positives metric "
                        + (f"(one of: {', '.join(positives)})" if positives else "(add one: 'positives output=...')"))
                metric = TaskMetric(**{**asdict(metric), "positives": positives[0]})
            elif metric.positives not in positives:
                raise OptionError(f"option '{option}': boxes '{metric.name}': "
                                  f"{unknown_name('positives metric', metric.positives, positives)}")
        linked.append(metric)
    return linked


def record_covers(record: Mapping[str, Any] | None, metric: TaskMetric, shape: Sequence[int]) -> bool:
    """True when a remove-sigmoid record (ModelArtifact.metadata["sigmoid_removed"]["outputs"]) says the
    channels `metric` reads from its output are logits."""
    entry = (record or {}).get(metric.output)
    if not isinstance(entry, Mapping):
        return False
    if "axis" not in entry or "channels" not in entry:
        return True  # logits somewhere in the output, pattern unknown: treat the whole output as logits
    ndim = len(shape)
    if int(entry["axis"]) % ndim != metric.axis % ndim:
        return True
    stop = shape[metric.axis] if metric.stop is None else metric.stop
    read = set(range(metric.start, stop))
    if metric.objectness is not None:
        read.add(metric.objectness)
    return bool(read & {int(c) for c in entry["channels"]})


def _in_unit_interval(values: np.ndarray) -> bool:
    return bool(values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0))


def _scores(metric: TaskMetric, array: np.ndarray, activation: str) -> np.ndarray:
    """The metric's channels (moved last) as probabilities; times the objectness channel when given."""
    whole = metric.kind == "map" and metric.start == 0 and metric.stop is None
    scores = np.asarray(array, dtype=np.float64) if whole else channel_slice(array, metric.axis, metric.start,
                                                                            metric.stop).astype(np.float64)
    if activation == "sigmoid":
        scores = sigmoid(scores)
    if metric.objectness is not None:
        objectness = np.take(np.asarray(array, dtype=np.float64), metric.objectness, axis=metric.axis)
        scores = scores * (sigmoid(objectness) if activation == "sigmoid" else objectness)[..., None]
    return scores


def _activations(metric: TaskMetric, ref: np.ndarray, ref_record: Mapping[str, Any] | None,
                 cand_record: Mapping[str, Any] | None) -> tuple[str, str]:
    """(reference, candidate) activation. A model's own remove-sigmoid record wins; otherwise the reference's
    values decide for both (a quantized candidate may overshoot [0, 1] a little)."""
    if metric.activation != "auto":
        return metric.activation, metric.activation
    if record_covers(ref_record, metric, ref.shape):
        ref_activation = "sigmoid"
    else:
        ref_activation = "none" if _in_unit_interval(_scores(metric, ref, "none")) else "sigmoid"
    cand_activation = "sigmoid" if record_covers(cand_record, metric, ref.shape) else ref_activation
    return ref_activation, cand_activation


def measure_task_metrics(task_metrics: Sequence[TaskMetric], reference: Mapping[str, Any],
                         candidate: Mapping[str, Any], reference_logits: Mapping[str, Any] | None = None,
                         candidate_logits: Mapping[str, Any] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{kind: {name: {value: number, ..., "output", "settings", "activation"}}} for `task_metrics` on the
    outputs of a reference and a candidate ({output: array}, batch first; all samples pooled).

    reference_logits / candidate_logits: each model's remove-sigmoid record (metadata["sigmoid_removed"]
    ["outputs"]), which tells `activation=auto` which channels are logits. Raises DataError for an output that
    is missing or too small for the metric's channels, or boxes whose anchors do not line up with the scores.
    """
    results: dict[str, dict[str, dict[str, Any]]] = {}
    anchors: dict[str, tuple[Any, Any]] = {}  # positives name -> (reference, candidate) positive anchors
    ordered = sorted(task_metrics, key=lambda m: m.kind == "boxes")  # positives before the boxes that use them
    for metric in ordered:
        for side, outputs in (("reference", reference), ("candidate", candidate)):
            if metric.output not in outputs:
                raise DataError(f"{metric.kind} '{metric.name}': the {side} has no output '{metric.output}'")
        ref, cand = np.asarray(reference[metric.output]), np.asarray(candidate[metric.output])
        if ref.shape != cand.shape:
            raise DataError(f"output '{metric.output}': candidate shape {cand.shape} != reference {ref.shape}")
        entry: dict[str, Any] = {"output": metric.output, "settings": metric.settings()}
        try:
            if metric.kind == "boxes":
                ref_anchors, cand_anchors = anchors[str(metric.positives)]
                ref_boxes = channel_slice(ref, metric.axis, metric.start, metric.stop)
                cand_boxes = channel_slice(cand, metric.axis, metric.start, metric.stop)
                if ref_boxes.shape[:-1] != ref_anchors.shape:
                    raise ValueError(f"its anchors {ref_boxes.shape[:-1]} do not line up with those of positives "
                                     f"'{metric.positives}' {ref_anchors.shape}")
                entry.update(box_error(ref_boxes, cand_boxes, ref_anchors & cand_anchors, metric.format))
            else:
                ref_activation, cand_activation = _activations(metric, ref, reference_logits, candidate_logits)
                ref_scores = _scores(metric, ref, ref_activation)
                cand_scores = _scores(metric, cand, cand_activation)
                entry["activation"] = {"reference": ref_activation, "candidate": cand_activation}
                ref_positive, cand_positive = ref_scores > metric.threshold, cand_scores > metric.threshold
                if metric.kind == "positives":
                    ref_any, cand_any = np.any(ref_positive, axis=-1), np.any(cand_positive, axis=-1)
                    anchors[metric.name] = (ref_any, cand_any)
                    entry.update({
                        "positive_iou": jaccard(ref_positive, cand_positive),
                        "anchor_iou": jaccard(ref_any, cand_any),
                        "score_sqnr_db": sqnr_db(ref_scores, cand_scores),
                        "reference_positives": float(np.count_nonzero(ref_positive)),
                        "candidate_positives": float(np.count_nonzero(cand_positive)),
                        "common_positives": float(np.count_nonzero(ref_positive & cand_positive)),
                        "reference_anchors": float(np.count_nonzero(ref_any)),
                        "candidate_anchors": float(np.count_nonzero(cand_any)),
                    })
                else:
                    entry.update({
                        "map_iou": jaccard(ref_positive, cand_positive),
                        "map_sqnr_db": sqnr_db(ref_scores, cand_scores),
                        "reference_fraction": float(np.mean(ref_positive)) if ref_positive.size else 0.0,
                    })
        except ValueError as exc:
            raise DataError(f"{metric.kind} '{metric.name}' on output '{metric.output}': {exc}") from None
        results.setdefault(metric.kind, {})[metric.name] = entry
    return results
