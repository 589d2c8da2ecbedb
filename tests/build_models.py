"""Small real ONNX models for the builder tests, made with onnx.helper (deterministic, no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 16


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fp32_conv(path: Path, batch: int | str = "N", spatial: int | str = 8, seed: int = 0) -> Path:
    """Conv(3x3, 16 -> 16) + bias + Relu + GlobalAveragePool; input 'x' [batch, 16, spatial, spatial]."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.1
    bias = rng.standard_normal(CHANNELS).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu0"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool0"),
    ]
    graph = helper.make_graph(
        nodes, "fp32_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CHANNELS, spatial, spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CHANNELS, 1, 1])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def qdq_conv(path: Path, batch: int | str = "N", seed: int = 0, input_amax: float = 2.0) -> Path:
    """TensorRT-style QDQ Conv: int8 activations (per-tensor, zero point 0) and per-channel int8 weights.

    Weights are large and share a sign per output channel, and inputs are positive: the case where
    onnxruntime's u8 x s8 kernels saturate on CPUs without VNNI.
    """
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((CHANNELS, 1, 1, 1)) < 0.5, -1.0, 1.0)
    weight = (rng.uniform(0.2, 1.0, (CHANNELS, CHANNELS, 3, 3)) * signs).astype(np.float32)
    w_scale = (np.abs(weight).reshape(CHANNELS, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(weight / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(w_q, "W_q"),
        numpy_helper.from_array(w_scale, "W_scale"),
        numpy_helper.from_array(np.zeros(CHANNELS, np.int8), "W_zero"),
        numpy_helper.from_array(np.array(input_amax / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.array(0.5, np.float32), "c_scale"),
        numpy_helper.from_array(rng.standard_normal(CHANNELS).astype(np.float32), "B"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W_dq"], name="W_dequant", axis=0),
        helper.make_node("Conv", ["x_dq", "W_dq", "B"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "c_scale", "zero"], ["c_q"], name="c_quant"),
        helper.make_node("DequantizeLinear", ["c_q", "c_scale", "zero"], ["y"], name="c_dequant"),
    ]
    graph = helper.make_graph(
        nodes, "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CHANNELS, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CHANNELS, 8, 8])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def custom_op(path: Path) -> Path:
    """Relu -> FooBar (custom domain, no TensorRT importer) -> Relu -> Bar2 (another unknown op)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_a"),
        helper.make_node("FooBar", ["a"], ["b"], name="my_foo", domain="custom.ops"),
        helper.make_node("Relu", ["b"], ["c"], name="relu_c"),
        helper.make_node("Bar2", ["c"], ["y"], name="my_bar", domain="custom.ops"),
    ]
    graph = helper.make_graph(
        nodes, "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    onnx.save(model, str(path))
    return path


def positive_inputs(seed: int = 1, batch: int = 4, amax: float = 2.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(0, amax, (batch, CHANNELS, 8, 8)).astype(np.float32)}
