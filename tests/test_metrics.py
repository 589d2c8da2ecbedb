"""trtkit.metrics against independent computations (sklearn, sorting, explicit definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trtkit import metrics

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(2, 64), elements=finite), st.integers(0, 2**31 - 1))
def test_cosine_and_sqnr_match_definitions(ref, seed):
    noise = np.random.default_rng(seed).normal(0, 0.1, ref.shape).astype(np.float32)
    cand = ref + noise
    from sklearn.metrics.pairwise import cosine_similarity

    a, b = ref.astype(np.float64), cand.astype(np.float64)
    # sklearn treats norms below machine epsilon as zero; compare where both norms are meaningful.
    if np.linalg.norm(a) > 1e-6 and np.linalg.norm(b) > 1e-6:
        expected = cosine_similarity(a[None], b[None])[0, 0]
        assert metrics.cosine(ref, cand) == pytest.approx(expected, abs=1e-9)
    signal_power = np.mean(a**2)
    noise_power = np.mean((b - a) ** 2)
    if noise_power > 0 and signal_power > 0:
        assert metrics.sqnr_db(ref, cand) == pytest.approx(10 * math.log10(signal_power / noise_power), rel=1e-9)


def test_sqnr_edge_cases_and_known_value():
    x = np.ones(100)
    assert metrics.sqnr_db(x, x) == math.inf
    # noise power 1/100 of signal power -> exactly 20 dB
    assert metrics.sqnr_db(x, x + 0.1) == pytest.approx(20.0)
    assert metrics.cosine(np.zeros(4), np.zeros(4)) == 1.0
    assert metrics.cosine(np.zeros(4), np.ones(4)) == 0.0
    assert metrics.cosine(x, -x) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sqnr_db(np.ones(3), np.ones(4))


def test_error_stats_against_sorted_definition():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(7, 13))
    ref[0, 0] = 0.0  # excluded from relative error
    cand = ref + rng.normal(scale=0.05, size=ref.shape)
    stats = metrics.error_stats(ref, cand)
    diff = sorted(abs(c - r) for r, c in zip(ref.ravel().tolist(), cand.ravel().tolist(), strict=True))
    assert stats["max_abs"] == pytest.approx(diff[-1])
    assert stats["mean_abs"] == pytest.approx(sum(diff) / len(diff))
    # median of 91 values is the 46th smallest
    assert stats["p50_abs"] == pytest.approx(diff[45])
    rel = [abs(c - r) / abs(r) for r, c in zip(ref.ravel().tolist(), cand.ravel().tolist(), strict=True) if r != 0]
    assert stats["max_rel"] == pytest.approx(max(rel))
    assert stats["mean_rel"] == pytest.approx(sum(rel) / len(rel))
    assert set(stats) >= {"p90_abs", "p99_abs", "p99.9_abs"}


def test_topk_accuracy_against_argsort():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(200, 10))
    labels = rng.integers(0, 10, size=200)
    for k in (1, 3, 5):
        top = np.argsort(-scores, axis=1)[:, :k]
        expected = np.mean([labels[i] in top[i] for i in range(200)])
        assert metrics.topk_accuracy(scores, labels, k) == pytest.approx(expected)
    assert metrics.topk_accuracy(scores, labels, 10) == 1.0
    with pytest.raises(ValueError, match="labels"):
        metrics.topk_accuracy(scores, labels[:10])


def test_top1_agreement_confident_subset():
    rng = np.random.default_rng(3)
    ref = rng.normal(scale=3.0, size=(300, 5))
    cand = ref + rng.normal(scale=0.8, size=ref.shape)
    result = metrics.top1_agreement(ref, cand, confidence=0.5)
    exp = np.exp(ref - ref.max(axis=1, keepdims=True))
    prob = exp / exp.sum(axis=1, keepdims=True)
    confident = prob.max(axis=1) > 0.5
    same = ref.argmax(1) == cand.argmax(1)
    assert result["agreement"] == pytest.approx(same.mean())
    assert result["confident_agreement"] == pytest.approx(same[confident].mean())
    assert result["confident_fraction"] == pytest.approx(confident.mean())
    # Flips concentrate where the reference is unsure.
    assert result["confident_agreement"] > result["agreement"]
    # Probabilities are recognised as such (not softmaxed twice).
    assert np.allclose(metrics.probabilities(prob), prob)


def test_latency_stats():
    seconds = np.linspace(0.001, 0.002, 101)
    stats = metrics.latency_stats(seconds)
    assert stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(2.0)
    assert stats["median_ms"] == pytest.approx(1.5)
    assert stats["p90_ms"] == pytest.approx(1.9)
    assert stats["cov"] == pytest.approx(np.std(seconds) / np.mean(seconds))
