"""The `smooth` pass (plugins/ptq/smooth.py) and its decision in `quantize --data`, on a seeded onnx.helper
post-LN block (LayerNorm with a few wide channels -> Q/K-like MatMuls, and a residual Add reading the same
output) and a seeded MobileNet-style block (Conv with a few wide channels -> depthwise Conv): toy numbers, real
code paths, real onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

import trtkit
from trtkit.errors import OptionError
from trtkit.metrics import sqnr_db
from trtkit.plugins.ptq.smooth import smooth
from trtkit.runtime import session

CHANNELS = 32


def block_model(path, relu_reader: bool = False):
    """x [N, 8, C] -> LayerNorm (gamma: 3 channels 20x wider) -> MatMul a, MatMul b; Add(LN out, MatMul a) + b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    gamma = np.ones(CHANNELS, np.float32)
    gamma[[3, 11, 29]] = 20.0
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.2, (CHANNELS, CHANNELS)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(0, 0.2, (CHANNELS, CHANNELS)).astype(np.float32), "wb")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["h", "wa"], ["a"], name="mm_a"),
             helper.make_node("MatMul", ["h", "wb"], ["b"], name="mm_b"),
             helper.make_node("Add", ["h", "a"], ["r"], name="residual"),
             helper.make_node("Add", ["r", "b"], ["y"], name="out")]
    if relu_reader:
        nodes.insert(1, helper.make_node("Relu", ["h"], ["hr"], name="relu"))
        nodes.append(helper.make_node("Add", ["y", "hr"], ["z"], name="extra"))
    out = "z" if relu_reader else "y"
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, CHANNELS])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 8, CHANNELS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def depthwise_model(path, shared_weight: bool = False, relu: bool = False):
    """x [N, 4, 12, 12] -> Conv 1x1 to C channels (3 of them 20x wider) -> depthwise 3x3 (multiplier 2) -> Conv 1x1
    -> y; the first Conv's output h is also added to the result through a second 1x1 Conv (another reader).
    shared_weight: a second depthwise Conv reads the same weight (on the first Conv's output).
    relu: h is a Relu of the first Conv's output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    wide = np.ones((CHANNELS, 1, 1, 1), np.float32)
    wide[[2, 17, 30]] = 20.0
    inits = [numpy_helper.from_array((rng.normal(0, 0.5, (CHANNELS, 4, 1, 1)) * wide).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (2 * CHANNELS, 1, 3, 3)).astype(np.float32), "wdw"),
             numpy_helper.from_array(rng.normal(0, 0.1, 2 * CHANNELS).astype(np.float32), "bdw"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 2 * CHANNELS, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, CHANNELS, 1, 1)).astype(np.float32), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="expand"),
             helper.make_node("Relu" if relu else "Identity", ["c1"], ["h"], name="act"),
             helper.make_node("Conv", ["h", "wdw", "bdw"], ["d"], group=CHANNELS, pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Conv", ["d", "w2"], ["p"], name="project"),
             helper.make_node("Conv", ["h", "w3"], ["s"], name="side"),
             helper.make_node("Add", ["p", "s"], ["y"], name="out")]
    if shared_weight:
        nodes.insert(3, helper.make_node("Conv", ["c1", "wdw"], ["d2"], group=CHANNELS, pads=[1, 1, 1, 1], name="dw2"))
        nodes.append(helper.make_node("Conv", ["d2", "w2"], ["p2"], name="project2"))
        nodes.append(helper.make_node("Add", ["y", "p2"], ["z"], name="out2"))
    out = "z" if shared_weight else "y"
    graph = helper.make_graph(nodes, "mbblock", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 8, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _images(seed: int, count: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, 4, 12, 12)).astype(np.float32)


def _data(seed: int, count: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, 8, CHANNELS)).astype(np.float32)


def _run(model, x):
    return session(model, emulate_qdq=True).run(None, {"x": x})[0]


def test_smooth_is_exact_in_float_evens_the_channels_and_helps_int8(tmp_path):
    path = block_model(tmp_path / "block.onnx")
    before = path.read_bytes()
    calib, held = _data(1), _data(2)
    np.save(tmp_path / "calib.npy", calib)
    result, report = smooth(path, tmp_path / "calib.npy")
    assert path.read_bytes() == before
    assert [layer["tensor"] for layer in report.layers] == ["h"] and report.layers[0]["spread_before"] > 5
    assert report.sqnr_db is not None and report.sqnr_db > 100
    assert sqnr_db(_run(path, held), _run(result, held)) > 100  # the same function on other data
    # the residual Add reads the LayerNorm output through the Mul that restores it
    mul = next(n for n in result.model.graph.node if n.op_type == "Mul")
    assert mul.input[0] == "h" and next(n.name for n in result.model.graph.node if mul.output[0] in n.input) == "residual"
    # the smoothed LayerNorm output's channels now share one range
    extra = session(result, emulate_qdq=False, extra_outputs=["h"]).run(["h"], {"x": calib})[0]
    peaks = np.abs(extra.reshape(-1, CHANNELS)).max(axis=0)
    assert peaks.max() / np.median(peaks) < 2.0
    # and int8 (percentile scales, nearest rounding) is closer to FP32 on held-out data
    reference = _run(path, held)
    plain = trtkit.quantize(path, trtkit.calibrate(path, calib, progress=False))
    smoothed = trtkit.quantize(result, trtkit.calibrate(result, calib, progress=False))
    assert sqnr_db(reference, _run(smoothed, held)) > sqnr_db(reference, _run(plain, held)) + 1  # toy: +2.2 dB


def test_smooth_evens_depthwise_inputs_exactly_and_helps_int8(tmp_path):
    path = depthwise_model(tmp_path / "mb.onnx")
    calib, held = _images(1), _images(2)
    result, report = smooth(path, calib)
    assert [(layer["kind"], layer["readers"]) for layer in report.layers] == [("depthwise", ["dw"])]
    assert report.layers[0]["spread_before"] > 5 and report.sqnr_db is not None and report.sqnr_db > 100
    assert sqnr_db(_run(path, held), _run(result, held)) > 100
    nodes = {n.name: n for n in result.model.graph.node}
    evened = report.layers[0]["tensor"]
    assert nodes["dw"].input[0] == evened and nodes["side"].input[0] == "h"  # the other reader keeps the original
    value = session(result, emulate_qdq=False, extra_outputs=[evened]).run([evened], {"x": calib})[0]
    peaks = np.abs(value).max(axis=(0, 2, 3))
    assert peaks.max() / np.median(peaks) < 1.5
    reference = _run(path, held)
    plain = trtkit.quantize(path, trtkit.calibrate(path, calib, progress=False))
    smoothed = trtkit.quantize(result, trtkit.calibrate(result, calib, progress=False))
    assert sqnr_db(reference, _run(smoothed, held)) > sqnr_db(reference, _run(plain, held)) + 1


def test_smoothed_depthwise_qdq_builds_with_tensorrt_rtx(tmp_path):
    """The per-channel Mul between the producer and the depthwise Conv's Q/DQ is something TensorRT parses and
    builds (it fuses the Mul into the producer's pointwise chain)."""
    from test_qdq import trt_build

    calib = _images(1)
    result, _ = smooth(depthwise_model(tmp_path / "mb.onnx"), calib)
    trtkit.quantize(result, trtkit.calibrate(result, calib, progress=False)).save(tmp_path / "smoothed.onnx")
    trt_build(tmp_path / "smoothed.onnx", shape=(1, 4, 12, 12), opt=(4, 4, 12, 12), maximum=(8, 4, 12, 12))


def test_smooth_leaves_a_relu_output_to_recentring(tmp_path):
    path = depthwise_model(tmp_path / "mb.onnx", relu=True)
    result, report = smooth(path, _images(1))
    assert report.layers == [] and report.skipped == {"dw": "reads a Relu output: recentring halves its int8 step "
                                                            "instead"}
    assert [n.op_type for n in result.model.graph.node].count("Mul") == 0


def test_smooth_skips_a_depthwise_conv_with_a_shared_weight(tmp_path):
    path = depthwise_model(tmp_path / "mb.onnx", shared_weight=True)
    result, report = smooth(path, _images(1))
    assert report.layers == [] and report.skipped == {"dw": "its weight is shared with another node",
                                                      "dw2": "its weight is shared with another node"}
    assert [n.op_type for n in result.model.graph.node].count("Mul") == 0


def test_smooth_skips_a_layernorm_read_by_another_op(tmp_path):
    path = block_model(tmp_path / "block.onnx", relu_reader=True)
    result, report = smooth(path, _data(1))
    assert report.layers == [] and report.skipped == {"ln": "read by Relu 'relu'"}
    assert [n.op_type for n in result.model.graph.node].count("Mul") == 0


def test_smooth_bad_alpha_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="alpha must be in"):
        smooth(block_model(tmp_path / "block.onnx"), _data(1), alpha=1.5)


def test_smooth_pass_through_optimize_is_checked_exact(tmp_path):
    path = block_model(tmp_path / "block.onnx")
    np.save(tmp_path / "calib.npy", _data(1))
    result = run_cli("optimize", str(path), "-o", str(tmp_path / "s.onnx"), "--pass", "smooth",
                     "-O", f"data={tmp_path / 'calib.npy'}")
    assert result.returncode == 0, result.stderr
    assert "smooth: 1 LayerNorm outputs and 0 depthwise Conv inputs on 48 samples" in result.stdout + result.stderr
    missing = run_cli("optimize", str(path), "-o", str(tmp_path / "t.onnx"), "--pass", "smooth")
    assert missing.returncode == 2 and "needs option 'data'" in missing.stderr
    assert not (tmp_path / "t.onnx").exists()


def test_quantize_with_data_decides_on_smoothing(tmp_path):
    from trtkit.plugins.qdq.target import quantize_checked

    path = block_model(tmp_path / "block.onnx")
    calib = _data(1)
    scales = trtkit.calibrate(path, calib, progress=False)
    result, report = quantize_checked(path, scales, calib, adaptive_round=False)
    decision = next(d for d in report.decisions if d.action == "smooth")
    assert decision.what == "1 LayerNorm outputs" and decision.why.startswith("kept")
    assert decision.after > decision.before
    assert any(n.op_type == "Mul" for n in result.model.graph.node)  # built from the smoothed model
    _, off = quantize_checked(path, scales, calib, adaptive_round=False, smooth=False)
    assert not any(d.action == "smooth" for d in off.decisions)


def test_cli_quantize_smooth_flag(tmp_path):
    import json

    path = block_model(tmp_path / "block.onnx")
    np.save(tmp_path / "calib.npy", _data(1))
    actions = {}
    for flag in ("--smooth", "--no-smooth"):
        result = run_cli("quantize", str(path), "--data", str(tmp_path / "calib.npy"), "--nearest-round", flag,
                         "-o", str(tmp_path / f"q{flag}.onnx"), "--json")
        assert result.returncode == 0, result.stderr
        actions[flag] = [d["action"] for d in json.loads(result.stdout)["checked"]["decisions"]]
    assert "smooth" in actions["--smooth"] and "smooth" not in actions["--no-smooth"]
