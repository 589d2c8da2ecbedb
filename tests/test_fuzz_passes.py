"""Property-based tests (hypothesis): random small CNN graphs through every graph pass and calibrate+quantize.

Graphs are drawn from conv / BatchNorm / activation / per-channel affine / residual Add / Concat / pooling /
reshape-and-transpose chains with random channel counts, kernel sizes, strides, padding, groups and spatial
sizes, optionally with input preprocessing (x / s - m) in front and a Sigmoid at the end. Properties:

- exact passes (simplify, optimize, fold-batchnorm, equalize): outputs match the original within 1e-3 x max|output|;
- fuse-preprocess: the rewritten model gives the original's outputs on the same raw inputs (or declines with
  a TrtkitError when there is nothing it can fold exactly);
- remove-sigmoid: sigmoid(new) == old on outputs it changed, the rest identical;
- default passes -> calibrate -> quantize: the QDQ model loads and runs in onnxruntime (Q/DQ emulated in
  float and on the int8 kernels), outputs are finite with the right shapes, every Q/DQ obeys TensorRT's rules
  (positive scales, zero points 0, int8); qdq-tune on that model keeps it valid and running;
- no pass or stage crashes (any exception other than an expected TrtkitError fails the test).

The number of examples is printed; raise it with TRTKIT_FUZZ_EXAMPLES=200 for a longer hunt.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

EXAMPLES = int(os.environ.get("TRTKIT_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("TRTKIT_FUZZ_RANDOM") is None,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RAN: Counter[str] = Counter()


@dataclass
class Generated:
    model: onnx.ModelProto
    ops: list[str]
    preprocess: bool
    sigmoid_out: bool


class _Builder:
    def __init__(self, draw, seed: int) -> None:
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:  # type: ignore[no-untyped-def]
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n_" + op), **attrs))
        return out


def _conv_out(size: int, k: int, pad: int, stride: int) -> int:
    return (size + 2 * pad - k) // stride + 1


@st.composite
def cnn_graphs(draw) -> Generated:  # type: ignore[no-untyped-def]
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(draw, seed)
    channels = draw(st.integers(1, 4))
    height, width = draw(st.integers(3, 10)), draw(st.integers(3, 10))
    dynamic = draw(st.booleans())
    x = "x"
    t, shape = x, (channels, height, width)
    ops: list[str] = []
    preprocess = draw(st.booleans())
    if preprocess:  # raw pixels -> normalised, as exporters leave it (Div then Sub, scalars or per channel)
        divisor = np.float32(draw(st.sampled_from([255.0, 16.0, 2.0])))
        t = b.node("Div", [t, b.const(np.array(divisor))])
        per_channel = draw(st.booleans())
        mean = b.rng.uniform(0, 1, (1, channels, 1, 1)) if per_channel else np.array(0.5)
        t = b.node("Sub", [t, b.const(mean)])
        ops.append("preprocess")
    first_conv = draw(st.booleans()) or preprocess
    history: list[tuple[str, tuple[int, int, int]]] = []
    steps = draw(st.integers(1, 7))
    for index in range(steps + (1 if first_conv else 0)):
        c, h, w = shape
        kind = "conv" if (first_conv and index == 0) else draw(st.sampled_from(
            ["conv", "conv", "bn", "act", "affine", "residual", "concat", "pool", "reshape", "transpose"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3])) if min(h, w) >= 3 else 1
            pad = draw(st.sampled_from([0, k // 2]))
            stride = draw(st.sampled_from([1, 1, 2])) if min(h, w) >= 4 else 1
            depthwise = c > 1 and draw(st.booleans()) and index > 0
            out_c = c if depthwise else draw(st.integers(1, 8))
            group = c if depthwise else 1
            weight = b.rng.standard_normal((out_c, c // group, k, k)) / np.sqrt(c // group * k * k)
            inputs = [t, b.const(weight, "w")]
            if draw(st.booleans()):
                inputs.append(b.const(b.rng.standard_normal(out_c) * 0.1, "bias"))
            t = b.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group)
            shape = (out_c, _conv_out(h, k, pad, stride), _conv_out(w, k, pad, stride))
        elif kind == "bn":
            scale, bias = b.rng.uniform(0.5, 1.5, c), b.rng.normal(0, 0.2, c)
            mean, var = b.rng.normal(0, 0.2, c), b.rng.uniform(0.5, 2.0, c)
            t = b.node("BatchNormalization", [t, b.const(scale), b.const(bias), b.const(mean), b.const(var)],
                       epsilon=1e-5)
        elif kind == "act":
            act = draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "Clip", "SiLU", "Tanh"]))
            kind = act
            if act == "LeakyRelu":
                t = b.node("LeakyRelu", [t], alpha=0.1)
            elif act == "Clip":
                t = b.node("Clip", [t, b.const(np.array(0.0)), b.const(np.array(6.0))])
            elif act == "SiLU":
                t = b.node("Mul", [t, b.node("Sigmoid", [t])])
            else:
                t = b.node(act, [t])
        elif kind == "affine":
            t = b.node("Mul", [t, b.const(b.rng.uniform(0.5, 2.0, (1, c, 1, 1)))])
            if draw(st.booleans()):
                t = b.node("Add", [t, b.const(b.rng.normal(0, 0.5, (1, c, 1, 1)))])
        elif kind == "residual":
            same = [name for name, s in history if s == shape and name != t]
            if not same:
                continue
            t = b.node("Add", [t, draw(st.sampled_from(same))])
        elif kind == "concat":
            same = [(name, s) for name, s in history if s[1:] == shape[1:] and name != t]
            if not same:
                continue
            other, other_shape = draw(st.sampled_from(same))
            t = b.node("Concat", [t, other], axis=1)
            shape = (c + other_shape[0], h, w)
        elif kind == "pool":
            if min(h, w) < 2:
                continue
            if draw(st.booleans()):
                t = b.node("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])
            else:
                t = b.node("AveragePool", [t], kernel_shape=[2, 2], strides=[2, 2])
            shape = (c, h // 2, w // 2)
        elif kind == "reshape":
            flat = b.node("Reshape", [t, b.const(np.array([0, c, h * w]).astype(np.float32))])
            # Reshape wants an int64 shape: replace the float constant just made.
            b.inits[-1] = numpy_helper.from_array(np.array([0, c, h * w], np.int64), b.inits[-1].name)
            t = b.node("Reshape", [flat, b.const(np.zeros(1))])
            b.inits[-1] = numpy_helper.from_array(np.array([0, c, h, w], np.int64), b.inits[-1].name)
        elif kind == "transpose":
            t = b.node("Transpose", [t], perm=[0, 2, 3, 1])
            t = b.node("Transpose", [t], perm=[0, 3, 1, 2])
        ops.append(kind)
        history.append((t, shape))
    c, h, w = shape
    head = draw(st.sampled_from(["map", "gap-gemm", "flatten-gemm"]))
    if head == "map":
        out_shape: list = [c, h, w]
    else:
        if head == "gap-gemm":
            t = b.node("GlobalAveragePool", [t])
            features = c
        else:
            features = c * h * w
        t = b.node("Flatten", [t], axis=1)
        classes = draw(st.integers(1, 6))
        weight = b.rng.standard_normal((classes, features)) / np.sqrt(features)
        t = b.node("Gemm", [t, b.const(weight, "fc"), b.const(b.rng.normal(0, 0.1, classes))], transB=1)
        out_shape = [classes]
    ops.append(head)
    sigmoid_out = draw(st.booleans())
    if sigmoid_out:
        t = b.node("Sigmoid", [t])
    if t == "x":
        b.nodes.append(helper.make_node("Identity", [t], ["y"], name="output"))
    else:  # the last node writes the graph output itself (so a final Sigmoid feeds the output directly)
        for node in b.nodes:
            node.output[:] = ["y" if name == t else name for name in node.output]
    batch = "batch" if dynamic else 2
    graph = helper.make_graph(
        b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, *out_shape])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return Generated(model, ops, preprocess, sigmoid_out)


def _inputs(model: onnx.ModelProto, seed: int, raw: bool) -> dict[str, np.ndarray]:
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    low, high = (0.0, 255.0) if raw else (-1.0, 1.0)
    return {"x": rng.uniform(low, high, shape).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], emulate_qdq: bool = True) -> np.ndarray:
    from trtkit import runtime

    return runtime.run(runtime.session(model, emulate_qdq=emulate_qdq), feeds)["y"]


def _close(reference: np.ndarray, got: np.ndarray, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    assert got.shape == reference.shape
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    diff = float(np.max(np.abs(got - reference))) if reference.size else 0.0
    assert diff <= rtol * scale + atol, f"max |diff| {diff:.3g} > {rtol} x {scale:.3g} + {atol}"


def _apply(name: str, generated: Generated, **options):  # type: ignore[no-untyped-def]
    from trtkit.model import ModelArtifact
    from trtkit.registry import get_registry

    graph_pass = get_registry().graph_pass(name)
    artifact = ModelArtifact.from_model(generated.model)
    before = artifact.model.SerializeToString()
    result = graph_pass.apply(artifact.copy(), **graph_pass.resolve_options(options))
    assert artifact.model.SerializeToString() == before, "the pass modified its input"
    assert isinstance(result, ModelArtifact)
    onnx.checker.check_model(result.model)
    return result


@pytest.mark.parametrize("name", ["simplify", "optimize", "fold-batchnorm", "equalize"])
@FUZZ
@given(generated=cnn_graphs())
def test_exact_passes_keep_outputs(name, generated):
    result = _apply(name, generated)
    for seed in (0, 1):
        feeds = _inputs(generated.model, seed, raw=generated.preprocess)
        _close(_run(generated.model, feeds), _run(result.model, feeds))
    RAN[name] += 1


@FUZZ
@given(generated=cnn_graphs())
def test_fuse_preprocess_keeps_outputs_on_raw_input(generated):
    from trtkit.errors import TrtkitError

    try:
        result = _apply("fuse-preprocess", generated)
    except TrtkitError as exc:  # declining is fine, when it says why in one line
        assert str(exc) and "\n" not in str(exc)
        RAN["fuse-preprocess declined"] += 1
        return
    feeds = _inputs(generated.model, 3, raw=True)
    _close(_run(generated.model, feeds), _run(result.model, feeds))
    RAN["fuse-preprocess"] += 1


@FUZZ
@given(generated=cnn_graphs())
def test_remove_sigmoid_relation(generated):
    from trtkit.errors import TrtkitError

    try:
        result = _apply("remove-sigmoid", generated)
    except TrtkitError as exc:
        assert not generated.sigmoid_out, f"declined a model ending in Sigmoid: {exc}"
        RAN["remove-sigmoid declined"] += 1
        return
    feeds = _inputs(generated.model, 4, raw=generated.preprocess)
    old, new = _run(generated.model, feeds), _run(result.model, feeds)
    if generated.sigmoid_out:  # the output came straight from a Sigmoid: now it must be its logits
        _close(old, 1.0 / (1.0 + np.exp(-new.astype(np.float64))), rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_array_equal(old, new)
    RAN["remove-sigmoid"] += 1


def _check_qdq_rules(model: onnx.ModelProto) -> int:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        scale = inits.get(node.input[1])
        assert scale is not None, f"{node.name}: scale is not a constant"
        assert np.all(np.isfinite(scale)) and np.all(scale > 0), f"{node.name}: scale {scale}"
        if len(node.input) > 2 and node.input[2]:
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not np.any(zero_point), f"{node.name}: zero point {zero_point}"
    return count


@FUZZ
@given(generated=cnn_graphs())
def test_default_passes_then_calibrate_quantize_always_runs(generated):
    from trtkit.calibration import calibrate
    from trtkit.model import ModelArtifact
    from trtkit.optimizing import optimize
    from trtkit.plugins.qdq.insert import quantize

    optimized = optimize(ModelArtifact.from_model(generated.model), check=False).artifact
    shape = [d.dim_value or 2 for d in generated.model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    low, high = (0.0, 255.0) if generated.preprocess else (-1.0, 1.0)
    data = rng.uniform(low, high, [8, *shape[1:]]).astype(np.float32)
    method = ("minmax", "entropy", "percentile")[len(generated.ops) % 3]
    scales = calibrate(optimized, data, method=method, batch_size=shape[0], progress=False)
    qdq = quantize(optimized, scales).model
    onnx.checker.check_model(qdq)
    count = _check_qdq_rules(qdq)
    feeds = _inputs(generated.model, 5, raw=generated.preprocess)
    reference = _run(generated.model, feeds)
    for emulate in (True, False):
        got = _run(qdq, feeds, emulate_qdq=emulate)
        assert got.shape == reference.shape and np.all(np.isfinite(got))
    RAN["calibrate+quantize"] += 1
    # qdq-tune (TensorRT placement alignment) on the QDQ model: still valid, still runs, same rules.
    tuned = _apply("qdq-tune", Generated(qdq, generated.ops, generated.preprocess, generated.sigmoid_out))
    _check_qdq_rules(tuned.model)
    got = _run(tuned.model, feeds)
    assert got.shape == reference.shape and np.all(np.isfinite(got))
    RAN["qdq-tune"] += 1
    RAN["q/dq nodes"] += count


def test_report_how_many_cases_ran():
    if not RAN:
        pytest.skip("run with the fuzz tests above")
    print("\nfuzzed cases: " + ", ".join(f"{name}={count}" for name, count in sorted(RAN.items())))
    assert all(RAN[name] > 0 for name in ("simplify", "optimize", "fold-batchnorm", "calibrate+quantize"))
