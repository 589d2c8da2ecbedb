"""Graph passes on real models (torch exports and onnx.helper graphs), proven with real onnxruntime."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtkit.errors import NumericalCheckError, OptionError, UnknownNameError  # noqa: E402
from trtkit.model import ModelArtifact  # noqa: E402
from trtkit.optimizing import DEFAULT_PASSES, optimize  # noqa: E402
from trtkit.runtime import random_inputs, run, session  # noqa: E402

RNG_SEED = 1234


# ---- helpers -----------------------------------------------------------------------------------------------
def outputs(model, feeds):
    return run(session(model, optimization="disable"), feeds)


def assert_same_outputs(before, after, feeds, rtol=1e-4, atol=1e-5):
    ref, got = outputs(before, feeds), outputs(after, feeds)
    assert list(ref) == list(got)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


def ops(model):
    return [node.op_type for node in (model.model if isinstance(model, ModelArtifact) else model).graph.node]


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs_, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs_, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bn_params(rng, prefix, channels):
    return [
        const(f"{prefix}_gamma", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        const(f"{prefix}_beta", rng.normal(0, 0.3, channels).astype(np.float32)),
        const(f"{prefix}_mean", rng.normal(0.2, 0.5, channels).astype(np.float32)),
        const(f"{prefix}_var", rng.uniform(0.25, 2.0, channels).astype(np.float32)),
    ]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(RNG_SEED)


@pytest.fixture(scope="module")
def conv_bn_model(rng):
    """Conv -> BN -> Relu -> ConvTranspose -> BN -> Flatten -> Gemm -> BN (2-D) -> Identity -> output."""
    c = 6
    inits = [
        const("w1", rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)),
        const("b1", rng.normal(0, 0.1, c).astype(np.float32)),
        const("wt", rng.normal(0, 0.3, (c, 4, 2, 2)).astype(np.float32)),
        const("wg", rng.normal(0, 0.1, (5, 4 * 8 * 8)).astype(np.float32)),
        const("bg", rng.normal(0, 0.1, 5).astype(np.float32)),
        *bn_params(rng, "bn1", c), *bn_params(rng, "bn2", 4), *bn_params(rng, "bn3", 5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["n1"],
                         epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "wt"], ["t1"], strides=[2, 2], name="deconv"),
        helper.make_node("BatchNormalization", ["t1", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["n2"]),
        helper.make_node("Flatten", ["n2"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], transB=1, beta=0.5, name="fc"),
        helper.make_node("BatchNormalization", ["g", "bn3_gamma", "bn3_beta", "bn3_mean", "bn3_var"], ["n3"]),
        helper.make_node("Identity", ["n3"], ["y"]),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits,
    )


# ---- default passes on a trained residual CNN -----------------------------------------------------------------
def test_default_passes_keep_digits_outputs_on_real_data(digits_onnx, digits_data, tmp_path):
    before = sha(digits_onnx)
    out = tmp_path / "opt.onnx"
    result = optimize(digits_onnx, output=out)
    assert sha(digits_onnx) == before, "the input model must never be modified"
    assert [r.name for r in result.reports] == DEFAULT_PASSES
    assert all(r.checked == "onnxruntime" and r.max_abs_diff is not None for r in result.reports)
    assert result.reports[-1].total_after <= result.reports[0].total_before
    assert "Constant" not in ops(result.artifact)
    saved = ModelArtifact.load(out)
    assert [p["name"] for p in saved.metadata["passes"]] == DEFAULT_PASSES
    _, _, x_test, _ = digits_data
    feeds = {"image": x_test[:64]}
    assert_same_outputs(digits_onnx, out, feeds, rtol=1e-4, atol=1e-4)


def test_same_inputs_give_byte_identical_outputs(digits_onnx, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    optimize(digits_onnx, ["simplify", "optimize", "fuse-preprocess"], output=a, check=False)
    optimize(digits_onnx, ["simplify", "optimize", "fuse-preprocess"], output=b, check=False)
    assert sha(a) == sha(b)


# ---- optimize: folding ---------------------------------------------------------------------------------------
def test_batchnorm_folds_into_conv_convtranspose_and_gemm(conv_bn_model):
    result = optimize(ModelArtifact.from_model(conv_bn_model), ["optimize"])
    remaining = ops(result.artifact)
    assert "BatchNormalization" not in remaining, remaining
    assert remaining.count("Conv") == 1 and remaining.count("ConvTranspose") == 1 and remaining.count("Gemm") == 1
    feeds = random_inputs(conv_bn_model, seed=3, low=-2, high=2)
    assert_same_outputs(conv_bn_model, result.artifact, feeds)
    assert result.reports[0].max_abs_diff < 1e-4


def test_simplify_removes_identity_and_keeps_output_names(conv_bn_model):
    result = optimize(ModelArtifact.from_model(conv_bn_model), ["simplify"])
    assert "Identity" not in ops(result.artifact)
    assert [o.name for o in result.artifact.model.graph.output] == ["y"]
    assert [i.name for i in result.artifact.model.graph.input] == ["x"]


def test_per_channel_mul_add_fold_into_conv(rng):
    c = 4
    inits = [
        const("w", rng.normal(0, 0.3, (c, 2, 3, 3)).astype(np.float32)),
        const("s", rng.uniform(0.5, 2, (c, 1, 1)).astype(np.float32)),
        const("t", rng.normal(0, 1, (1, c, 1, 1)).astype(np.float32)),
        const("d", np.float32(4.0)),
        const("one", np.ones((1, c, 1, 1), np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Mul", ["s", "c"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["a"]),
        helper.make_node("Div", ["a", "d"], ["q"]),
        helper.make_node("Mul", ["q", "one"], ["y"]),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
    result = optimize(ModelArtifact.from_model(model), DEFAULT_PASSES)
    assert ops(result.artifact) == ["Conv"]
    assert_same_outputs(model, result.artifact, random_inputs(model, seed=1))


def test_unsupported_patterns_are_left_alone(rng):
    """A Conv output used twice, a BN with non-constant stats and a broadcasting Mul stay as they are."""
    inits = [
        const("w", rng.normal(0, 0.3, (3, 3, 1, 1)).astype(np.float32)),
        const("s", rng.uniform(0.5, 2, (1, 3, 1, 5)).astype(np.float32)),  # varies along width: not per-channel
        const("g", np.ones(3, np.float32)), const("b", np.zeros(3, np.float32)),
        const("v", np.ones(3, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Mul", ["c", "s"], ["m"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["c2"]),
        helper.make_node("ReduceMean", ["x"], ["mean_dyn"], axes=[0, 2, 3], keepdims=0),
        helper.make_node("BatchNormalization", ["c2", "g", "b", "mean_dyn", "v"], ["y2"]),
    ]
    model = make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 3, 4, 5]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 3, 4, 5])], inits,
    )
    result = optimize(ModelArtifact.from_model(model), DEFAULT_PASSES)
    assert sorted(ops(result.artifact)) == sorted(ops(model))
    assert_same_outputs(model, result.artifact, random_inputs(model, seed=2))


def test_transposes_and_reshapes_merge_exactly(rng):
    inits = [const("shape1", np.array([1, 6, 4], np.int64)), const("shape2", np.array([4, 6], np.int64))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),  # composes to identity
        helper.make_node("Relu", ["t2"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t3"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["t3"], ["t4"], perm=[0, 1, 3, 2]),
        helper.make_node("Reshape", ["t4", "shape1"], ["s1"]),
        helper.make_node("Reshape", ["s1", "shape2"], ["y"]),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], inits)
    result = optimize(ModelArtifact.from_model(model), ["optimize"])
    got = ops(result.artifact)
    assert got.count("Transpose") == 1 and got.count("Reshape") == 1, got
    assert_same_outputs(model, result.artifact, random_inputs(model, seed=4))


# ---- simplify: folding and static shapes -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory):
    """A small YOLO-style detector with a dynamic batch: SiLU convs, box decode, sigmoid scores, one concat."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU())
            self.head = nn.Conv2d(8, 2 * 7, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            p = self.head(self.body(image))
            b, _, h, w = p.shape
            p = p.view(b, 2, 7, h, w).permute(0, 1, 3, 4, 2)
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((xs, ys), -1).float()
            xy = (p[..., :2].sigmoid() + grid) * (640.0 / w)
            wh = p[..., 2:4].exp() * 16.0
            boxes = torch.cat((xy - wh / 2, xy + wh / 2), -1)
            return torch.cat((boxes, p[..., 4:].sigmoid()), -1).reshape(b, -1, 7)

    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("det") / "det.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["image"],
                      output_names=["detections"], dynamic_axes={"image": {0: "batch"}, "detections": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def test_static_shapes_let_more_fold(detector_onnx):
    dynamic = optimize(detector_onnx, ["simplify"])
    static = optimize(detector_onnx, [("simplify", {"input_shapes": {"image": [1, 3, 32, 32]}})])
    n_orig = len(ops(ModelArtifact.load(detector_onnx)))
    n_dyn, n_static = len(ops(dynamic.artifact)), len(ops(static.artifact))
    assert n_static <= n_dyn < n_orig
    assert "Shape" not in ops(static.artifact)
    assert "Shape" not in ops(dynamic.artifact), "batch-size reads feeding Reshape become 0/-1 constants"
    dims = static.artifact.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 32]
    assert static.artifact.metadata["input_shapes"] == {"image": [1, 3, 32, 32]}
    feeds = random_inputs(static.artifact.model, seed=5, low=0, high=1)
    assert_same_outputs(detector_onnx, static.artifact, feeds, atol=1e-3)


def test_dynamic_batch_survives_default_passes(detector_onnx):
    result = optimize(detector_onnx, dims={"batch": 3})
    dims = result.artifact.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    feeds = random_inputs(result.artifact.model, seed=6, low=0, high=1, dims={"batch": 3})
    assert feeds["image"].shape[0] == 3
    assert_same_outputs(detector_onnx, result.artifact, feeds, atol=1e-3)


def test_fixing_a_static_input_to_another_shape_is_refused(detector_onnx):
    static = optimize(detector_onnx, [("simplify", {"input_shapes": {"image": [1, 3, 32, 32]}})]).artifact
    with pytest.raises(OptionError, match="image"):
        optimize(static, [("simplify", {"input_shapes": {"image": [1, 3, 64, 64]}})])
    with pytest.raises(UnknownNameError, match="did you mean: image"):
        optimize(static, [("simplify", {"input_shapes": {"imag": [1, 3, 32, 32]}})])


# ---- remove-sigmoid ------------------------------------------------------------------------------------------
def test_remove_sigmoid_turns_scores_into_logits_only(detector_onnx):
    base = optimize(detector_onnx, ["simplify"]).artifact
    result = optimize(base, [("remove-sigmoid", {"thresholds": {"detections": 0.25}})])
    feeds = random_inputs(base.model, seed=7, low=0, high=1, dims={"batch": 2})
    old, new = outputs(base, feeds)["detections"], outputs(result.artifact, feeds)["detections"]
    np.testing.assert_array_equal(new[..., :4], old[..., :4])  # boxes untouched, bit for bit
    np.testing.assert_allclose(1 / (1 + np.exp(-new[..., 4:].astype(np.float64))), old[..., 4:], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(new[..., 4:], old[..., 4:])
    info = result.artifact.metadata["sigmoid_removed"]["outputs"]["detections"]
    assert info["channels"] == [4, 5, 6]
    assert ops(result.artifact).count("Sigmoid") == ops(base).count("Sigmoid") - 1  # the box sigmoid stays
    thresholds = result.artifact.metadata["thresholds"]["detections"]
    assert thresholds["probability"] == 0.25
    assert thresholds["logit"] == pytest.approx(np.log(0.25 / 0.75))
    # the logit threshold selects exactly the same detections as the probability threshold
    assert np.array_equal(new[..., 4:] > thresholds["logit"], old[..., 4:] > 0.25)


def test_remove_sigmoid_direct_output_and_bad_threshold():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [])
    result = optimize(ModelArtifact.from_model(model), [("remove-sigmoid", {"threshold": 0.5})])
    assert ops(result.artifact) == ["Relu"]
    assert [o.name for o in result.artifact.model.graph.output] == ["y"]
    assert result.artifact.metadata["thresholds"]["y"]["logit"] == 0.0
    with pytest.raises(OptionError, match="between 0 and 1"):
        optimize(ModelArtifact.from_model(model), [("remove-sigmoid", {"threshold": 1.5})])


def test_remove_sigmoid_between_graph_input_and_output():
    model = make_model([helper.make_node("Sigmoid", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [])
    result = optimize(ModelArtifact.from_model(model), ["remove-sigmoid"])
    assert ops(result.artifact) == ["Identity"]
    feeds = random_inputs(model, seed=11)
    np.testing.assert_array_equal(outputs(result.artifact, feeds)["y"], feeds["x"])


def test_remove_sigmoid_leaves_internal_sigmoids():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]  # SiLU
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [])
    result = optimize(ModelArtifact.from_model(model), ["remove-sigmoid"])
    assert ops(result.artifact) == ["Sigmoid", "Mul"]
    assert "sigmoid_removed" not in result.artifact.metadata


# ---- fuse-preprocess -----------------------------------------------------------------------------------------
def test_fuse_preprocess_folds_the_models_own_normalisation(digits_onnx, digits_data):
    base = optimize(digits_onnx).artifact
    assert {"Div", "Sub"} <= set(ops(base))
    result = optimize(base, ["fuse-preprocess"])
    got = ops(result.artifact)
    assert "Div" not in got and "Sub" not in got
    info = result.artifact.metadata["preprocess"]
    assert info["graph_ops"] == ["Div", "Sub"] and info["input"] == "image"
    # the stem Conv pads by 1: the border stays exact through an explicit Pad of the raw value 8 (= 0 after x/16-0.5)
    assert info["folded_into"][0]["raw_pad_value"] == pytest.approx(8.0)
    _, _, x_test, _ = digits_data
    assert_same_outputs(base, result.artifact, {"image": x_test[:64]}, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def unpadded_conv_model(rng):
    inits = [const("w", rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32)),
             const("b", rng.normal(0, 0.1, 4).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="stem"), helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)


def test_fuse_declared_imagenet_preprocessing_with_bgr_swap(unpadded_conv_model):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    options = {"scale": [1 / 255], "mean": mean, "std": std, "swap_rb": True}
    result = optimize(ModelArtifact.from_model(unpadded_conv_model), [("fuse-preprocess", options)])
    assert ops(result.artifact) == ["Conv", "Relu"]
    info = result.artifact.metadata["preprocess"]
    assert info["swap_rb"] is True and info["mean"] == mean and info["declared"] is True
    assert info["max_abs_diff"] < 1e-3
    raw = np.random.default_rng(0).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    preprocessed = ((raw[:, ::-1] / 255 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1)))
    old = outputs(unpadded_conv_model, {"x": preprocessed.astype(np.float32)})["y"]
    new = outputs(result.artifact, {"x": raw})["y"]
    np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-4)


def test_fuse_preprocess_to_uint8_camera_input(unpadded_conv_model):
    options = {"scale": [1 / 255], "mean": [0.5], "std": [0.25], "input_dtype": "uint8"}
    result = optimize(ModelArtifact.from_model(unpadded_conv_model), [("fuse-preprocess", options)])
    assert ops(result.artifact) == ["Cast", "Conv", "Relu"]
    assert result.artifact.model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    raw = np.random.default_rng(2).integers(0, 256, (1, 3, 8, 8)).astype(np.uint8)
    old = outputs(unpadded_conv_model, {"x": ((raw / 255 - 0.5) / 0.25).astype(np.float32)})["y"]
    np.testing.assert_allclose(outputs(result.artifact, {"x": raw})["y"], old, rtol=1e-4, atol=1e-4)
    assert result.artifact.metadata["preprocess"]["input_dtype"] == "uint8"


def test_fuse_preprocess_refuses_per_channel_mean_before_padding(rng):
    inits = [const("w", rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="padded_stem")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    with pytest.raises(OptionError, match="padded_stem.*pad"):
        optimize(ModelArtifact.from_model(model), [("fuse-preprocess", {"mean": [0.4, 0.5, 0.6]})])
    # a uniform mean is exact through an explicit Pad
    result = optimize(ModelArtifact.from_model(model), [("fuse-preprocess", {"scale": [2.0], "mean": [0.5]})])
    assert ops(result.artifact) == ["Pad", "Conv"]


def _swap_then_conv(rng, swap_nodes, affine, pads):
    """x -> channel swap (given nodes, output "s") -> per-channel affine -> Conv -> Relu."""
    inits = [const("w", rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32)),
             const("b", rng.normal(0, 0.1, 4).astype(np.float32))]
    nodes, previous = list(swap_nodes), "s"
    for index, (op, vector) in enumerate(affine):
        inits.append(const(f"k{index}", np.asarray(vector, np.float32).reshape(1, 3, 1, 1)))
        nodes.append(helper.make_node(op, [previous, f"k{index}"], [f"a{index}"]))
        previous = f"a{index}"
    nodes += [helper.make_node("Conv", [previous, "w", "b"], ["c"], pads=pads, name="stem"),
              helper.make_node("Relu", ["c"], ["y"])]
    return nodes, inits


def test_fuse_preprocess_folds_an_in_graph_channel_swap(rng):
    """x[:, [2, 1, 0]] as a Gather, then per-channel mean/std: all of it goes into the Conv, exactly."""
    nodes, inits = _swap_then_conv(rng, [helper.make_node("Gather", ["x", "idx"], ["s"], axis=1)],
                                   [("Sub", [0.4, 0.5, 0.6]), ("Div", [0.2, 0.25, 0.3])], pads=[0, 0, 0, 0])
    inits.append(const("idx", np.array([2, 1, 0], np.int64)))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    result = optimize(ModelArtifact.from_model(model), ["fuse-preprocess"])
    assert ops(result.artifact) == ["Conv", "Relu"]
    info = result.artifact.metadata["preprocess"]
    assert info["graph_ops"] == ["Gather", "Sub", "Div"] and info["graph_channel_order"] == [2, 1, 0]
    x = np.random.default_rng(3).uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(result.artifact, {"x": x})["y"], outputs(model, {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)


def test_fuse_preprocess_in_graph_flip_and_declared_swap_cancel(rng):
    """x[:, ::-1] as a reversing Slice in the model, and the camera's BGR declared: the swaps cancel, the
    uniform mean goes through a raw-value Pad of the padded Conv."""
    bounds = [const("st", np.array([-1], np.int64)), const("en", np.array([-(2**63)], np.int64)),
              const("ax", np.array([1], np.int64)), const("sp", np.array([-1], np.int64))]
    nodes, inits = _swap_then_conv(rng, [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"])],
                                   [("Mul", [2.0, 3.0, 4.0])], pads=[1, 1, 1, 1])
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits + bounds)
    options = {"scale": [1 / 255], "mean": [0.5], "swap_rb": True}
    result = optimize(ModelArtifact.from_model(model), [("fuse-preprocess", options)])
    assert ops(result.artifact) == ["Pad", "Conv", "Relu"]
    assert result.artifact.metadata["preprocess"]["graph_channel_order"] == [2, 1, 0]
    raw = np.random.default_rng(4).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    old = outputs(model, {"x": (raw[:, ::-1] / 255 - 0.5).astype(np.float32)})["y"]
    np.testing.assert_allclose(outputs(result.artifact, {"x": raw})["y"], old, rtol=1e-4, atol=1e-4)


def test_fuse_preprocess_leaves_a_channel_subset_alone(rng):
    """A Gather keeping 2 of 3 channels is not a permutation: nothing to fold, a clear refusal."""
    nodes, inits = _swap_then_conv(rng, [helper.make_node("Gather", ["x", "idx"], ["s"], axis=1)], [], [0] * 4)
    inits.append(const("idx", np.array([2, 1, 1], np.int64)))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    with pytest.raises(OptionError, match="Gather"):
        optimize(ModelArtifact.from_model(model), [("fuse-preprocess", {"scale": [0.5]})])


def test_fuse_preprocess_refuses_when_input_does_not_feed_a_conv():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [])
    with pytest.raises(OptionError, match="Relu"):
        optimize(ModelArtifact.from_model(model), [("fuse-preprocess", {"scale": [0.5]})])


# ---- control flow ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lstm_onnx(tmp_path_factory):
    torch = pytest.importorskip("torch")

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 8, batch_first=True)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(x)[0]).sigmoid()

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lstm") / "lstm.onnx"
    torch.onnx.export(Tagger().eval(), (torch.zeros(1, 5, 6),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    return path


def if_model(rng):
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["out_then"])], "then", [],
        [helper.make_tensor_value_info("out_then", TensorProto.FLOAT, [2, 3])], [const("two", np.float32(2.0))])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["ident"]), helper.make_node("Neg", ["ident"], ["out_else"])], "else",
        [], [helper.make_tensor_value_info("out_else", TensorProto.FLOAT, [2, 3])], [])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Identity", ["branch"], ["mid"]),
        helper.make_node("Add", ["mid", "zeros"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                      [const("zero", np.float32(0.0)), const("zeros", np.zeros((2, 3), np.float32))])


def test_control_flow_models_still_run_after_every_pass(lstm_onnx, rng):
    lstm = optimize(lstm_onnx, [*DEFAULT_PASSES, "remove-sigmoid"])
    assert "LSTM" in ops(lstm.artifact)
    feeds = random_inputs(lstm.artifact.model, seed=8)
    old, new = outputs(lstm_onnx, feeds)["y"], outputs(lstm.artifact, feeds)["y"]
    np.testing.assert_allclose(1 / (1 + np.exp(-new.astype(np.float64))), old, rtol=1e-4, atol=1e-5)

    model = if_model(rng)
    result = optimize(ModelArtifact.from_model(model), DEFAULT_PASSES)
    assert "If" in ops(result.artifact)
    for sign in (1.0, -1.0):  # both branches
        feeds = {"x": np.abs(np.random.default_rng(9).normal(size=(2, 3))).astype(np.float32) * sign}
        assert_same_outputs(model, result.artifact, feeds)


# ---- external data ---------------------------------------------------------------------------------------------
def test_external_data_model_goes_through_the_passes(conv_bn_model, tmp_path):
    source = tmp_path / "ext.onnx"
    ModelArtifact.from_model(conv_bn_model).save(source, external_data=True)
    assert ModelArtifact.load(source).has_external_data()
    out = tmp_path / "out" / "ext.opt.onnx"
    result = optimize(source, output=out, external_data=True)
    assert (out.parent / (out.name + ".data")).exists()
    assert "BatchNormalization" not in ops(result.artifact)
    assert_same_outputs(conv_bn_model, out, random_inputs(conv_bn_model, seed=10))


# ---- the numerical check names the failing pass ------------------------------------------------------------------
def test_numerical_check_failure_names_the_pass(conv_bn_model):
    from trtkit import hookimpl
    from trtkit.registry import load_plugins
    from trtkit.stages import GraphPass

    def perturb(artifact):
        result = artifact.copy()
        for tensor in result.model.graph.initializer:
            if tensor.name == "b1":
                values = numpy_helper.to_array(tensor) + 0.5
                tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), "b1"))
        return result

    plugin = types.SimpleNamespace(
        register_passes=hookimpl(lambda register: register(GraphPass("perturb-bias", "wrong on purpose",
                                                                       apply=perturb))),
        __name__="broken_pass_plugin",
    )
    registry = load_plugins(extra_modules=[plugin])
    artifact = ModelArtifact.from_model(conv_bn_model)
    with pytest.raises(NumericalCheckError, match="pass 'perturb-bias' changed output 'y'"):
        optimize(artifact, ["simplify", "perturb-bias"], registry=registry)
    unchecked = optimize(artifact, ["perturb-bias"], registry=registry, check=False)
    assert unchecked.reports[0].max_abs_diff is None


def test_unknown_pass_and_option_names_suggest_close_matches(conv_bn_model):
    artifact = ModelArtifact.from_model(conv_bn_model)
    with pytest.raises(UnknownNameError, match="did you mean: simplify"):
        optimize(artifact, ["simplfy"])
    with pytest.raises(OptionError, match="did you mean: fold_bn"):
        optimize(artifact, ["optimize"], options={"fold_bm": "false"})
    with pytest.raises(OptionError, match="selected pass"):
        optimize(artifact, ["optimize"], options={"simplify.fold": "false"})
