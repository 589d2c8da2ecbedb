"""Vectorised numpy metrics for comparing a candidate's outputs with a reference's.

Every function takes arrays of any shape (flattened where it matters) and returns plain Python floats or
dicts of floats, so results go straight into JSON. No per-element Python loops.

- `cosine(ref, cand)`: cosine similarity of the flattened tensors (1.0 = same direction).
- `sqnr_db(ref, cand)`: signal-to-quantization-noise ratio, 10*log10(sum(ref^2) / sum((ref-cand)^2)) in dB;
  +inf when the tensors are identical.
- `error_stats(ref, cand)`: max/mean absolute and relative error and absolute-error percentiles.
- `topk_accuracy(scores, labels, k)`: fraction of rows whose label is among the k highest scores.
- `top1_agreement(ref_scores, cand_scores, confidence)`: fraction of rows with the same argmax, overall and
  on the subset where the reference's top-1 probability exceeds `confidence`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def top1_agreement(ref_scores: Any, cand_scores: Any, confidence: float = 0.5) -> dict[str, float]:
    """Argmax agreement overall and on the reference-confident subset.

    Returns {"agreement", "confident_agreement", "confident_fraction", "confident_count"}; on the confident
    subset (reference top-1 probability > confidence) argmax flips mean real damage, not noise.
    confident_agreement is NaN when no row is confident.
    """
    ref_rows, cand_rows = _rows(ref_scores), _rows(cand_scores)
    if ref_rows.shape != cand_rows.shape:
        raise ValueError(f"shapes differ: reference {ref_rows.shape} vs candidate {cand_rows.shape}")
    if ref_rows.shape[0] == 0:
        return {"agreement": float("nan"), "confident_agreement": float("nan"), "confident_fraction": 0.0,
                "confident_count": 0.0}
    same = ref_rows.argmax(axis=1) == cand_rows.argmax(axis=1)
    confident = probabilities(ref_rows).max(axis=1) > confidence
    count = int(confident.sum())
    return {
        "agreement": float(same.mean()),
        "confident_agreement": float(same[confident].mean()) if count else float("nan"),
        "confident_fraction": float(count / ref_rows.shape[0]),
        "confident_count": float(count),
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
