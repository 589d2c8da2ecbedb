"""Regression tests for reliability bugs found by the fuzz and bad-input tests (one small real model each).

Tests marked xfail(strict=True) document a bug in another stage's code that is not fixed yet: the reason names
the file and the fault, and the test starts failing (XPASS) as soon as it is fixed, so the mark gets removed.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def single_conv(tmp_path, name: str = "conv.onnx"):  # type: ignore[no-untyped-def]
    """x -> Conv -> y: the only activation to calibrate is the graph input itself."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_calibrate_model_whose_only_activation_is_the_input(tmp_path):
    """Found by the fuzz test: with only graph inputs to observe, sess.run([]) returned every output and the
    statistics zip crashed (fixed in core/calibration.py, ab69350)."""
    from trtkit.calibration import calibrate

    model = single_conv(tmp_path)
    data = np.random.default_rng(1).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)
    scales = calibrate(model, data, method="minmax", progress=False)
    assert scales["x"] == pytest.approx(float(np.abs(data).max()), rel=1e-6)


def test_calibrate_cli_on_single_conv_model(tmp_path):
    model = single_conv(tmp_path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32))
    result = run_cli("calibrate", str(model), "-d", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.json").is_file()


def test_calibrate_rejects_preprocess_options_it_cannot_use(tmp_path):
    """--preprocess was once silently ignored (even resize=abc) for .npy data."""
    model = single_conv(tmp_path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32))
    result = run_cli("calibrate", str(model), "-d", str(tmp_path / "calib.npy"), "-P", "resize=abc",
                     "-o", str(tmp_path / "s.json"))
    assert result.returncode == 2 and "resize" in result.stderr, result.stderr
    assert not (tmp_path / "s.json").exists()


def test_optimize_list_needs_no_model():
    result = run_cli("optimize", "--list")
    assert result.returncode == 0, result.stderr
    assert "simplify" in result.stdout + result.stderr
