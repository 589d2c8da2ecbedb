"""The `recenter` pass (plugins/ptq/recenter.py): one-sided activations of a Q/DQ model shifted onto
[-amax/2, amax/2]. On an onnx.helper model with seeded weights and data (toy numbers, real code paths): the
rewritten model computes exactly what the original computes once activation quantization is taken away, its
quantized tensors get half the step, and chains it cannot shift exactly are left alone with the reason."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

import trtkit
from trtkit.errors import InputFileError
from trtkit.metrics import sqnr_db
from trtkit.plugins.ptq.recenter import activations_in_float, recenter
from trtkit.runtime import session


def chain_model(path):
    """x -> Conv 3x3 (pads 1) -> Clip(0, 6) -> Conv 1x1 -> Relu -> Pad 1 -> Conv 3x3 (no pads) -> Relu
    -> Conv 3x3 (pads 1: implicit zero padding) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB) -> y"""
    rng = np.random.default_rng(3)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (8, 4, 3, 3)), init("b1", (8,), 0.5), init("w2", (8, 8, 1, 1)), init("w3", (8, 8, 3, 3), 0.2),
             init("b3", (8,), 0.2), init("w4", (8, 8, 3, 3), 0.2), init("wg", (5, 8)), init("bg", (5,), 0.1),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "zero", "six"], ["a1"], name="relu6_1"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2_1x1"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Pad", ["a2", "pads"], ["p2"], name="pad2"),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], name="conv3_padded"),
        helper.make_node("Relu", ["c3"], ["a3"], name="relu3"),
        helper.make_node("Conv", ["a3", "w4"], ["c4"], name="conv4_implicit_pads", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c4"], ["a4"], name="relu4"),
        helper.make_node("GlobalAveragePool", ["a4"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def without_activation_qdq(path, out):
    """The model with every activation Q -> DQ pair bypassed: its float arithmetic, weights still int8."""
    onnx.save(activations_in_float(onnx.load(path)), out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recenter")
    model = chain_model(folder / "model.onnx")
    rng = np.random.default_rng(7)
    calib = rng.uniform(0, 1, (32, 4, 8, 8)).astype(np.float32)
    scales = trtkit.calibrate(model, calib, method="minmax", progress=False)
    qdq = trtkit.quantize(model, scales, output=folder / "int8.onnx")
    return folder, model, qdq, rng.uniform(0, 1, (16, 4, 8, 8)).astype(np.float32)


def _run(path, x):
    return session(path, emulate_qdq=True).run(None, {"x": x})[0]


def test_recenter_is_exact_in_float_and_shifts_only_exact_chains(setup):
    folder, model, qdq, x = setup
    shifted, report = recenter(qdq)
    shifted.save(folder / "shifted.onnx")
    assert sorted(s["tensor"] for s in report.shifted) == ["a1", "p2"]
    assert "implicit zero padding" in report.skipped["a3"]
    plain = _run(without_activation_qdq(folder / "int8.onnx", folder / "plain-float.onnx"), x)
    moved = _run(without_activation_qdq(folder / "shifted.onnx", folder / "shifted-float.onnx"), x)
    np.testing.assert_allclose(moved, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    recorded = shifted.metadata["ptq"]["recenter"]
    assert len(recorded["shifted"]) == 2 and recorded["max_abs_diff"] < 1e-4 * np.abs(plain).max()
    assert recorded == report.as_dict()


def _quantization_error(path, x):
    """Per quantized activation tensor: rms of (its value - its dequantized value) on x."""
    model = onnx.load(path)
    weights = {t.name for t in model.graph.initializer}
    pairs = {q.input[0]: d.output[0] for q in model.graph.node if q.op_type == "QuantizeLinear"
             and q.input[0] not in weights for d in model.graph.node
             if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]}
    names = [*pairs, *pairs.values()]
    run = session(path, extra_outputs=names)
    values = dict(zip([o.name for o in run.get_outputs()], run.run(None, {"x": x}), strict=True))
    return {name: float(np.sqrt(np.mean((values[name] - values[dq]) ** 2))) for name, dq in pairs.items()}


def test_recenter_halves_the_step_and_the_quantization_error(setup):
    folder, model, qdq, x = setup
    shifted, report = recenter(qdq)
    graph = shifted.model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in qdq.model.graph.initializer}
    q_before = {n.input[0]: before[n.input[1]] for n in qdq.model.graph.node if n.op_type == "QuantizeLinear"}
    q_after = {n.input[0]: values[n.input[1]] for n in graph.node if n.op_type == "QuantizeLinear"}
    for entry in report.shifted:
        assert q_after[entry["tensor"]] == pytest.approx(q_before[entry["tensor"]] / 2)
    shifted.save(folder / "shifted.onnx")
    error_before = _quantization_error(folder / "int8.onnx", x)
    error_after = _quantization_error(folder / "shifted.onnx", x)
    for name in ("a1", "p2"):
        assert error_after[name] < 0.6 * error_before[name]
    assert error_after["a3"] == pytest.approx(error_before["a3"], rel=0.1)  # not shifted (implicit padding)
    # The whole model's error moves too, but need not fall on a toy: the checked quantize path measures it.
    reference = session(model).run(None, {"x": x})[0]
    assert sqnr_db(reference, _run(folder / "shifted.onnx", x)) > 30.0


def test_recenter_is_deterministic_and_leaves_its_input_alone(setup):
    folder, model, qdq, x = setup
    path = folder / "int8.onnx"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    first, _ = recenter(str(path))
    second, _ = recenter(str(path))
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_recenter_only_on_some_tensors_and_refuses_a_float_model(setup):
    folder, model, qdq, x = setup
    _, report = recenter(qdq, tensors=["p2"])
    assert [s["tensor"] for s in report.shifted] == ["p2"]
    with pytest.raises(InputFileError, match="no Q/DQ nodes"):
        recenter(model)


def test_recenter_pass_on_the_cli_and_tensorrt_rtx_parses_it(setup, tmp_path):
    folder, model, qdq, x = setup
    out = tmp_path / "shifted.onnx"
    result = run_cli("optimize", str(folder / "int8.onnx"), "-o", str(out), "--pass", "recenter")
    assert result.returncode == 0, result.stderr
    assert "recenter: 2 activations" in result.stdout + result.stderr
    trt = pytest.importorskip("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(out.read_bytes()), [parser.get_error(i).desc() for i in range(parser.num_errors)]


def test_checked_quantize_tries_recentring_after_rounding_and_can_be_told_not_to(setup, tmp_path):
    from trtkit.plugins.qdq.target import quantize_checked

    folder, model, qdq, x = setup
    calib = np.random.default_rng(8).uniform(0, 1, (24, 4, 8, 8)).astype(np.float32)
    scales = trtkit.calibrate(model, calib, method="minmax", progress=False)
    artifact, report = quantize_checked(model, scales, calib)
    actions = [d.action for d in report.decisions]
    assert actions.index("adaptive-round") < actions.index("recenter")
    decision = report.decisions[actions.index("recenter")]
    assert decision.what == "2 ReLU/ReLU6 activations"
    kept = decision.why.startswith("kept")
    assert kept == (decision.after > decision.before)  # kept exactly when the held-out SQNR improved
    assert ("recenter" in artifact.metadata.get("ptq", {})) == kept
    _, without = quantize_checked(model, scales, calib, recenter=False)
    assert "recenter" not in [d.action for d in without.decisions]
    np.save(tmp_path / "calib.npy", calib)
    result = run_cli("quantize", str(model), "--data", str(tmp_path / "calib.npy"), "--no-recenter",
                     "-o", str(tmp_path / "q.onnx"), "--json")
    assert result.returncode == 0, result.stderr
    assert "recenter" not in result.stdout
