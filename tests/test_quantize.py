"""End to end on the digits CNN (trained in the test session on scikit-learn's real digits): INT8 accuracy,
the command line, TensorRT (tensorrt_rtx) build, and why onnxruntime's fused int8 kernels are judged apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

import trtkit
from trtkit.examples.digits import INPUT_NAME, accuracy
from trtkit.plugins.calibrators import DEFAULT_METHOD
from trtkit.runtime import session


@pytest.fixture(scope="module")
def digits(digits_data, digits_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize")
    x_train, _, x_test, y_test = digits_data
    np.save(folder / "calib.npy", x_train[:256])
    logits = session(digits_onnx).run(None, {INPUT_NAME: x_test})[0]
    return folder, digits_onnx, x_train[:256], x_test, y_test, logits


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax", "mse"])
def test_int8_accuracy_within_one_point_of_fp32(digits, method, tmp_path):
    _, model, calib, x_test, y_test, fp32_logits = digits
    scales = trtkit.calibrate(model, calib, method=method, progress=False)
    artifact = trtkit.quantize(model, scales, output=tmp_path / "q.onnx")
    int8_logits = session(tmp_path / "q.onnx").run(None, {INPUT_NAME: x_test})[0]  # Q/DQ emulated in float
    fp32, int8 = accuracy(fp32_logits, y_test), accuracy(int8_logits, y_test)
    assert fp32 > 0.9
    assert int8 >= fp32 - 0.01, (method, fp32, int8)
    agreement = float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean())
    assert agreement > 0.97
    assert len(artifact.metadata["quantization"]["quantized_nodes"]) >= 6


def test_cli_calibrate_then_quantize(digits, tmp_path):
    folder, model, _, x_test, y_test, fp32_logits = digits
    result = run_cli("calibrate", str(model), "--data", str(folder / "calib.npy"), "-o", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    result = run_cli("quantize", str(model), "--scales", str(tmp_path / "s.json"), "-o", str(tmp_path / "q.onnx"),
                     "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == DEFAULT_METHOD == "percentile" and summary["weights"] == 5
    logits = session(tmp_path / "q.onnx").run(None, {INPUT_NAME: x_test})[0]
    assert accuracy(logits, y_test) >= accuracy(fp32_logits, y_test) - 0.01
    # one step: calibrate and quantize together, with an exclusion by op type
    result = run_cli("quantize", str(model), "--data", str(folder / "calib.npy"), "--exclude-op-type", "Gemm",
                     "-o", str(tmp_path / "q2.onnx"), "--json")
    assert result.returncode == 0, result.stderr
    assert "/fc/Gemm" not in json.loads(result.stdout)["quantized_nodes"]
    bad = run_cli("quantize", str(model), "--scales", str(tmp_path / "s.json"), "--exclude", "/stem/stem.0/Cnv",
                  "-o", str(tmp_path / "q3.onnx"))
    assert bad.returncode == 2 and "did you mean: /stem/stem.0/Conv" in bad.stderr
    assert not (tmp_path / "q3.onnx").exists()
    bad = run_cli("quantize", str(model), "-o", str(tmp_path / "q4.onnx"))
    assert bad.returncode == 2 and "--scales" in bad.stderr


def test_digits_qdq_builds_with_tensorrt_rtx(digits, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    from test_qdq import trt_build

    _, model, calib, *_ = digits
    trtkit.quantize(model, trtkit.calibrate(model, calib, progress=False), output=tmp_path / "q.onnx")
    trt_build(tmp_path / "q.onnx", (1, 1, 8, 8), (16, 1, 8, 8), (64, 1, 8, 8))


def _sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    noise = np.sum((reference - other) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-30)))


def test_emulated_vs_fused_kernels(digits, tmp_path):
    """What TensorRT computes is the float emulation; onnxruntime's fused int8 CPU kernels are a separate
    'onnxruntime CPU deployment' figure. With 7-bit weights (reduce_range) both paths agree closely."""
    _, model, calib, x_test, _, fp32_logits = digits
    scales = trtkit.calibrate(model, calib, progress=False)
    trtkit.quantize(model, scales, output=tmp_path / "r.onnx", reduce_range=True)
    emulated = session(tmp_path / "r.onnx", emulate_qdq=True).run(None, {INPUT_NAME: x_test})[0]
    fused = session(tmp_path / "r.onnx", emulate_qdq=False).run(None, {INPUT_NAME: x_test})[0]
    assert _sqnr(fp32_logits, emulated) > 15
    assert _sqnr(emulated, fused) > 20  # reduced range: no int16 pair-sum saturation in the fused kernels
