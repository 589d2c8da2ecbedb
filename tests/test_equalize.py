"""Cross-layer equalization: exact in FP32 on random nets (torch-exported and hand-built ONNX), evens out
per-channel weight ranges, never touches what it cannot prove, and never modifies its input."""

from __future__ import annotations

import numpy as np
import pytest

from trtkit import equalize
from trtkit.errors import OptionError, UnknownNameError
from trtkit.model import ModelArtifact
from trtkit.runtime import random_inputs, run, session


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(reference - candidate).max() / np.abs(reference).max())


def _outputs(artifact: ModelArtifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(session(artifact), feeds)


def _weight_ranges(artifact: ModelArtifact, node_name: str, axis: int = 0) -> np.ndarray:
    node = next(n for n in artifact.model.graph.node if n.name == node_name)
    weight = np.moveaxis(np.abs(artifact.tensor(node.input[1])), axis, 0)
    return weight.reshape(weight.shape[0], -1).max(axis=1)


@pytest.fixture(scope="module")
def random_cnn(tmp_path_factory):
    """Conv -> ReLU -> depthwise -> LeakyReLU -> pointwise -> ReLU -> MaxPool -> grouped conv -> ReLU ->
    spatial mean -> Linear -> ReLU -> Linear, with per-channel weight magnitudes spread over ~4 decades."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 16, 1)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.fc1 = nn.Linear(16, 12)
            self.fc2 = nn.Linear(12, 5)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = nn.functional.leaky_relu(self.dw(x), 0.1)
            x = nn.functional.max_pool2d(torch.relu(self.pw(x)), 2)
            x = torch.relu(self.grouped(x)).mean(dim=(2, 3))
            return self.fc2(torch.relu(self.fc1(x)))

    net = Net().eval()
    with torch.no_grad():
        for module in (net.a, net.dw, net.pw, net.grouped, net.fc1):
            spread = torch.exp(torch.randn(module.weight.shape[0]) * 1.5)
            module.weight.mul_(spread.reshape(-1, *([1] * (module.weight.dim() - 1))))
            module.bias.mul_(spread)
    path = tmp_path_factory.mktemp("eq") / "random_cnn.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path


def test_equalize_is_exact_on_a_random_cnn(random_cnn):
    original = ModelArtifact.load(random_cnn)
    before_bytes = random_cnn.read_bytes()
    equalized, report = equalize(original)
    pairs = {(p.first, p.second) for p in report.pairs}
    # every adjacent pair is found, through ReLU, LeakyReLU, MaxPool and the spatial mean
    assert len(report.pairs) == 5, report.as_dict()
    assert ("/grouped/Conv", "/fc1/Gemm") in pairs
    feeds = random_inputs(original.model, seed=1, dims={"n": 16})
    ref, new = _outputs(original, feeds)["y"], _outputs(equalized, feeds)["y"]
    assert _relative_error(ref, new) < 1e-5
    # real-looking inputs too (positive images)
    feeds = random_inputs(original.model, seed=2, low=0.0, high=1.0, dims={"n": 16})
    assert _relative_error(_outputs(original, feeds)["y"], _outputs(equalized, feeds)["y"]) < 1e-5
    assert random_cnn.read_bytes() == before_bytes  # input untouched
    assert original.model.SerializeToString() == ModelArtifact.load(random_cnn).model.SerializeToString()


def test_equalize_evens_out_ranges(random_cnn):
    original = ModelArtifact.load(random_cnn)
    equalized, report = equalize(original, iterations=50)
    for pair in report.pairs:
        assert pair.range_ratio_after < pair.range_ratio_before
    # A's output ranges and B's input ranges meet in the middle (sqrt of the product) at the fixed point
    r_a = _weight_ranges(equalized, "/dw/Conv")
    node = next(n for n in equalized.model.graph.node if n.name == "/pw/Conv")
    r_b = np.abs(equalized.tensor(node.input[1])).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r_a, r_b, rtol=0.05)
    before = _weight_ranges(original, "/a/Conv")
    after = _weight_ranges(equalized, "/a/Conv")
    assert after.max() / after.min() < before.max() / before.min() / 2
    assert equalized.metadata["ptq"]["equalize"]["pairs"] == 5


def test_equalize_is_deterministic(random_cnn, tmp_path):
    first, _ = equalize(ModelArtifact.load(random_cnn))
    second, _ = equalize(ModelArtifact.load(random_cnn))
    first.save(tmp_path / "a.onnx")
    second.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def _helper_model(hidden_op: str, fan_out: bool = False, seed: int = 0):
    """x -> MatMul(W1) -> Add(b1)? no: Gemm(W1, b1, transB=1) -> hidden_op -> Gemm(W2, transB=0) -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((6, 4)) * np.exp(rng.standard_normal((6, 1)) * 2)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    w3 = rng.standard_normal((3, 2)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="first", transB=1)]
    if hidden_op == "Clip":
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act"))
    elif hidden_op == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", ["h"], ["a"], name="act", alpha=0.2))
    else:
        nodes.append(helper.make_node(hidden_op, ["h"], ["a"], name="act"))
    nodes.append(helper.make_node("MatMul", ["a", "w2"], ["z"], name="second"))
    nodes.append(helper.make_node("MatMul", ["z", "w3"], ["y"], name="third"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])]
    if fan_out:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 6]))
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": w1, "b1": b1, "w2": w2, "w3": w3, "lo": np.array(0, np.float32),
              "hi": np.array(6, np.float32)}.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return ModelArtifact.from_model(model)


@pytest.mark.parametrize("hidden_op", ["Relu", "LeakyRelu", "Identity"])
def test_equalize_gemm_matmul_chain_exact(hidden_op):
    original = _helper_model(hidden_op)
    equalized, report = equalize(original)
    assert [(p.first, p.second) for p in report.pairs] == [("first", "second"), ("second", "third")]
    feeds = random_inputs(original.model, seed=3, low=-3, high=3, dims={"n": 32})
    assert _relative_error(_outputs(original, feeds)["y"], _outputs(equalized, feeds)["y"]) < 1e-5
    w_before = original.tensor("w1")
    w_after = equalized.tensor("w1")
    spread = lambda w: np.abs(w).max(axis=1).max() / np.abs(w).max(axis=1).min()  # noqa: E731
    assert spread(w_after) < spread(w_before)


def test_equalize_skips_what_it_cannot_prove():
    # ReLU6 (Clip 0..6) is not positively homogeneous: skipped by default, exact
    clipped = _helper_model("Clip")
    out, report = equalize(clipped)
    assert ("first", "second") not in [(p.first, p.second) for p in report.pairs]
    assert any("Clip" in reason for reason in report.skipped)
    np.testing.assert_array_equal(out.tensor("w1"), clipped.tensor("w1"))
    # relu6=relu equalizes through it (the DFQ trade-off: not exact above 6 / s)
    _, report = equalize(clipped, relu6="relu")
    assert ("first", "second") in [(p.first, p.second) for p in report.pairs]
    # a hidden tensor that is also a graph output cannot be rescaled
    fan_out = _helper_model("Relu", fan_out=True)
    out, report = equalize(fan_out)
    assert ("first", "second") not in [(p.first, p.second) for p in report.pairs]
    feeds = random_inputs(fan_out.model, seed=4, dims={"n": 8})
    ref, new = _outputs(fan_out, feeds), _outputs(out, feeds)
    np.testing.assert_array_equal(ref["h"], new["h"])
    # Sigmoid is not homogeneous either
    _, report = equalize(_helper_model("Sigmoid"))
    assert ("first", "second") not in [(p.first, p.second) for p in report.pairs]


def test_equalize_option_errors(random_cnn):
    artifact = ModelArtifact.load(random_cnn)
    with pytest.raises(OptionError, match="relu6"):
        equalize(artifact, relu6="maybe")
    with pytest.raises(UnknownNameError, match="did you mean"):
        equalize(artifact, layers=["/a/Convv"])
    _, report = equalize(artifact, layers=["/a/Conv"])
    assert [p.first for p in report.pairs] == ["/a/Conv"]


def _random_chain(seed: int, depth: int, width: int, ops: list[str], groups: list[str]) -> ModelArtifact:
    """Conv chain with random group structure and homogeneous ops between, then global pool, flatten, Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    x, cin = "x", 3
    for i in range(depth):
        cout = width * (1 + i % 2)
        kind = groups[i]
        g = 1 if kind == "dense" or i == 0 else (cin if kind == "depthwise" and cout % cin == 0 else
                                                   (2 if cin % 2 == 0 and cout % 2 == 0 else 1))
        w = rng.standard_normal((cout, cin // g, 3, 3)) * np.exp(rng.standard_normal((cout, 1, 1, 1)) * 1.5)
        inits[f"w{i}"] = w.astype(np.float32)
        inits[f"b{i}"] = (rng.standard_normal(cout) * np.exp(rng.standard_normal(cout))).astype(np.float32)
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=g,
                                      pads=[1, 1, 1, 1]))
        op = ops[i]
        if op == "PRelu":
            inits[f"slope{i}"] = rng.uniform(0, 0.3, (cout, 1, 1)).astype(np.float32)
            nodes.append(helper.make_node("PRelu", [f"c{i}", f"slope{i}"], [f"a{i}"], name=f"act{i}"))
        elif op == "MaxPool":
            nodes.append(helper.make_node("MaxPool", [f"c{i}"], [f"a{i}"], name=f"act{i}", kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1]))
        elif op == "LeakyRelu":
            nodes.append(helper.make_node("LeakyRelu", [f"c{i}"], [f"a{i}"], name=f"act{i}", alpha=0.05))
        else:
            nodes.append(helper.make_node(op, [f"c{i}"], [f"a{i}"], name=f"act{i}"))
        x, cin = f"a{i}", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    inits["fc_w"] = rng.standard_normal((5, cin)).astype(np.float32)
    inits["fc_b"] = rng.standard_normal(5).astype(np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return ModelArtifact.from_model(model)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 10_000),
    depth=st.integers(2, 4),
    width=st.sampled_from([4, 6, 8]),
    ops=st.lists(st.sampled_from(["Relu", "LeakyRelu", "PRelu", "MaxPool", "Identity"]), min_size=4, max_size=4),
    groups=st.lists(st.sampled_from(["dense", "depthwise", "grouped"]), min_size=4, max_size=4),
)
def test_equalize_exact_on_random_chains(seed, depth, width, ops, groups):
    original = _random_chain(seed, depth, width, ops, groups)
    equalized, report = equalize(original)
    assert len(report.pairs) == depth  # every conv pairs with its successor (the last one with the Gemm)
    for low, high in ((-1.0, 1.0), (0.0, 5.0)):
        feeds = random_inputs(original.model, seed=seed, low=low, high=high)
        ref, new = _outputs(original, feeds)["y"], _outputs(equalized, feeds)["y"]
        assert _relative_error(ref, new) < 2e-5
