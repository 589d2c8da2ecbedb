"""Calibration data that cannot be right (issue 17 item 5): integer data for a float input is refused unless
cast is asked for (--cast, recipe `cast = true`); constant samples (all-zero arrays, blank frames) are named
in one warning line. One implementation (trtkit.data) for every command that reads data."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import run_cli  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtkit.data import load_data  # noqa: E402
from trtkit.errors import DataError  # noqa: E402


@pytest.fixture
def float_model(tmp_path):
    weight = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    return path


def test_integer_data_for_a_float_input_is_refused_unless_cast(float_model):
    zeros = np.zeros((8, 4), np.int32)
    with pytest.raises(DataError, match=r"input 'x' is int32 data for a float32 model input.*--cast") as caught:
        load_data({"x": zeros}, float_model)
    assert "\n" not in str(caught.value)
    batches = list(load_data({"x": zeros}, float_model, cast=True).batches())
    assert batches[0]["x"].dtype == np.float32


def test_constant_samples_are_named_in_one_warning(float_model, capsys):
    data = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    data[[3, 7]] = 0.0
    data[8] = 2.5
    source = load_data({"x": data}, float_model, batch_size=4)
    for _ in range(2):  # read twice (as two-pass calibrators do): still one warning
        list(source.batches())
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "input 'x'" in warnings[0] and "3 of 10" in warnings[0] and "samples 3, 7, 8" in warnings[0]


def test_varied_data_gives_no_warning(float_model, capsys):
    list(load_data({"x": np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)}, float_model).batches())
    assert "warning" not in capsys.readouterr().err


def test_calibrate_cli_refuses_int_zeros_and_casts_with_the_flag(float_model, tmp_path):
    data = tmp_path / "zeros.npz"
    np.savez(data, x=np.zeros((16, 4), np.int32))
    refused = run_cli("calibrate", str(float_model), "--data", str(data), "-o", str(tmp_path / "s.json"))
    assert refused.returncode == 2 and not (tmp_path / "s.json").exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "'x'" in lines[0] and "--cast" in lines[0]

    cast = run_cli("calibrate", str(float_model), "--data", str(data), "-o", str(tmp_path / "s.json"), "--cast",
                   "--json")
    assert cast.returncode == 0, cast.stderr
    assert json.loads(cast.stdout)["output"] == str(tmp_path / "s.json")
    warnings = [line for line in cast.stderr.splitlines() if line.startswith("warning:")]
    assert any("input 'x'" in w and "16 of 16" in w for w in warnings)


def test_recipe_takes_cast(tmp_path, float_model):
    from trtkit.recipe import load_recipe

    (tmp_path / "calib.npz").write_bytes(b"")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nonnx = "{float_model.name}"\n[calibration]\ndata = "calib.npz"\ncast = true\n')
    assert load_recipe(recipe).section("calibration")["cast"] is True
    recipe.write_text(f'[model]\nonnx = "{float_model.name}"\n[calibration]\ndata = "calib.npz"\ncast = "yes"\n')
    with pytest.raises(Exception, match="cast"):
        load_recipe(recipe)
