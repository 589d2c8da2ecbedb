"""Folds that bring `trtkit optimize` to onnxslim's node count on real exported models (issue 17 item 2):
MatMul + bias Add -> Gemm (a Paddle mobile classifier's head), Unsqueeze -> Unsqueeze merged (a MiniLM
attention mask), and Paddle's dim_value -1 accepted as a dynamic dim by `simplify.input_shapes`.
Real onnx.helper models, real onnxruntime, the numerical check on."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtkit.model import ModelArtifact  # noqa: E402
from trtkit.optimizing import optimize  # noqa: E402
from trtkit.runtime import run, session  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return ModelArtifact.from_model(model)


def _outputs(artifact, feeds):
    return run(session(artifact, optimization="disable"), feeds)


def ops(artifact):
    return [node.op_type for node in artifact.model.graph.node]


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5)])
def test_matmul_bias_add_becomes_one_gemm(bias_shape):
    rng = np.random.default_rng(0)
    art = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["b", "h"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["y"], axis=1)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                 [numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "w"),
                  numpy_helper.from_array(rng.normal(size=bias_shape).astype(np.float32), "b")])
    result = optimize(art)
    assert ops(result.artifact) == ["Gemm", "Softmax"]
    feeds = {"x": rng.normal(size=(2, 8)).astype(np.float32) * 10}
    np.testing.assert_allclose(_outputs(result.artifact, feeds)["y"], _outputs(art, feeds)["y"], rtol=1e-6, atol=1e-7)


def test_matmul_add_left_alone_when_not_a_row_bias_or_not_2d():
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "w")
    full = numpy_helper.from_array(rng.normal(size=(2, 3, 5)).astype(np.float32), "b")
    art = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])], [w, full])
    assert ops(optimize(art).artifact) == ["MatMul", "Add"]


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize(("first", "second"), [([1], [2]), ([0], [-1]), ([-1], [0, 3]), ([1, 2], [1])])
def test_unsqueeze_chain_merges_into_one(opset, first, second):
    def unsqueeze(inp, out, axes, name):
        if opset < 13:
            return [helper.make_node("Unsqueeze", [inp], [out], axes=axes)], []
        return ([helper.make_node("Unsqueeze", [inp, name], [out])],
                [numpy_helper.from_array(np.array(axes, np.int64), name)])

    n1, i1 = unsqueeze("m", "u1", first, "a1")
    n2, i2 = unsqueeze("u1", "u2", second, "a2")
    rank = 2 + len(first) + len(second)
    art = _model([helper.make_node("Sub", ["one", "x"], ["m"]), *n1, *n2, helper.make_node("Mul", ["u2", "k"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])],
                 [numpy_helper.from_array(np.float32(1), "one"), numpy_helper.from_array(np.float32(-3), "k"), *i1, *i2],
                 opset=opset)
    result = optimize(art)
    assert ops(result.artifact).count("Unsqueeze") == 1
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    got, ref = _outputs(result.artifact, feeds)["y"], _outputs(art, feeds)["y"]
    assert got.shape == ref.shape and got.ndim == rank
    np.testing.assert_array_equal(got, ref)


def test_input_shapes_accepts_paddles_minus_one_dim():
    """Paddle2ONNX writes a dynamic batch as dim_value -1; fixing it to 1 is allowed (a positive mismatch
    is still refused)."""
    art = _model([helper.make_node("Relu", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "h", "w"])])
    result = optimize(art, [("simplify", {"input_shapes": {"x": [1, 3, 4, 4]}})])
    dims = [d.dim_value for d in result.artifact.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 4, 4]
    from trtkit.errors import OptionError

    with pytest.raises(OptionError, match="static shape"):
        optimize(art, [("simplify", {"input_shapes": {"x": [1, 4, 4, 4]}})])


def _constants(model):
    """name -> value of every initializer and Constant node output of the main graph."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def test_conv_batchnorm_mul_add_chain_is_rounded_once():
    """Issue 17 item 3: a Conv -> BatchNorm -> Mul -> Add chain (Paddle exports, weights as Constant nodes) is
    folded one node at a time, but the folded bias is the float64 result of the whole chain rounded to float32
    once, bit for bit (rounding after each fold drifted the PP-OCRv4 text detector's map by 5e-5 of its range in
    float64 evaluation, against 2e-5 for one rounding); the weight is within one ulp of that (rounded per fold,
    so that no float64 copy of every weight is held)."""
    rng = np.random.default_rng(17)
    c_out, c_in = 64, 8
    w = rng.normal(size=(c_out, c_in, 3, 3)).astype(np.float32)
    b = rng.normal(size=c_out).astype(np.float32)
    gamma, beta, mean = (rng.normal(size=c_out).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2.0, size=c_out).astype(np.float32)
    s = rng.uniform(0.3, 3.0, size=(1, c_out, 1, 1)).astype(np.float32)
    a = rng.normal(size=(1, c_out, 1, 1)).astype(np.float32)
    eps = 1e-3
    consts = {"w": w, "b": b, "gamma": gamma, "beta": beta, "mean": mean, "var": var, "s": s, "a": a}
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))
             for name, value in consts.items()]
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"], epsilon=eps),
              helper.make_node("Mul", ["bn", "s"], ["scaled"]), helper.make_node("Add", ["scaled", "a"], ["shifted"]),
              helper.make_node("Relu", ["shifted"], ["y"])]
    art = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 6, 6])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, 6, 6])])

    result = optimize(art)

    assert ops(result.artifact) == ["Conv", "Relu"]
    conv = result.artifact.model.graph.node[0]
    values = _constants(result.artifact.model)
    # the same float64 arithmetic as the folds, rounded once at the end
    bn_scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(np.float32(eps)))
    s64, a64 = s.reshape(-1).astype(np.float64), a.reshape(-1).astype(np.float64)
    w_exact = w.astype(np.float64) * bn_scale.reshape(-1, 1, 1, 1) * s64.reshape(-1, 1, 1, 1)
    b_exact = ((b.astype(np.float64) - mean) * bn_scale + beta) * s64 + a64
    np.testing.assert_array_max_ulp(values[conv.input[1]], w_exact.astype(np.float32), maxulp=1)
    assert np.array_equal(values[conv.input[2]], b_exact.astype(np.float32))
    feeds = {"x": rng.normal(size=(1, c_in, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_outputs(result.artifact, feeds)["y"], _outputs(art, feeds)["y"], rtol=1e-5, atol=1e-5)
