"""Layer debugging on a model with one deliberately INT8-hostile layer (huge activation outliers at fc3's input)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from eval_helpers import HOSTILE, MLP_LAYERS, mlp_fp32, mlp_inputs, quantize_max, run_float

import trtkit
from trtkit import metrics


@pytest.fixture(scope="module")
def hostile_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    fp32 = mlp_fp32(folder / "mlp.onnx")
    x = mlp_inputs(64)
    np.save(folder / "x.npy", x)
    return fp32, quantize_max(fp32, folder / "mlp.int8.onnx", {"x": x}), folder / "x.npy", x


def test_hostile_layer_ranked_first_and_search_keeps_exactly_it(hostile_pair, tmp_path):
    fp32, qdq, x_path, x = hostile_pair
    target = 25.0
    result = run_cli("eval", "layers", str(fp32), str(qdq), "--data", str(x_path), "-O", f"target_sqnr={target}",
                     "--json", "-o", str(tmp_path / "layers.json"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert data["layers"] == list(MLP_LAYERS)
    assert data["offenders"][0] == HOSTILE
    assert data["sensitivity"][0]["node"] == HOSTILE
    # every layer but the hostile one is harmless alone
    assert all(item["sqnr_db"] > target for item in data["sensitivity"][1:])
    assert data["search"]["met"] is True
    assert data["exclude"] == [HOSTILE]
    assert f"--exclude {HOSTILE}" in result.stderr
    # The per-tensor table is in graph order and names the ONNX nodes.
    nodes = [row["node"] for row in data["tensors"]]
    assert nodes.index("fc1") < nodes.index("fc2") < nodes.index(HOSTILE) < nodes.index("fc4")
    # Check the claim independently: hand-edit the QDQ model to feed fc3 with float inputs and weights.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == HOSTILE)
    node.input[0] = "act2"
    node.input[1] = "fc3.weight"
    model.graph.initializer.append(numpy_helper.from_array(
        (inits["fc3.weight_int8"].astype(np.float32) * inits["fc3.weight_scale"]).astype(np.float32), "fc3.weight"))
    onnx.save(model, str(tmp_path / "mixed.onnx"))
    ref = run_float(fp32, {"x": x})["y"]
    mixed = run_float(tmp_path / "mixed.onnx", {"x": x})["y"]
    full = run_float(qdq, {"x": x})["y"]
    assert metrics.sqnr_db(ref, full) < target <= metrics.sqnr_db(ref, mixed)
    assert data["search"]["sqnr_db"] == pytest.approx(metrics.sqnr_db(ref, mixed), abs=1e-3)


def test_leave_one_out_and_cosine_target(hostile_pair):
    fp32, qdq, x_path, _ = hostile_pair
    result = trtkit.evaluate("layers", [fp32, qdq], data=str(x_path), sensitivity="leave-one-out",
                             target_cosine=0.999)
    assert result.data["sensitivity"][0]["node"] == HOSTILE
    assert result.data["sensitivity"][0]["gain_db"] > 20
    assert result.data["exclude"] == [HOSTILE]
    assert result.passed


def test_unreachable_target_fails_the_gate(hostile_pair):
    fp32, qdq, x_path, _ = hostile_pair
    result = run_cli("eval", "layers", str(fp32), str(qdq), "--data", str(x_path), "-O", "sensitivity=none",
                     "-O", "target_sqnr=1000", "--json")
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["data"]["search"]["met"] is False


def test_layers_bad_input(hostile_pair):
    fp32, qdq, x_path, _ = hostile_pair
    for args, needle in (
        ((str(fp32),), "exactly two models"),
        ((str(fp32), str(fp32)), "no quantized layer"),
        ((str(fp32), str(qdq), "-O", "output=z"), "unknown output 'z'"),
        ((str(fp32), str(qdq), "-O", "sensitivity=bisect"), "must be one of"),
    ):
        result = run_cli("eval", "layers", *args, "--data", str(x_path))
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr, (args, result.stderr)


def test_search_closes_the_loop_with_trtkit_quantize(hostile_pair, tmp_path):
    """Real calibrate + quantize; the emitted exclude list, fed back to quantize, meets the target."""
    fp32, _, x_path, _ = hostile_pair
    scales = trtkit.calibrate(fp32, str(x_path), method="minmax", progress=False)
    trtkit.quantize(fp32, scales, output=tmp_path / "q.onnx")
    target = 25.0
    layers = trtkit.evaluate("layers", [fp32, tmp_path / "q.onnx"], data=str(x_path), target_sqnr=target)
    assert layers.data["offenders"][0] == HOSTILE
    assert layers.data["exclude"] == [HOSTILE]
    trtkit.quantize(fp32, scales, output=tmp_path / "mixed.onnx", exclude=layers.data["exclude"])
    gate = trtkit.evaluate("accuracy", [fp32, tmp_path / "mixed.onnx"], data=str(x_path), min_sqnr=target)
    assert gate.passed, gate.summary
    full = trtkit.evaluate("accuracy", [fp32, tmp_path / "q.onnx"], data=str(x_path), min_sqnr=target)
    assert not full.passed
