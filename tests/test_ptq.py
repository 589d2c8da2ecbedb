"""Beyond plain PTQ, measured on a real depthwise-separable digits classifier with the real failure case.

The model is trained here (seconds) on scikit-learn digits. Three depthwise filters are zero-sum edge
detectors whose BN-folded weights end up 30-80x larger than their neighbours (the next 1x1 conv compensates,
so the FP32 function is unchanged): per-tensor INT8 activations after that depthwise conv lose most of the
signal. INT8 is judged with Q/DQ emulated in float (what TensorRT computes), by SQNR of the logits against
the FP32 model on held-out digits.
"""

from __future__ import annotations

import numpy as np
import pytest

from trtkit import bias_correct, equalize
from trtkit.errors import InputFileError, OptionError
from trtkit.examples.digits import EDGE_CHANNELS, train_edge_filter_cnn
from trtkit.metrics import sqnr_db
from trtkit.model import ModelArtifact
from trtkit.runtime import run, session


@pytest.fixture(scope="module")
def ds_onnx(digits_data, tmp_path_factory):
    torch = pytest.importorskip("torch")
    x_train, y_train, _, _ = digits_data
    pytest.importorskip("torch")
    model = train_edge_filter_cnn(x_train, y_train)
    path = tmp_path_factory.mktemp("ptq") / "dsconv.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}},
                      opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def measured(ds_onnx, digits_data):
    """SQNR (dB) of plain PTQ, + equalization, + bias correction on held-out digits."""
    from trtkit.calibration import calibrate
    from trtkit.plugins.qdq.insert import quantize

    x_train, _, x_test, y_test = digits_data
    calib = {"image": x_train[:128]}
    fp32 = ModelArtifact.load(ds_onnx)
    reference = run(session(fp32), {"image": x_test})["logits"]

    def ptq(model: ModelArtifact) -> ModelArtifact:
        return quantize(model, calibrate(model, calib, method="minmax", progress=False))

    def score(model: ModelArtifact) -> tuple[float, float]:
        logits = run(session(model), {"image": x_test})["logits"]
        return sqnr_db(reference, logits), float((logits.argmax(1) == y_test).mean())

    plain = ptq(fp32)
    equalized_fp32, eq_report = equalize(fp32)
    equalized = ptq(equalized_fp32)
    # per-layer fallback: the 1x1 conv reading the depthwise output keeps a float input
    pointwise = [n for n in fp32.model.graph.node if n.op_type == "Conv"][2].name
    fallback = quantize(fp32, calibrate(fp32, calib, method="minmax", progress=False), exclude=[pointwise])
    plain_bc, plain_bc_report = bias_correct(plain, fp32, calib)
    equalized_bc, eq_bc_report = bias_correct(equalized, equalized_fp32, calib)
    return {
        "fp32": (float("inf"), float((reference.argmax(1) == y_test).mean())),
        "plain": score(plain), "eq": score(equalized), "fallback": score(fallback), "plain+bc": score(plain_bc), "eq+bc": score(equalized_bc),
        "eq_report": eq_report, "bc_reports": (plain_bc_report, eq_bc_report),
        "artifacts": {"fp32": fp32, "plain": plain, "eq_fp32": equalized_fp32, "eq": equalized,
                      "eq+bc": equalized_bc},
    }


def test_failure_case_is_real(measured, ds_onnx):
    """The edge filters are 30-80x their neighbours after BN folding, and plain PTQ loses the signal."""
    fp32 = measured["artifacts"]["fp32"]
    depthwise = [n for n in fp32.model.graph.node if n.op_type == "Conv"][1]
    ranges = np.abs(fp32.tensor(depthwise.input[1])).max(axis=(1, 2, 3))
    others = np.delete(ranges, EDGE_CHANNELS)
    assert ranges[list(EDGE_CHANNELS)].min() > 10 * np.median(others)
    kernels = fp32.tensor(depthwise.input[1])[list(EDGE_CHANNELS), 0]
    np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 0.0, atol=1e-4 * np.abs(kernels).max())
    assert measured["plain"][0] < 15.0  # most of the signal lost
    assert measured["fp32"][1] > 0.85


def test_equalization_recovers_int8_sqnr(measured):
    plain, eq = measured["plain"][0], measured["eq"][0]
    assert eq > plain + 10.0, (plain, eq)
    assert eq > 25.0
    assert measured["eq"][1] >= measured["fp32"][1] - 0.02  # INT8 accuracy back within 2 points
    pair = next(p for p in measured["eq_report"].pairs if p.second.endswith("Conv") and p.range_ratio_before > 50)
    assert pair.range_ratio_after < 5


def test_per_layer_fallback_also_recovers(measured):
    """The alternative to equalization: leave the layer after the depthwise conv in float."""
    assert measured["fallback"][0] > measured["plain"][0] + 10.0, (measured["plain"], measured["fallback"])


def test_bias_correction_improves_sqnr(measured):
    assert measured["plain+bc"][0] > measured["plain"][0] + 1.0, (measured["plain"], measured["plain+bc"])
    assert measured["eq+bc"][0] >= measured["eq"][0] - 0.1, (measured["eq"], measured["eq+bc"])
    for report in measured["bc_reports"]:
        assert len(report.layers) == 6  # every Conv and the Gemm
        before = sum(layer.shift_before for layer in report.layers)
        after = sum(layer.shift_after for layer in report.layers)
        assert after < 0.2 * before  # the mean shift on the calibration data is (nearly) gone


def test_bias_correction_changes_only_biases(measured):
    eq, corrected = measured["artifacts"]["eq"], measured["artifacts"]["eq+bc"]
    weights_before = {t.name: eq.tensor(t) for t in eq.model.graph.initializer}
    changed = [t.name for t in corrected.model.graph.initializer
               if t.name not in weights_before or not np.array_equal(corrected.tensor(t), weights_before[t.name])]
    bias_inputs = {n.input[2] for n in corrected.model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}
    assert changed and set(changed) <= bias_inputs
    assert [n.op_type for n in corrected.model.graph.node] == [n.op_type for n in eq.model.graph.node]
    assert corrected.metadata["ptq"]["bias_correct"]["layers"] == 6


def test_bias_correction_errors(measured, digits_data):
    art = measured["artifacts"]
    calib = {"image": digits_data[0][:16]}
    with pytest.raises(InputFileError, match="no Q/DQ"):
        bias_correct(art["fp32"], art["fp32"], calib)
    with pytest.raises(InputFileError, match="FP32"):
        bias_correct(art["plain"], art["plain"], calib)
    with pytest.raises(OptionError, match="reference"):
        bias_correct(art["plain"], "", calib)


def test_passes_through_the_cli(ds_onnx, measured, digits_data, tmp_path):
    """`trtkit optimize --pass equalize` (numerically checked by the core) and `--pass bias-correct`."""
    import json

    from conftest import run_cli

    out = tmp_path / "eq.onnx"
    done = run_cli("optimize", str(ds_onnx), "-o", str(out), "--pass", "equalize", "--json")
    assert done.returncode == 0, done.stderr
    equalized = ModelArtifact.load(out)
    assert equalized.metadata["ptq"]["equalize"]["pairs"] >= 4
    assert json.loads(done.stdout)

    qdq_path = tmp_path / "plain.onnx"
    measured["artifacts"]["plain"].save(qdq_path)
    np.savez(tmp_path / "calib.npz", image=digits_data[0][:64])
    corrected = tmp_path / "bc.onnx"
    done = run_cli("optimize", str(qdq_path), "-o", str(corrected), "--pass", "bias-correct",
                   "-O", f"reference={ds_onnx}", "-O", f"data={tmp_path / 'calib.npz'}")
    assert done.returncode == 0, done.stderr
    assert ModelArtifact.load(corrected).metadata["ptq"]["bias_correct"]["layers"] == 6
    missing = run_cli("optimize", str(qdq_path), "-o", str(tmp_path / "x.onnx"), "--pass", "bias-correct")
    assert missing.returncode == 2 and "reference" in missing.stderr


def test_bias_correction_of_matmul_add_layers(tmp_path):
    """Transformer-style MatMul -> Add(bias) layers: the Add's constant is corrected."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from trtkit.calibration import calibrate
    from trtkit.plugins.qdq.insert import quantize

    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((16, 32)).astype(np.float32) * 0.3,
             "b1": rng.standard_normal(32).astype(np.float32),
             "w2": rng.standard_normal((32, 8)).astype(np.float32) * 0.3,
             "b2": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu"),
             helper.make_node("MatMul", ["a1", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["b2", "m2"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    fp32 = ModelArtifact.from_model(model)
    # skewed inputs with outliers: percentile clipping leaves a biased error
    data = {"x": (rng.standard_normal((64, 4, 16)) * 0.5 + rng.exponential(1.0, (64, 4, 16)) ** 2).astype(np.float32)}
    quantized = quantize(fp32, calibrate(fp32, data, method="percentile", options={"percentile": 99.0},
                                         progress=False))
    corrected, report = bias_correct(quantized, fp32, data)
    assert {layer.node for layer in report.layers} == {"fc1", "fc2"}
    assert all(layer.shift_after < layer.shift_before for layer in report.layers)
    changed = {t.name for t in corrected.model.graph.initializer
               if t.name in ("b1", "b2") and not np.array_equal(corrected.tensor(t), fp32.tensor(t.name))}
    assert changed == {"b1", "b2"}
    test = {"x": (rng.standard_normal((64, 4, 16)) * 0.5 + rng.exponential(1.0, (64, 4, 16)) ** 2).astype(np.float32)}
    reference = run(session(fp32), test)["y"]
    assert sqnr_db(reference, run(session(corrected), test)["y"]) > sqnr_db(reference, run(session(quantized), test)["y"])
