"""2:4 sparsity: masks (numpy, ONNX pass, torch), TensorRT's eligibility rules per layer, masks kept while
distilling, and the builder option. Real ONNX models and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtkit.model import ModelArtifact
from trtkit.plugins.sparsity.masks import eligibility, is_2of4, mask_2of4, sparsify_onnx


def test_mask_keeps_the_two_largest_of_every_four():
    w = np.array([[1.0, -3.0, 0.5, 2.0, 0.1, 0.2, -0.3, 0.05]], dtype=np.float32)
    mask = mask_2of4(w, axis=1)
    assert mask.tolist() == [[0, 1, 0, 1, 0, 1, 1, 0]]
    assert is_2of4(w * mask) and not is_2of4(w)
    conv = np.random.default_rng(0).standard_normal((8, 16, 3, 3)).astype(np.float32)
    masked = conv * mask_2of4(conv, 1)
    assert is_2of4(masked, 1) and (masked == 0).mean() == 0.5
    # the pattern runs along the input channels for each (output channel, kernel position)
    groups = masked.transpose(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups == 0).sum(1) == 2).all()


def model_with_layers() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2, name)

    inits = [init("w_stem", (32, 3, 3, 3)), init("w_dw", (32, 1, 3, 3)), init("w_pw", (32, 32, 1, 1)),
             init("w_odd", (24, 32, 1, 1)), init("w_fc", (10, 24))]
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_dw"], ["b"], name="dw", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_pw"], ["c"], name="pw"),
        helper.make_node("Conv", ["c", "w_odd"], ["d"], name="odd"),
        helper.make_node("GlobalAveragePool", ["d"], ["e"], name="pool"),
        helper.make_node("Flatten", ["e"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w_fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_eligibility_follows_tensorrts_rules_per_layer():
    rows = {row["layer"]: row for row in eligibility(model_with_layers(), "int8")}
    assert not rows["stem"]["eligible"] and "3 input channels" in rows["stem"]["reason"]
    assert not rows["dw"]["eligible"] and "grouped" in rows["dw"]["reason"]
    assert rows["pw"]["eligible"] and rows["pw"]["aligned"]
    assert rows["odd"]["eligible"] and not rows["odd"]["aligned"]  # 24 outputs: not a multiple of 32
    assert rows["fc"]["eligible"] and rows["fc"]["in_channels"] == 24 and not rows["fc"]["aligned"]
    assert {row["layer"] for row in eligibility(model_with_layers(), "fp16") if row["aligned"]} == {"pw"}


def test_onnx_pass_masks_every_eligible_layer_and_the_model_still_runs(tmp_path):
    from trtkit.registry import get_registry
    from trtkit.runtime import random_inputs, run, session

    original = ModelArtifact(model_with_layers())
    component = get_registry().graph_pass("sparse-2of4")
    assert component.exact is False
    result = component.apply(original, **component.resolve_options({}))
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name, axis in (("w_pw", 1), ("w_odd", 1), ("w_fc", 1)):
        assert is_2of4(weights[name], axis), name
    assert not is_2of4(weights["w_stem"], 1) and not (weights["w_dw"] == 0).any()
    assert result.metadata["sparsity"]["masked"] == ["pw", "odd", "fc"]
    assert component.measured_difference(result) > 0  # it changes outputs by design, and says by how much
    feeds = random_inputs(result.model)
    assert run(session(result.model), feeds)["y"].shape == (1, 10)
    aligned, rows = sparsify_onnx(original, aligned_only=True)
    assert aligned.metadata["sparsity"]["masked"] == ["pw"]
    with pytest.raises(Exception, match="unknown layer 'pww'"):
        sparsify_onnx(original, layers=["pww"])


def test_cli_optimize_with_the_pass(tmp_path):
    from conftest import run_cli

    path, out = tmp_path / "m.onnx", tmp_path / "m.sparse.onnx"
    onnx.save(model_with_layers(), path)
    result = run_cli("optimize", str(path), "-o", str(out), "--pass", "sparse-2of4")
    assert result.returncode == 0, result.stderr
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert is_2of4(weights["w_pw"], 1)


def test_torch_masks_are_kept_while_distilling():
    torch = pytest.importorskip("torch")
    from torch import nn

    from trtkit.distill import distill, sparse_masks, teacher_copy
    from trtkit.plugins.sparsity.masks import apply_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8))
    teacher = teacher_copy(model)
    rows = apply_torch(model)
    assert [row["layer"] for row in rows if row["masked"]] == ["3", "7"]
    assert set(sparse_masks(model)) == {"3.weight", "7.weight"}
    x = torch.randn(64, 3, 8, 8)
    before = float((model(x) - teacher(x)).pow(2).mean())
    history = distill(model, teacher, x.numpy(), epochs=6, lr=3e-3, batch_size=16, device="cpu", progress=False)
    assert history[-1] < history[0]
    assert is_2of4(model[3].weight.detach().numpy(), 1) and is_2of4(model[7].weight.detach().numpy(), 1)
    after = float((model(x) - teacher(x)).pow(2).mean())
    assert after < 0.5 * before  # the masked network moved towards the dense one


def test_tensorrt_builders_have_the_sparse_weights_option():
    from trtkit.registry import get_registry

    for name in ("tensorrt", "tensorrt-rtx"):
        builders = get_registry().stages["builders"]
        if name in builders:
            assert builders[name].options["sparse_weights"].default is False
    trt = pytest.importorskip("tensorrt_rtx")
    assert hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS")
