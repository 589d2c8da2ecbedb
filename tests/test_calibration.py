"""Statistics and calibrators: known answers on synthetic distributions, invariance, overrides, scales files."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import run_cli
from qdq_models import conv_model, random_batch, residual_model

from trtkit.calibration import FINE_BINS, TensorStats, calibrate, collect
from trtkit.errors import DataError, InputFileError, OptionError, UnknownNameError
from trtkit.plugins.calibrators.entropy import amax_entropy
from trtkit.plugins.calibrators.minmax import amax_minmax
from trtkit.plugins.calibrators.mse import amax_mse
from trtkit.plugins.calibrators.percentile import amax_percentile
from trtkit.registry import get_registry
from trtkit.scales import Scales

METHODS = ("minmax", "entropy", "percentile", "mse")


def _stats(values, batch=None, name="t"):
    stats = TensorStats(name)
    values = np.asarray(values, np.float32)
    if batch is None:
        stats.update(values)
    else:
        for start in range(0, len(values), batch):
            stats.update(values[start:start + batch])
    return stats


def _all_methods(stats):
    registry = get_registry()
    return {m: registry.calibrator(m).compute_amax(stats, **registry.calibrator(m).resolve_options({}))
            for m in METHODS}


@pytest.fixture(scope="module")
def heavy_tailed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:400] = rng.uniform(4, 100, size=400)  # a thin tail of large outliers dominates the range
    return rng.permutation(x)


def test_statistics_do_not_depend_on_batch_size_or_order(heavy_tailed):
    reference = _stats(heavy_tailed)
    # growing ranges: small values first, then larger ones, in different batchings and orders
    for values, batch in ((heavy_tailed, 7), (heavy_tailed[np.argsort(np.abs(heavy_tailed))], 1000),
                          (heavy_tailed[::-1], 65536)):
        other = _stats(values, batch)
        assert other.range == reference.range and other.count == reference.count
        assert other.min == reference.min and other.max == reference.max
    sorted_stats = _stats(heavy_tailed[np.argsort(np.abs(heavy_tailed))], 333)
    np.testing.assert_array_equal(sorted_stats.hist, reference.hist)
    assert _all_methods(sorted_stats) == _all_methods(reference)


def test_merge_is_exact(heavy_tailed):
    a, b = _stats(heavy_tailed[:1000] * 0.01), _stats(heavy_tailed[1000:])
    merged = a.merge(b)
    whole = _stats(np.concatenate([heavy_tailed[:1000] * 0.01, heavy_tailed[1000:]]))
    np.testing.assert_array_equal(merged.hist, whole.hist)
    assert (merged.range, merged.count, merged.min, merged.max) == (whole.range, whole.count, whole.min, whole.max)


def _exact_histogram(values):
    """The |x| histogram by exact rational arithmetic: bin floor(|v| * FINE_BINS / R), R the smallest power of
    two above the largest finite |v|; non-finite values left out."""
    from fractions import Fraction

    finite = [Fraction(float(v)) for v in np.asarray(values).reshape(-1) if math.isfinite(float(v))]
    amax = max(abs(v) for v in finite)
    exponent = math.frexp(float(amax))[1]
    top = Fraction(2) ** exponent
    hist = np.zeros(FINE_BINS, np.int64)
    for v in finite:
        hist[math.floor(abs(v) * FINE_BINS / top)] += 1
    return hist, float(top)


def _edge_values(dtype, top):
    """Values exactly on bin edges, one ulp either side, zeros of both signs, negatives, tiny and subnormal."""
    edges = (np.arange(FINE_BINS + 1) * (top / FINE_BINS)).astype(dtype)
    below = np.nextafter(edges, dtype(0))
    above = np.nextafter(edges, dtype(2 * top))
    special = np.array([0.0, -0.0, np.finfo(dtype).smallest_subnormal, -np.finfo(dtype).tiny, top / 2, -top / 4,
                        np.nextafter(dtype(top), dtype(0)), -np.nextafter(dtype(top), dtype(0))], dtype)
    values = np.concatenate([edges, -edges, below, -below, above, special]).astype(dtype)
    return values[np.abs(values) < top]


@pytest.fixture(params=["numpy", "native"])
def counter(request, monkeypatch):
    """Each exactness test runs on both ways of counting bins: numpy's and the compiled kernel's
    (trtkit.native_count; skipped where no C compiler can build it)."""
    from trtkit import native_count

    monkeypatch.setenv("TRTKIT_NATIVE", "1" if request.param == "native" else "0")
    native_count.count_function.cache_clear()
    if request.param == "native" and native_count.count_function() is None:
        pytest.skip("the compiled counter cannot be built here (no C compiler)")
    yield request.param
    native_count.count_function.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_bins_are_exact_on_edges_zeros_and_negatives(dtype, counter, monkeypatch):
    import trtkit.calibration as calibration

    rng = np.random.default_rng(3)
    values = rng.permutation(_edge_values(dtype, 8.0))
    reference, top = _exact_histogram(values)
    for chunk in (calibration.CHUNK, 1000, 64):  # small chunks: the range grows chunk by chunk inside one batch
        for skip_zeros_from in (0, 1 << 40):  # zeros counted apart always, never
            monkeypatch.setattr(calibration, "CHUNK", chunk)
            monkeypatch.setattr(calibration, "NATIVE_CHUNK", chunk)
            monkeypatch.setattr(calibration, "SKIP_ZEROS_FROM", skip_zeros_from)
            monkeypatch.setattr(calibration, "_SCRATCH", __import__("threading").local())
            stats = TensorStats("t")
            stats.update(values)
            assert stats.range == top and stats.count == values.size
            np.testing.assert_array_equal(stats.hist, reference)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("skip_zeros_from", [0, 300, 1 << 40])
def test_histogram_bins_are_exact_across_range_growth_and_zero_runs(dtype, skip_zeros_from, counter, monkeypatch):
    import trtkit.calibration as calibration

    monkeypatch.setattr(calibration, "CHUNK", 512)
    monkeypatch.setattr(calibration, "NATIVE_CHUNK", 512)
    monkeypatch.setattr(calibration, "SKIP_ZEROS_FROM", skip_zeros_from)
    rng = np.random.default_rng(4)
    relu = np.maximum(rng.standard_normal((6, 700)), 0.0).astype(dtype)  # half zeros, like a ReLU's output
    relu[2, 100:400] = 0.0  # a long run of zeros
    batches = [
        _edge_values(dtype, 1.0 / 64),                         # small range first
        relu * dtype(0.5),                                     # zero-heavy, grows the range
        np.zeros(300, dtype),                                  # zeros only
        _edge_values(dtype, 4.0)[::7] * dtype(-1),             # negatives on the edges of a larger range
        np.array([np.nan, -np.inf, 0.0, -0.0, 3.5], dtype),    # non-finite values are left out
        (rng.standard_cauchy(5000) * 100).astype(dtype),       # heavy tail: the range grows by many doublings
        relu[:, :1] * dtype(1e-6),                             # tiny values after the range grew: bin 0
    ]
    stats = TensorStats("t")
    for batch in batches:
        stats.update(batch)
    reference, top = _exact_histogram(np.concatenate([b.reshape(-1) for b in batches]))
    assert stats.range == top and stats.nonfinite == 2
    np.testing.assert_array_equal(stats.hist, reference)
    # the same values in one update and in the reverse order: the same histogram
    for values in (np.concatenate([b.reshape(-1) for b in batches]),
                   np.concatenate([b.reshape(-1) for b in batches[::-1]])):
        again = TensorStats("t")
        again.update(values)
        np.testing.assert_array_equal(again.hist, reference)


def test_histogram_range_is_the_next_power_of_two():
    stats = _stats([0.3, -5.0, 2.0])
    assert stats.range == 8.0 and stats.absmax == 5.0 and stats.hist.sum() == 3
    assert stats.hist[int(5.0 / 8.0 * FINE_BINS)] == 1


def test_minmax_and_percentile_match_numpy(heavy_tailed):
    stats = _stats(heavy_tailed, 4096)
    assert amax_minmax(stats) == pytest.approx(np.abs(heavy_tailed).max())
    width = stats.range / FINE_BINS
    for p in (50.0, 99.0, 99.9, 99.99):
        expected = np.percentile(np.abs(heavy_tailed), p)
        assert abs(amax_percentile(stats, p) - expected) <= width, p
    assert amax_percentile(stats, 100.0) == pytest.approx(np.abs(heavy_tailed).max())


def _entropy_reference(counts: np.ndarray, edges: np.ndarray, levels: int = 128, start: int = 128) -> float:
    """A direct loop transcription of NVIDIA's reference (pytorch-quantization's _compute_amax_entropy)."""
    counts = counts.copy()
    counts[0] = counts[1]
    best, best_kl = None, math.inf
    for i in range(start, len(counts) + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        level = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        level[counts[:i] == 0] = -1
        q = np.zeros(i)
        for j in range(levels):
            members = level == j
            if members.any():
                q[members] = counts[:i][members].sum() / members.sum()
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = math.inf if (q[mask] == 0).any() else float((p[mask] * np.log(p[mask] / q[mask])).sum())
        if kl <= best_kl:
            best, best_kl = i, kl
    return float(edges[best])


def test_entropy_matches_the_reference_loop(heavy_tailed):
    stats = _stats(heavy_tailed)
    counts, edges = stats.histogram(512)
    assert amax_entropy(stats, bins=512) == pytest.approx(_entropy_reference(counts, edges), rel=1e-12)
    # sparse histogram (empty bins must stay empty in Q)
    sparse = _stats(np.round(heavy_tailed * 4) / 4)
    counts, edges = sparse.histogram(256)
    assert amax_entropy(sparse, bins=256) == pytest.approx(_entropy_reference(counts, edges), rel=1e-12)


def test_entropy_picks_a_threshold_well_inside_an_outlier_dominated_range(heavy_tailed):
    stats = _stats(heavy_tailed)
    amax = amax_entropy(stats)
    assert amax_minmax(stats) > 90
    assert 2.5 < amax < 25  # covers the Gaussian bulk, clips the thin tail of outliers


def test_mse_is_near_the_brute_force_optimum():
    x = np.random.default_rng(1).laplace(size=100_000).astype(np.float32)
    stats = _stats(x)
    chosen = amax_mse(stats)

    def error(amax):
        step = amax / 127
        return float(np.mean((x - np.clip(np.round(x / step), -127, 127) * step) ** 2))

    grid = np.linspace(0.5, np.abs(x).max(), 400)
    best = min(error(a) for a in grid)
    assert error(chosen) <= 1.05 * best
    assert chosen < 0.9 * np.abs(x).max()


def test_zero_and_nonfinite_tensors():
    zero = _stats(np.zeros(100))
    assert all(v == 0.0 for v in _all_methods(zero).values())
    stats = TensorStats("t")
    stats.update(np.array([1.0, np.nan, np.inf], np.float32))
    assert stats.nonfinite == 2 and stats.count == 1


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    model = residual_model()
    onnx.save(model, folder / "m.onnx")
    data = random_batch(model, 40)
    np.save(folder / "d.npy", data)
    return folder, model, data


def test_calibrate_is_batch_size_and_order_invariant(small):
    folder, model, data = small
    stats_a = collect(folder / "m.onnx", data, batch_size=3, progress=False)
    stats_b = collect(folder / "m.onnx", data[::-1].copy(), batch_size=16, progress=False)
    assert set(stats_a.tensors) == set(stats_b.tensors) == {"x", "relu0_out", "relu1_out", "relu2_out"}
    for method in METHODS:
        a, b = stats_a.compute(method), stats_b.compute(method)
        assert dict(a) == dict(b), method
        assert all(v > 0 for v in a.values())
    assert stats_a.data["sha256"] != stats_b.data["sha256"]  # the fingerprint records the data order
    assert stats_a.model["sha256"] == stats_b.model["sha256"]
    assert stats_a.num_samples == stats_b.num_samples == len(data)
    assert stats_a.tensors["x"].count == stats_b.tensors["x"].count == data.size  # every value seen once


def _same_statistics(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].count, a[name].min, a[name].max, a[name].range) == \
            (b[name].count, b[name].min, b[name].max, b[name].range), name
        assert np.array_equal(a[name].hist, b[name].hist), name


def test_runs_in_slices_of_a_memory_budget_give_the_same_statistics(small, monkeypatch):
    """A dynamic-batch model runs in slices of each batch (RUN_BYTES of observed activations): one sample per
    run and a whole batch per run collect identical statistics, and every value exactly once."""
    import trtkit.calibration as calibration

    folder, _, data = small
    monkeypatch.setattr(calibration, "RUN_BYTES", 1)  # one sample per onnxruntime run
    sliced = collect(folder / "m.onnx", data, batch_size=16, progress=False)
    monkeypatch.setattr(calibration, "RUN_BYTES", 1 << 40)  # whole batches
    whole = collect(folder / "m.onnx", data, batch_size=16, progress=False)
    _same_statistics(sliced.tensors, whole.tensors)
    assert sliced.tensors["relu0_out"].count == whole.tensors["relu0_out"].count == len(data) * 16 * 8 * 8
    assert sliced.data == whole.data


def test_default_histogram_sampling_is_invariant_and_close_to_exact(tmp_path):
    """Histograms see at most DEFAULT_HISTOGRAM_POSITIONS positions per sample (min/max exact): independent of batching,
    and percentile/mse stay within a few percent of the every-value result. Entropy, whose divergence depends
    on the counts in the tail bins, histograms every value by default."""
    from qdq_models import _Net

    net = _Net(0)  # x -> conv -> relu -> conv at 32x32: 16384 positions per sample of the relu output
    model = net.model([net.conv(net.node("Relu", [net.conv("x", 3, 16, "c1")], "r1"), 16, 8, "c2")], 3, hw=32)
    onnx.save(model, tmp_path / "m.onnx")
    data = random_batch(model, 24)
    np.save(tmp_path / "d.npy", data)
    a = collect(tmp_path / "m.onnx", data, batch_size=5, progress=False)
    b = collect(tmp_path / "m.onnx", data[::-1].copy(), batch_size=24, progress=False)
    exact = collect(tmp_path / "m.onnx", data, batch_size=24, progress=False, histogram_positions=None)
    _same_statistics(a.tensors, b.tensors)
    big = max(exact.tensors, key=lambda n: exact.tensors[n].count)
    assert a.tensors[big].hist.sum() < exact.tensors[big].hist.sum() / 2  # sampling did happen
    for name in exact.tensors:
        assert (a.tensors[name].min, a.tensors[name].max) == (exact.tensors[name].min, exact.tensors[name].max)
    for method in ("percentile", "mse"):
        sampled, full = a.compute(method), exact.compute(method)
        for name in full:
            assert sampled[name] == pytest.approx(full[name], rel=0.05), (method, name)
    assert dict(calibrate(tmp_path / "m.onnx", data, method="entropy", progress=False)) == dict(exact.compute("entropy"))
    assert dict(calibrate(tmp_path / "m.onnx", data, progress=False)) == dict(a.compute("percentile"))
    with pytest.raises(OptionError, match="histogram positions"):
        calibrate(tmp_path / "m.onnx", data, histogram_positions=0, progress=False)
    bad = run_cli("calibrate", str(tmp_path / "m.onnx"), "-d", str(tmp_path / "d.npy"), "--histogram-positions", "-3",
                  "-o", str(tmp_path / "s.json"))
    assert bad.returncode == 2 and "--histogram-positions" in bad.stderr and not (tmp_path / "s.json").exists()


def test_scales_file_round_trip_and_determinism(small, tmp_path):
    folder, _, data = small
    scales = calibrate(folder / "m.onnx", data, method="percentile", options={"percentile": 99.9}, progress=False)
    scales.save(tmp_path / "a.json")
    again = calibrate(folder / "m.onnx", data, method="percentile", options={"percentile": 99.9}, progress=False)
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    loaded = Scales.load(tmp_path / "a.json")
    assert dict(loaded) == dict(scales) and loaded.method == "percentile"
    assert loaded.options == {"percentile": 99.9}
    content = json.loads((tmp_path / "a.json").read_text())
    assert content["model"]["sha256"] and content["data"]["samples"] == 40
    name = next(iter(scales))
    assert content["tensors"][name]["scale"] == pytest.approx(scales[name] / 127)


def test_overrides_pin_tensors_and_are_validated(small, tmp_path):
    folder, _, data = small
    stats = collect(folder / "m.onnx", data, progress=False)
    base = stats.compute("minmax")
    pinned = stats.compute("minmax", overrides={"x": 3.0})
    assert pinned["x"] == 3.0 and pinned.sources["x"] == "override"
    assert {k: v for k, v in pinned.items() if k != "x"} == {k: v for k, v in base.items() if k != "x"}
    (tmp_path / "o.yaml").write_text("relu0_out:\n  scale: 0.5\n")
    assert stats.compute("minmax", overrides=tmp_path / "o.yaml")["relu0_out"] == pytest.approx(63.5)
    with pytest.raises(UnknownNameError, match=r"unknown tensor 'relu0_ot'.*did you mean: relu0_out"):
        stats.compute("minmax", overrides={"relu0_ot": 1.0})
    (tmp_path / "bad.json").write_text(json.dumps({"relu0_out": -1.0}))
    with pytest.raises(DataError, match=r"bad.json: tensor 'relu0_out' has a non-positive"):
        stats.compute("minmax", overrides=tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputFileError, match="broken.json"):
        calibrate(folder / "m.onnx", data, overrides=tmp_path / "broken.json", progress=False)


def test_unknown_calibrator_lists_close_matches(small):
    folder, _, data = small
    with pytest.raises(UnknownNameError, match=r"unknown calibrator 'entrophy'.*did you mean: entropy"):
        calibrate(folder / "m.onnx", data, method="entrophy", progress=False)


def test_quantized_models_are_refused(small, tmp_path):
    from trtkit.plugins.qdq.insert import quantize

    folder, _, data = small
    quantize(folder / "m.onnx", calibrate(folder / "m.onnx", data, progress=False), output=tmp_path / "q.onnx")
    with pytest.raises(InputFileError, match="already quantized"):
        calibrate(tmp_path / "q.onnx", data, progress=False)


def test_all_tensors_mode_observes_every_float_activation():
    model = conv_model()
    stats = collect(model, random_batch(model, 8), tensors="all", progress=False)
    assert set(stats.tensors) == {"x", "conv1_out", "relu1_out", "conv2_out"}
    quantizable = collect(model, random_batch(model, 8), progress=False)
    assert set(quantizable.tensors) == {"x", "relu1_out"}


def test_cli_calibrate_writes_scales_and_cache(small, tmp_path):
    folder, _, _ = small
    out, cache = tmp_path / "s.json", tmp_path / "c.cache"
    result = run_cli("calibrate", str(folder / "m.onnx"), "--data", str(folder / "d.npy"), "-m", "percentile",
                     "-O", "percentile=99.9", "-o", str(out), "--cache", str(cache), "--trt-version", "10.3.0",
                     "--json", "-b", "7")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "percentile" and summary["options"] == {"percentile": 99.9}
    assert Scales.load(out).method == "percentile"
    lines = cache.read_text().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert {line.split(": ")[0] for line in lines[1:]} >= {"x", "conv0_out", "relu0_out", "add_out", "y"} - {"y"}
    bad = run_cli("calibrate", str(folder / "m.onnx"), "--data", str(folder / "d.npy"), "-m", "percentil")
    assert bad.returncode == 2 and "did you mean: percentile" in bad.stderr
    bad = run_cli("calibrate", str(folder / "m.onnx"), "--data", str(folder / "d.npy"), "-O", "percentile=abc",
                  "-m", "percentile", "-o", str(tmp_path / "t.json"))
    assert bad.returncode == 2 and "percentile" in bad.stderr and not (tmp_path / "t.json").exists()


def test_histogram_subsampling_is_batching_invariant():
    rng = np.random.default_rng(3)
    data = rng.laplace(size=(24, 4, 32, 32)).astype(np.float32)
    exact = TensorStats("e")
    exact.update(data)
    sampled = [TensorStats("s"), TensorStats("t")]
    sampled[0].update(data, histogram_positions=512)
    for start in range(0, 24, 5):
        sampled[1].update(data[start:start + 5][::-1], histogram_positions=512)
    np.testing.assert_array_equal(sampled[0].hist, sampled[1].hist)
    assert sampled[0].hist.sum() < exact.hist.sum() / 7  # 4096 positions per sample -> stride 11
    assert (sampled[0].min, sampled[0].max, sampled[0].count) == (exact.min, exact.max, exact.count)
    assert amax_percentile(sampled[0], 99.9) == pytest.approx(amax_percentile(exact, 99.9), rel=0.1)


def test_clipped_fraction_is_recorded():
    x = np.concatenate([np.linspace(-1, 1, 9900), np.full(100, 10.0)]).astype(np.float32)
    stats = _stats(x)
    assert stats.clipped_fraction(10.0) == 0.0
    assert stats.clipped_fraction(2.0) == pytest.approx(0.01)
    assert stats.clipped_fraction(0.5) == pytest.approx(0.01 + 0.99 * 0.5, abs=0.002)
    model = residual_model()
    scales = calibrate(model, random_batch(model, 8), method="percentile", options={"percentile": 90.0},
                       progress=False)
    assert all(0.0 <= entry["clipped"] <= 0.11 for entry in scales.to_dict()["tensors"].values())


def test_model_whose_batch_axis_is_free_in_name_only_runs_whole_batches(tmp_path):
    """A dynamic batch axis that a Reshape pins to 4 fails on a one-sample run: calibration falls back to
    running the data's whole batches and still sees every value once."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y0"]),
             helper.make_node("MatMul", ["y0", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "pinned", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([4, 4], np.int64), "shape"),
                     numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    stats = collect(model, data, batch_size=4, progress=False)
    assert stats.num_samples == 8 and stats.tensors["y0"].count == data.size
    assert stats.tensors["y0"].max == pytest.approx(float(np.maximum(data, 0).max()))
