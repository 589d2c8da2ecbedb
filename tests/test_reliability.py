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


@pytest.mark.xfail(strict=True, reason=(
    "core/calibration.py collect(): when every observed tensor is a graph input, `fetch` is empty and "
    "sess.run([], feeds) returns all outputs, so zip(fetch, results, strict=True) raises ValueError "
    "(the CLI prints 'internal error', exit 1)"))
def test_calibrate_model_whose_only_activation_is_the_input(tmp_path):
    from trtkit.calibration import calibrate

    model = single_conv(tmp_path)
    data = np.random.default_rng(1).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)
    scales = calibrate(model, data, method="minmax", progress=False)
    assert scales["x"] == pytest.approx(float(np.abs(data).max()), rel=1e-6)


@pytest.mark.xfail(strict=True, reason=(
    "core/calibration.py collect(): same fault through the CLI: `trtkit calibrate` on a one-Conv model "
    "exits 1 with 'internal error: ValueError: zip() argument 2 is longer than argument 1'"))
def test_calibrate_cli_on_single_conv_model(tmp_path):
    model = single_conv(tmp_path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32))
    result = run_cli("calibrate", str(model), "-d", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.json").is_file()
