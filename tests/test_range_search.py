"""Per-tensor range search by the error at the reading layers' outputs (plugins/qdq/range_search.py), on
seeded onnx.helper models and seeded data: toy numbers, real onnxruntime runs."""

from __future__ import annotations

import numpy as np
import pytest

import trtkit
from trtkit.metrics import sqnr_db
from trtkit.plugins.qdq.range_search import search_ranges
from trtkit.plugins.qdq.target import _activation_quantizers
from trtkit.runtime import session
from trtkit.scales import Scales


def spike_model(path):
    """x -> Conv(1x1) -> Relu -> t -> Conv(1x1) -> y, and t -> Add(t, t) -> z. Channel 0 of t carries rare large
    spikes, and the second Conv weighs channel 0 ten times more than the others: clipping the spikes costs
    the output much more than the tensor's histogram suggests. Only t is read by a Conv and an Add."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1 = np.abs(rng.standard_normal((8, 4, 1, 1))).astype(np.float32) * 0.3
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.1
    w2[:, 0] *= 10
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["t"], name="relu"),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="conv2"),
             helper.make_node("Add", ["t", "t"], ["z"], name="add")]
    graph = helper.make_graph(nodes, "spikes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def spike_data(seed, count):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (count, 4, 8, 8)).astype(np.float32)
    spikes = rng.uniform(0, 1, x.shape) > 0.995  # rare: a percentile calibrator clips them
    x[spikes] *= 40
    return x


def test_search_widens_a_range_whose_clipping_the_reading_layer_amplifies(tmp_path):
    from trtkit.model import as_artifact

    path = spike_model(tmp_path / "model.onnx")
    model = as_artifact(str(path))
    calib, held = spike_data(1, 32), spike_data(2, 32)
    calibrated = trtkit.calibrate(model, calib, method="percentile", progress=False)
    # A calibrator that clips the spikes of t (as one does when they are rarer than its percentile).
    scales = Scales({**dict(calibrated.items()), "t": calibrated["t"] / 4}, method="percentile",
                    stats=calibrated.stats)
    base = trtkit.quantize(model, scales)
    readers = dict(_activation_quantizers(base.model))
    assert readers["t"] == ["conv2"]
    full = {name: max(abs(st["min"]), abs(st["max"])) for name, st in scales.stats.items()}
    chosen = search_ranges(model, dict(scales.items()), full, readers, {"x": calib})
    assert chosen["t"] > scales["t"]
    assert set(chosen) <= set(readers)  # only tensors read by Conv/Gemm/MatMul are searched

    reference = session(model).run(["y"], {"x": held})[0]

    def output_sqnr(amax):
        return sqnr_db(reference, session(trtkit.quantize(model, amax).model).run(["y"], {"x": held})[0])

    # Judged on held-out data through onnxruntime, not by the search's own criterion.
    assert output_sqnr({**dict(scales.items()), **chosen}) > output_sqnr(dict(scales.items())) + 1


def test_search_is_deterministic_and_keeps_a_range_already_best(tmp_path):
    from trtkit.model import as_artifact

    model = as_artifact(str(spike_model(tmp_path / "model.onnx")))
    calib = spike_data(1, 16)
    scales = trtkit.calibrate(model, calib, method="minmax", progress=False)
    readers = dict(_activation_quantizers(trtkit.quantize(model, scales).model))
    full = {name: max(abs(st["min"]), abs(st["max"])) for name, st in scales.stats.items()}
    first = search_ranges(model, dict(scales.items()), full, readers, {"x": calib})
    assert first == search_ranges(model, dict(scales.items()), full, readers, {"x": calib})
    # The grid's top is the full range: a range at the full range is only ever narrowed, never widened.
    assert all(value <= full[name] * (1 + 1e-6) for name, value in first.items())


def test_checked_quantization_records_the_search(tmp_path):
    from trtkit.plugins.qdq.target import quantize_checked

    path = spike_model(tmp_path / "model.onnx")
    calib = spike_data(1, 48)
    calibrated = trtkit.calibrate(str(path), calib, method="percentile", progress=False)
    scales = Scales({**dict(calibrated.items()), "t": calibrated["t"] / 4}, method="percentile",
                    stats=calibrated.stats)
    result, report = quantize_checked(str(path), scales, calib, adaptive_round=False)
    searched = [d for d in report.decisions if d.action == "range-search"]
    assert len(searched) == 1 and searched[0].after is not None
    amax = result.metadata["quantization"]["activation_amax"]
    if searched[0].why.startswith("kept"):
        assert searched[0].after > searched[0].before and amax["t"] > scales["t"]
    elif any(d.action == "range-blend" and d.what != "a = 0" or d.action == "range" and d.what == "t"
             for d in report.decisions):  # a range step before or after the search widened it instead
        assert amax["t"] > scales["t"]
    else:
        assert amax["t"] == pytest.approx(scales["t"])
