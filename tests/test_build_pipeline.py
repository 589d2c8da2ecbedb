"""Builders on QDQ models made by trtkit's own pipeline (calibrate + quantize) from the digits CNN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import trtkit
from trtkit.building import check
from trtkit.examples.digits import accuracy
from trtkit.model import ModelArtifact
from trtkit.plugins.onnxruntime_builder import cpu_has_vnni
from trtkit.runtime import run, session


@pytest.fixture(scope="module")
def digits_qdq(digits_onnx, digits_data, tmp_path_factory):
    from trtkit.calibration import calibrate
    from trtkit.plugins.qdq.insert import quantize

    x_train, _, _, _ = digits_data
    scales = calibrate(digits_onnx, {"image": x_train[:256]}, method="entropy", progress=False)
    path = tmp_path_factory.mktemp("pipeline") / "digits_qdq.onnx"
    quantize(digits_onnx, scales, output=path)
    return path


def test_pipeline_qdq_builds_with_tensorrt_rtx(digits_qdq, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    ops = [n.op_type for n in onnx.load(str(digits_qdq)).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    report = check(digits_qdq, builder="tensorrt-rtx")
    assert report["supported"] is True, report["unsupported"]
    static = trtkit.build(digits_qdq, tmp_path / "static.engine", builder="tensorrt-rtx",
                          min_shapes="image:8x1x8x8", max_shapes="image:8x1x8x8")
    dynamic = trtkit.build(digits_qdq, tmp_path / "dynamic.engine", builder="tensorrt-rtx",
                           min_shapes="image:1x1x8x8", opt_shapes="image:32x1x8x8", max_shapes="image:128x1x8x8")
    for engine in (static, dynamic):
        info = json.loads((engine.parent / (engine.name + ".json")).read_text())
        assert info["precision"]["qdq"] is True and info["inputs"][0]["name"] == "image"
    assert json.loads((tmp_path / "dynamic.engine.json").read_text())["profiles"][0]["image"]["max"] == [128, 1, 8, 8]


def test_pipeline_qdq_onnxruntime_build_keeps_accuracy(digits_qdq, digits_onnx, digits_data, tmp_path):
    _, _, x_test, y_test = digits_data
    feeds = {"image": x_test}
    fp32 = accuracy(run(session(digits_onnx), feeds)["logits"], y_test)
    emulated = accuracy(run(session(digits_qdq), feeds)["logits"], y_test)  # what TensorRT computes
    built = trtkit.build(digits_qdq, tmp_path / "digits_qdq.ort.onnx")
    fused = accuracy(run(session(built, emulate_qdq=False), feeds)["logits"], y_test)
    build_info = ModelArtifact.load(built).metadata["build"]
    assert emulated >= fp32 - 0.02
    assert fused >= emulated - 0.02, (fp32, emulated, fused, build_info)
    if cpu_has_vnni() is False:
        assert build_info["requantized_weights"] >= 3
    logits = run(session(built, emulate_qdq=False), {"image": x_test[:8]})["logits"]
    assert np.isfinite(logits).all()
