"""qdq-tune: every rewrite on a hand-built Q/DQ graph, exact ones proven exact, by-design ones proven to do
what they claim (shared scales, pairs gone, names kept), and trtkit's own QDQ output left consistent."""

from __future__ import annotations

import numpy as np
import pytest

from trtkit import qdq_tune
from trtkit.errors import InputFileError
from trtkit.metrics import sqnr_db
from trtkit.model import ModelArtifact
from trtkit.runtime import random_inputs, run, session


class QDQGraph:
    """A tiny builder for Q/DQ test graphs with onnx.helper."""

    def __init__(self, channels: int = 4) -> None:
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.channels = channels
        self.in_channels = channels
        self.rng = np.random.default_rng(0)
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def qdq(self, x: str, scale: float, name: str | None = None) -> str:
        name = name or self._name("qdq")
        self.inits[f"{name}_s"] = np.array(scale, np.float32)
        self.inits[f"{name}_z"] = np.array(0, np.int8)
        from onnx import helper

        self.nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"],
                                           name=f"{name}_Q"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                           [f"{name}_dq"], name=f"{name}_DQ"))
        return f"{name}_dq"

    def conv(self, x: str, name: str | None = None) -> str:
        from onnx import helper

        name = name or self._name("conv")
        c = self.channels
        weight = self.rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3
        scale = (np.abs(weight).max(axis=(1, 2, 3)) / 127).astype(np.float32)
        self.inits[f"{name}_wq"] = np.clip(np.rint(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
        self.inits[f"{name}_ws"] = scale
        self.inits[f"{name}_wz"] = np.zeros(c, np.int8)
        self.inits[f"{name}_b"] = self.rng.standard_normal(c).astype(np.float32) * 0.1
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_ws", f"{name}_wz"],
                                           [f"{name}_w"], name=f"{name}_wDQ", axis=0))
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_y"], name=name,
                                           pads=[1, 1, 1, 1]))
        return f"{name}_y"

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        from onnx import helper

        name = name or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def build(self, outputs: list[str]) -> ModelArtifact:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph(
            self.nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.in_channels, 8, 8])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, None, None, None]) for o in outputs],
            [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        return ModelArtifact.from_model(model)


def _run(artifact: ModelArtifact, seed: int = 0) -> dict[str, np.ndarray]:
    return run(session(artifact), random_inputs(artifact.model, seed=seed, low=-2, high=2))


def _ops(artifact: ModelArtifact) -> list[str]:
    return [n.op_type for n in artifact.model.graph.node]


def test_exact_rewrites_merge_duplicates_and_drop_requantize():
    b = QDQGraph()
    x = b.qdq("x", 0.02, "in")
    # the same tensor quantized twice with identical parameters, for two consumers
    y1 = b.conv(b.qdq("x", 0.02, "dup"), "conv_a")
    y2 = b.conv(x, "conv_b")
    # a DQ -> Q round trip with identical parameters (as some exporters leave between ops)
    s = b.inits["in_s"]
    z = b.inits["in_z"]
    b.inits["rt_s"], b.inits["rt_z"] = s.copy(), z.copy()
    from onnx import helper

    b.nodes.append(helper.make_node("QuantizeLinear", [x, "rt_s", "rt_z"], ["rt_q"], name="rt_Q"))
    b.nodes.append(helper.make_node("DequantizeLinear", ["rt_q", "rt_s", "rt_z"], ["rt_dq"], name="rt_DQ"))
    y3 = b.conv("rt_dq", "conv_c")
    total = b.op("Sum", [y1, y2, y3], "sum")
    model = b.build([total])
    tuned, report = qdq_tune(model, outputs=False)
    counts = report.counts()
    assert counts.get("merge-duplicate", 0) >= 1 and counts.get("remove-requantize", 0) == 1
    assert _ops(tuned).count("QuantizeLinear") == 1  # one quantizer of x left
    before, after = _run(model), _run(tuned)
    np.testing.assert_array_equal(before[total], after[total])  # exact
    assert _ops(model).count("QuantizeLinear") == 3  # input untouched


def test_output_and_residual_pairs_removed():
    b = QDQGraph()
    x = b.qdq("x", 0.02, "in")
    y = b.conv(x, "conv1")
    skip = b.qdq("x", 0.02, "skip")  # a second quantizer of x (merged by the exact step)
    branch = b.qdq(y, 0.05, "branch")  # Conv -> Q/DQ -> Add: blocks the Conv+Add fusion
    added = b.op("Add", [branch, skip], "add")
    out = b.qdq(b.op("Relu", [added], "relu"), 0.05, "out")  # a quantized graph output
    model = b.build([out])
    tuned, report = qdq_tune(model)
    actions = {c["action"] for c in report.changes}
    assert {"unquantize-output", "residual-branch"} <= actions
    add = next(n for n in tuned.model.graph.node if n.op_type == "Add")
    producers = {o: n for n in tuned.model.graph.node for o in n.output}
    assert producers[add.input[0]].op_type == "Conv"
    assert producers[add.input[1]].op_type == "DequantizeLinear"  # skip branch keeps its pair
    assert [o.name for o in tuned.model.graph.output] == [out]
    assert producers[out].op_type == "Identity"
    assert report.sqnr_db is not None and report.sqnr_db > 25
    assert tuned.metadata["ptq"]["qdq_tune"]["counts"]["residual-branch"] == 1


def test_concat_and_maxpool_scales_aligned():
    b = QDQGraph()
    x = b.qdq("x", 0.02, "in")
    left = b.qdq(b.op("Relu", [b.conv(x, "conv1")]), 0.03, "left")
    right = b.qdq(b.op("Relu", [b.conv(x, "conv2")]), 0.08, "right")
    cat = b.qdq(b.op("Concat", [left, right], "cat", axis=1), 0.05, "catq")
    b.channels = 8
    pooled = b.qdq(b.op("MaxPool", [cat], "pool", kernel_shape=[2, 2], strides=[2, 2]), 0.06, "poolq")
    y = b.conv(pooled, "conv3")
    model = b.build([y])
    tuned, report = qdq_tune(model)
    counts = report.counts()
    assert counts["align-concat"] == 1 and counts["align-pool"] == 1
    g = tuned.model.graph
    nodes = {n.name: n for n in g.node}
    inits = {t.name: tuned.tensor(t) for t in g.initializer}

    def scale(node_name: str) -> float:
        return float(inits[nodes[node_name].input[1]])

    shared = {scale("left_Q"), scale("left_DQ"), scale("right_Q"), scale("right_DQ"), scale("catq_Q"),
              scale("catq_DQ")}
    assert len(shared) == 1 and shared.pop() == pytest.approx(0.08)  # the largest of the group
    assert scale("poolq_Q") == scale("catq_DQ") == scale("poolq_DQ")
    # max-pool of values on one grid, requantized on the same grid, is exact: that pair is now an identity
    pool_out = run(session(tuned, extra_outputs=["pool_out", "poolq_dq"]),
                   random_inputs(tuned.model, seed=0, low=-2, high=2))
    np.testing.assert_array_equal(pool_out["pool_out"], pool_out["poolq_dq"])
    assert sqnr_db(_run(model)[y], _run(tuned)[y]) > 15


def test_tune_on_trtkit_qdq_keeps_outputs(tmp_path):
    """trtkit's QDQ builder already places Q/DQ well: tuning must keep the model's outputs (exact steps only)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from trtkit.calibration import calibrate
    from trtkit.plugins.qdq.insert import quantize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU()).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    data = {"x": np.random.default_rng(0).uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)}
    quantized = quantize(path, calibrate(path, data, method="minmax", progress=False))
    tuned, report = qdq_tune(quantized)
    feeds = {"x": data["x"][:1]}
    a, b = run(session(quantized), feeds)["y"], run(session(tuned), feeds)["y"]
    assert sqnr_db(a, b) > 30
    assert all(c["action"] != "merge-duplicate" for c in report.changes)


def test_tune_rejects_float_models():
    b = QDQGraph()
    y = b.op("Relu", ["x"])
    with pytest.raises(InputFileError, match="no Q/DQ"):
        qdq_tune(b.build([y]))


def test_qdq_tune_through_the_cli(tmp_path):
    from conftest import run_cli

    b = QDQGraph()
    x = b.qdq("x", 0.02, "in")
    added = b.op("Add", [b.qdq(b.conv(x, "conv1"), 0.05, "branch"), b.qdq("x", 0.02, "skip")], "add")
    out = b.qdq(added, 0.05, "out")
    source = tmp_path / "in.onnx"
    b.build([out]).save(source)
    before = source.read_bytes()
    result = tmp_path / "tuned.onnx"
    done = run_cli("optimize", str(source), "-o", str(result), "--pass", "qdq-tune", "-O", "residual=false")
    assert done.returncode == 0, done.stderr
    tuned = ModelArtifact.load(result)
    counts = tuned.metadata["ptq"]["qdq_tune"]["counts"]
    assert counts["unquantize-output"] == 1 and "residual-branch" not in counts
    assert tuned.metadata["passes"][-1]["name"] == "qdq-tune"
    assert source.read_bytes() == before
    bad = run_cli("optimize", str(source), "-o", str(tmp_path / "x.onnx"), "--pass", "qdq-tune", "-O", "residul=false")
    assert bad.returncode == 2 and "residual" in bad.stderr
