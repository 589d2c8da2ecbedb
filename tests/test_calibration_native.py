"""The compiled bin counter (trtkit.native_count): the same histograms as numpy's path, bit for bit, on a
real model's activations; and calibration stays exact without it (turned off, or no C compiler)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from qdq_models import random_batch, residual_model

from trtkit import native_count
from trtkit.calibration import FINE_BINS, TensorStats, collect


@pytest.fixture
def native(monkeypatch, tmp_path):
    """The compiled counter, built afresh into an empty cache folder (skipped where no C compiler exists)."""
    monkeypatch.setenv("TRTKIT_NATIVE", "1")
    monkeypatch.setenv("TRTKIT_NATIVE_CACHE", str(tmp_path / "native"))
    native_count.count_function.cache_clear()
    count = native_count.count_function()
    if count is None:
        pytest.skip("the compiled counter cannot be built here (no C compiler)")
    yield count
    native_count.count_function.cache_clear()


def _use(monkeypatch, on):
    monkeypatch.setenv("TRTKIT_NATIVE", "1" if on else "0")
    native_count.count_function.cache_clear()


def test_kernel_counts_bins_and_reports_values_outside(native):
    hist = np.zeros(FINE_BINS, np.int64)
    values = np.array([0.0, -0.0, 0.5, -0.5, 0.999, 1e-30, 0.25], np.float32)
    assert native(values, np.float32(FINE_BINS), hist) == 0  # range [0, 1): bin = floor(|v| * 8192)
    expected = np.bincount((np.abs(values) * np.float32(FINE_BINS)).astype(np.intp), minlength=FINE_BINS)
    np.testing.assert_array_equal(hist, expected)
    assert hist[4096] == 2 and hist[0] == 3
    # beyond the histogram, NaN, inf: counted nowhere and reported (calibration raises on it, never miscounts)
    outside = np.array([1.0, 2.0, np.nan, np.inf, -np.inf, 0.5], np.float32)
    before = hist.copy()
    assert native(outside, np.float32(FINE_BINS), hist) == 5
    assert hist.sum() == before.sum() + 1 and hist[4096] == before[4096] + 1


def test_real_model_statistics_are_identical_with_and_without_the_kernel(native, monkeypatch, tmp_path):
    """Every value of every observed tensor of a real onnxruntime pass, histogrammed both ways: the same
    statistics and the same scales file bytes for every calibrator."""
    model = residual_model()
    onnx.save(model, tmp_path / "m.onnx")
    data = random_batch(model, 24)
    data[:, :, :4] = 0.0  # exact zeros and their runs, as after a ReLU
    results = {}
    for on in (False, True):
        _use(monkeypatch, on)
        assert (native_count.count_function() is not None) == on
        stats = collect(tmp_path / "m.onnx", data, batch_size=7, progress=False, histogram_positions=None)
        paths = {}
        for method in ("entropy", "percentile", "mse", "minmax"):
            paths[method] = tmp_path / f"{method}-{on}.json"
            stats.compute(method).save(paths[method])
        results[on] = (stats, paths)
    (plain, plain_files), (fast, fast_files) = results[False], results[True]
    assert plain.tensors.keys() == fast.tensors.keys() and len(plain.tensors) == 4
    for name, a in plain.tensors.items():
        b = fast.tensors[name]
        assert (a.count, a.min, a.max, a.range) == (b.count, b.min, b.max, b.range), name
        np.testing.assert_array_equal(a.hist, b.hist, err_msg=name)
    for method in plain_files:
        assert plain_files[method].read_bytes() == fast_files[method].read_bytes(), method


def test_sampled_histograms_use_it_too_and_match(native, monkeypatch):
    rng = np.random.default_rng(5)
    batch = np.maximum(rng.standard_normal((8, 3, 40, 40)), 0).astype(np.float32)
    out = {}
    for on in (False, True):
        _use(monkeypatch, on)
        stats = TensorStats("t")
        stats.update(batch[:3], histogram_positions=500)
        stats.update(batch[3:] * 3, histogram_positions=500)
        out[on] = stats
    np.testing.assert_array_equal(out[False].hist, out[True].hist)
    assert out[True].hist.sum() < batch.size  # sampled


def test_without_a_compiler_or_turned_off_numpy_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("TRTKIT_NATIVE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native_count.count_function.cache_clear()
    try:
        assert native_count.count_function() is None
        monkeypatch.delenv("CC")
        monkeypatch.setenv("TRTKIT_NATIVE", "0")
        native_count.count_function.cache_clear()
        assert native_count.count_function() is None
        values = np.linspace(-3, 3, 10_001, dtype=np.float32)
        stats = TensorStats("t")
        stats.update(values)
        expected = np.bincount((np.abs(values) * np.float32(FINE_BINS / 4.0)).astype(np.intp), minlength=FINE_BINS)
        np.testing.assert_array_equal(stats.hist, expected)
    finally:
        native_count.count_function.cache_clear()
