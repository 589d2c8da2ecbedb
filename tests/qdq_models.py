"""Small real ONNX models (onnx.helper, seeded weights) for the calibration and QDQ tests.

Each builder returns an onnx.ModelProto with a dynamic batch axis; input "x" [N, C, H, W] float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Net:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, group: int = 1, as_constant: bool = False) -> str:
        w = self.rng.normal(0, 1.0 / np.sqrt(cin * k * k / group), size=(cout, cin // group, k, k)).astype(np.float32)
        b = self.rng.normal(0, 0.1, size=cout).astype(np.float32)
        if as_constant:
            self.nodes.append(helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(w, f"{name}_wc")))
        else:
            self.init(f"{name}_w", w)
        self.init(f"{name}_b", b)
        return self.node("Conv", [x, f"{name}_w", f"{name}_b"], name, pads=[k // 2] * 4, group=group)

    def model(self, outputs: list[str], cin: int = 3, hw: int = 8) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
            [onnx.ValueInfoProto(name=o) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        for out in model.graph.output:
            if out.name in inferred:
                out.CopyFrom(inferred[out.name])
        onnx.checker.check_model(model)
        return model


def conv_model(seed: int = 0, cin: int = 3, cout: int = 8, as_constant: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> y"""
    net = _Net(seed)
    h = net.node("Relu", [net.conv("x", cin, cout, "conv1", as_constant=as_constant)], "relu1")
    return net.model([net.conv(h, cout, cout, "conv2", as_constant=as_constant)], cin)


def residual_model(seed: int = 0) -> onnx.ModelProto:
    """x -> conv0 -> relu0 -> conv1 -> relu1 -> conv2 -> Add(conv2, relu0) -> relu2 -> conv3 -> y"""
    net = _Net(seed)
    r0 = net.node("Relu", [net.conv("x", 3, 16, "conv0")], "relu0")
    r1 = net.node("Relu", [net.conv(r0, 16, 16, "conv1")], "relu1")
    c2 = net.conv(r1, 16, 16, "conv2")
    add = net.node("Add", [c2, r0], "add")
    r2 = net.node("Relu", [add], "relu2")
    return net.model([net.conv(r2, 16, 8, "conv3")])


def concat_model(seed: int = 0) -> onnx.ModelProto:
    """x -> convA, convB -> Concat -> conv -> y (the concat output feeds a quantized conv)"""
    net = _Net(seed)
    a = net.node("Relu", [net.conv("x", 3, 8, "convA")], "reluA")
    b = net.node("Relu", [net.conv("x", 3, 8, "convB")], "reluB")
    cat = net.node("Concat", [a, b], "concat", axis=1)
    return net.model([net.conv(cat, 16, 8, "convC")])


def pool_model(seed: int = 0) -> onnx.ModelProto:
    """x -> conv1 -> relu -> MaxPool -> conv2 -> y ;  x -> Sigmoid -> AveragePool -> z (float neighbours)"""
    net = _Net(seed)
    r = net.node("Relu", [net.conv("x", 3, 16, "conv1")], "relu")
    p = net.node("MaxPool", [r], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    y = net.conv(p, 16, 8, "conv2")
    s = net.node("Sigmoid", ["x"], "sigmoid")
    z = net.node("AveragePool", [s], "lonepool", kernel_shape=[2, 2], strides=[2, 2])
    return net.model([y, z])


def silu_model(seed: int = 0) -> onnx.ModelProto:
    """x -> conv1 -> Sigmoid, Mul (SiLU) -> conv2 -> y"""
    net = _Net(seed)
    c1 = net.conv("x", 3, 16, "conv1")
    s = net.node("Sigmoid", [c1], "sigmoid")
    m = net.node("Mul", [c1, s], "silu")
    return net.model([net.conv(m, 16, 8, "conv2")])


def detector_model(seed: int = 0) -> onnx.ModelProto:
    """A head that concatenates boxes (0..640) and sigmoid scores (0..1) into the graph output."""
    net = _Net(seed)
    feat = net.node("Relu", [net.conv("x", 3, 16, "backbone")], "relu")
    boxes = net.node("Mul", [net.node("Sigmoid", [net.conv(feat, 16, 4, "box_conv")], "box_sig"),
                              net.init("six40", np.array(640.0))], "boxes")
    scores = net.node("Sigmoid", [net.conv(feat, 16, 2, "cls_conv")], "scores")
    cat = net.node("Concat", [boxes, scores], "head_concat", axis=1)
    return net.model([cat])


def gemm_model(seed: int = 0) -> onnx.ModelProto:
    """x -> conv -> GlobalAveragePool -> Flatten -> Gemm (transB=1) -> MatMul -> y"""
    net = _Net(seed)
    c = net.node("Relu", [net.conv("x", 3, 16, "conv")], "relu")
    g = net.node("Flatten", [net.node("GlobalAveragePool", [c], "gap")], "flatten")
    net.init("fc_w", net.rng.normal(0, 0.3, size=(10, 16)))
    net.init("fc_b", net.rng.normal(0, 0.1, size=10))
    fc = net.node("Gemm", [g, "fc_w", "fc_b"], "fc", transB=1)
    net.init("mm_w", net.rng.normal(0, 0.3, size=(10, 5)))
    return net.model([net.node("MatMul", [fc, "mm_w"], "mm")])


def edge_filter_model(seed: int = 0, gain: float = 500.0) -> onnx.ModelProto:
    """x -> 1x1 conv -> relu -> depthwise 3x3 (channel 0: a BN-folded, zero-sum edge filter of huge weights)
    -> conv_b -> y. Quantizing the depthwise conv's input amplifies its rounding noise by `gain`."""
    net = _Net(seed)
    r = net.node("Relu", [net.conv("x", 3, 8, "conv_a", k=1)], "relu")
    dw = net.conv(r, 8, 8, "dw", group=8)
    weights = next(t for t in net.inits if t.name == "dw_w")
    array = numpy_helper.to_array(weights).copy()
    array[0] = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32) * gain
    weights.CopyFrom(numpy_helper.from_array(array, "dw_w"))
    return net.model([net.conv(dw, 8, 8, "conv_b")])


def smooth_batch(n: int, seed: int = 0) -> np.ndarray:
    """Flat images with a faint patch (camera-like: edges are rare), for edge_filter_model."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32) * np.ones((1, 1, 8, 8), np.float32)
    images[:, :, 3:5, 3:5] += rng.uniform(0, 0.05, (n, 3, 1, 1)).astype(np.float32)
    return images


def random_batch(model: onnx.ModelProto, n: int, seed: int = 1) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).normal(0, 1, size=(n, *shape)).astype(np.float32)
