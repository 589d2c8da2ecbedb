"""QDQ placement checked structurally on models built for each rule, the exact Q/DQ relation, and a real
TensorRT (tensorrt_rtx) parse + build of the results."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from qdq_models import (
    concat_model,
    conv_model,
    detector_model,
    edge_filter_model,
    gemm_model,
    pool_model,
    random_batch,
    residual_model,
    silu_model,
    smooth_batch,
)

from trtkit.calibration import calibrate
from trtkit.errors import OptionError, UnknownNameError
from trtkit.plugins.qdq.insert import quantize
from trtkit.plugins.qdq.placement import activation_candidates
from trtkit.runtime import session


class View:
    """Structural queries on a quantized model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def source(self, node: str, slot: int) -> onnx.NodeProto | None:
        return self.producer.get(self.nodes[node].input[slot])

    def is_dq(self, node: str, slot: int) -> bool:
        producer = self.source(node, slot)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def q_input(self, node: str, slot: int) -> str:
        """The float tensor quantized on this edge (through Q -> DQ)."""
        dq = self.source(node, slot)
        assert dq is not None and dq.op_type == "DequantizeLinear"
        q = self.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        return q.input[0]

    def scale(self, node: str, slot: int) -> np.ndarray:
        return self.inits[self.source(node, slot).input[1]]

    def ops(self, op: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if n.op_type == op]


def _quantize(model, n=32, **kwargs):
    scales = calibrate(model, random_batch(model, n), method="minmax", progress=False)
    return quantize(model, scales, **kwargs), scales


def _common_checks(view: View) -> None:
    outputs = {o.name for o in view.model.graph.output}
    for node in view.model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not set(node.output) & outputs, "graph outputs must stay float"
            scale, zero = view.inits[node.input[1]], view.inits[node.input[2]]
            assert (scale > 0).all() and scale.dtype == np.float32
            assert zero.dtype == np.int8 and not zero.any()
    for node in view.model.graph.node:  # bias stays float (no int32 bias DQ: it fails the TensorRT parser)
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            assert node.input[2] in view.inits and view.inits[node.input[2]].dtype == np.float32
    onnx.checker.check_model(view.model)


def test_conv_weights_per_channel_int8_and_activations_per_tensor():
    artifact, scales = _quantize(conv_model(cout=8))
    view = View(artifact.model)
    _common_checks(view)
    for conv in ("conv1", "conv2"):
        dq = view.source(conv, 1)
        assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute}["axis"] == 0
        assert view.inits[dq.input[0]].dtype == np.int8 and view.inits[dq.input[1]].shape == (8,)
        assert view.scale(conv, 0).shape == ()
    assert view.q_input("conv1", 0) == "x" and view.q_input("conv2", 0) == "relu1_out"
    assert view.scale("conv2", 0) == pytest.approx(scales["relu1_out"] / 127)
    assert "conv1_w" not in view.inits  # the float weights are gone


def test_exact_relation_of_a_quantized_conv():
    """QDQ output == float conv of (fake-quantized input, dequantized int8 weights), on real onnxruntime."""
    base = conv_model(cout=8)
    x = random_batch(base, 4, seed=3)
    artifact, scales = _quantize(base)
    view = View(artifact.model)
    dq = view.source("conv1", 1)
    w_q, w_scale = view.inits[dq.input[0]], view.inits[dq.input[1]]
    original = numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == "conv1_w"))
    np.testing.assert_array_equal(np.abs(w_q).reshape(8, -1).max(axis=1), 127)  # full int8 range per channel
    np.testing.assert_allclose(w_scale, np.abs(original).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    dequantized = w_q.astype(np.float32) * w_scale[:, None, None, None]
    assert np.abs(dequantized - original).max() <= w_scale.max() / 2 + 1e-7
    # a float model computing exactly what the QDQ graph should: first conv only
    probe = onnx.ModelProto()
    probe.CopyFrom(base)
    for t in probe.graph.initializer:
        if t.name == "conv1_w":
            t.CopyFrom(numpy_helper.from_array(dequantized, "conv1_w"))
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_tensor_value_info("conv1_out", onnx.TensorProto.FLOAT, None))
    s = np.float32(scales["x"] / 127)
    fake = np.clip(np.round(x / s), -128, 127).astype(np.float32) * s
    expected = session(probe).run(["conv1_out"], {"x": fake})[0]
    qdq = session(artifact, extra_outputs=["conv1_out"])
    got = qdq.run(["conv1_out"], {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_residual_add_is_quantized_on_the_skip_branch_only():
    view = View(_quantize(residual_model())[0].model)
    _common_checks(view)
    add = view.nodes["add"]
    assert view.source("add", 0).name == "conv2" and not view.is_dq("add", 0)  # fused branch stays float
    assert view.q_input("add", 1) == "relu0_out"  # skip branch
    # relu0_out feeds conv1 and the skip: one shared Q/DQ pair
    assert view.source("conv1", 0) is view.source("add", 1) or view.source("conv1", 0).name == view.source("add", 1).name
    assert len(view.ops("QuantizeLinear")) == 4  # x, relu0, relu1, relu2
    assert add.op_type == "Add"


def test_concat_inputs_and_output_share_one_scale():
    view = View(_quantize(concat_model())[0].model)
    _common_checks(view)
    assert view.q_input("concat", 0) == "reluA_out" and view.q_input("concat", 1) == "reluB_out"
    assert view.q_input("convC", 0) == "concat_out"
    shared = {float(view.scale("concat", 0)), float(view.scale("concat", 1)), float(view.scale("convC", 0))}
    assert len(shared) == 1


def test_concat_with_very_different_ranges_gets_no_shared_scale():
    model = concat_model()
    scales = {"x": 1.0, "reluA_out": 500.0, "reluB_out": 1.0, "concat_out": 500.0}
    view = View(quantize(model, scales).model)
    assert not view.is_dq("concat", 0) and not view.is_dq("concat", 1)
    assert view.is_dq("convC", 0)  # the conv itself is still quantized
    skipped = quantize(model, scales).metadata["quantization"]["skipped"]
    assert "differ 500x" in skipped["concat"]
    assert View(quantize(model, scales, concat_max_ratio=1000).model).is_dq("concat", 0)


def test_detector_head_concat_feeding_the_output_stays_float():
    artifact, _ = _quantize(detector_model())
    view = View(artifact.model)
    _common_checks(view)
    assert not view.is_dq("head_concat", 0) and not view.is_dq("head_concat", 1)
    assert view.q_input("box_conv", 0) == "relu_out" and view.q_input("cls_conv", 0) == "relu_out"
    # scores survive: in float emulation the sigmoid scores keep their resolution
    x = random_batch(detector_model(), 8, seed=5)
    ref = session(detector_model()).run(None, {"x": x})[0]
    got = session(artifact).run(None, {"x": x})[0]
    scores_ref, scores = ref[:, 4:], got[:, 4:]
    assert np.abs(scores - scores_ref).max() < 0.05 and np.count_nonzero(scores) == scores.size


def test_pooling_is_quantized_only_next_to_quantized_neighbours():
    view = View(_quantize(pool_model())[0].model)
    _common_checks(view)
    assert view.q_input("maxpool", 0) == "relu_out" and view.q_input("conv2", 0) == "maxpool_out"
    assert float(view.scale("maxpool", 0)) == float(view.scale("conv2", 0))  # max pooling shares its scale
    assert not view.is_dq("lonepool", 0)  # AveragePool between Sigmoid and an output: no quantized neighbour


def test_silu_group_carries_qdq_only_at_the_head():
    view = View(_quantize(silu_model())[0].model)
    _common_checks(view)
    assert not view.is_dq("sigmoid", 0) and not view.is_dq("silu", 0) and not view.is_dq("silu", 1)
    assert view.q_input("conv2", 0) == "silu_out"
    assert len(view.ops("QuantizeLinear")) == 2


def test_constant_weights_are_folded_and_quantized_per_channel():
    model = conv_model(cout=8, as_constant=True)
    assert any(n.op_type == "Constant" for n in model.graph.node)
    artifact, _ = _quantize(model)
    view = View(artifact.model)
    assert not view.ops("Constant")
    assert view.inits[view.source("conv1", 1).input[1]].shape == (8,)
    assert artifact.metadata["quantization"]["constants_folded"] == 2


def test_gemm_and_matmul_weight_axes():
    view = View(_quantize(gemm_model())[0].model)
    _common_checks(view)
    fc, mm = view.source("fc", 1), view.source("mm", 1)
    assert {a.name: a.i for a in fc.attribute}["axis"] == 0 and view.inits[fc.input[1]].shape == (10,)
    assert {a.name: a.i for a in mm.attribute}["axis"] == 1 and view.inits[mm.input[1]].shape == (5,)
    assert view.q_input("fc", 0) == "flatten_out"
    assert not view.is_dq("gap", 0)  # its neighbours (Relu, Flatten) are not quantized


def test_exclusions_and_errors(tmp_path):
    model = residual_model()
    scales = calibrate(model, random_batch(model, 8), progress=False)
    view = View(quantize(model, scales, exclude=["conv1"]).model)
    assert not view.is_dq("conv1", 0) and not view.is_dq("conv1", 1) and view.is_dq("conv2", 1)
    view = View(quantize(model, scales, exclude_op_types=["Add"]).model)
    assert not view.is_dq("add", 1)
    with pytest.raises(UnknownNameError, match=r"unknown node 'conv_1'.*did you mean: conv1"):
        quantize(model, scales, exclude=["conv_1"])
    with pytest.raises(UnknownNameError, match=r"unknown op type 'Cnv'.*did you mean: Conv"):
        quantize(model, scales, exclude_op_types=["Cnv"])
    artifact = quantize(model, {"x": 1.0})  # missing scales: those nodes stay float, with the reason
    assert artifact.metadata["quantization"]["skipped"]["conv1"] == "no scale for input 'relu0_out'"
    with pytest.raises(OptionError, match="none of the 2 tensors in the scales exist"):
        quantize(model, {"a": 1.0, "b": 2.0})
    with pytest.raises(OptionError, match="already has Q/DQ"):
        quantize(quantize(model, scales).model, scales)


def _sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - other) ** 2)))


def test_a_bad_depthwise_layer_is_found_by_exclusion_and_fixed():
    """The failure mode of BN-folded zero-sum edge filters: found by excluding one quantized node at a time
    (what the per-layer report automates), fixed with exclude=[that node]."""
    model = edge_filter_model()
    scales = calibrate(model, smooth_batch(32), method="minmax", progress=False)
    x = smooth_batch(16, seed=1)
    reference = session(model).run(None, {"x": x})[0]
    full = quantize(model, scales)
    base = _sqnr(reference, session(full).run(None, {"x": x})[0])
    gains = {}
    for node in full.metadata["quantization"]["quantized_nodes"]:
        partial = quantize(model, scales, exclude=[node])
        gains[node] = _sqnr(reference, session(partial).run(None, {"x": x})[0]) - base
    worst = max(gains, key=gains.get)
    assert worst == "dw" and gains["dw"] > 8.0, gains
    assert all(gain < 3.0 for node, gain in gains.items() if node != "dw"), gains


def test_per_tensor_and_reduce_range():
    model = conv_model()
    scales = calibrate(model, random_batch(model, 8), progress=False)
    view = View(quantize(model, scales, per_channel=False, reduce_range=True).model)
    dq = view.source("conv1", 1)
    assert view.inits[dq.input[1]].shape == () and np.abs(view.inits[dq.input[0]]).max() == 63


def test_input_untouched_output_deterministic_metadata(tmp_path):
    model = residual_model()
    onnx.save(model, tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    scales = calibrate(tmp_path / "m.onnx", random_batch(model, 8), progress=False)
    scales.save(tmp_path / "s.json")
    quantize(tmp_path / "m.onnx", tmp_path / "s.json", output=tmp_path / "a.onnx")
    quantize(tmp_path / "m.onnx", tmp_path / "s.json", output=tmp_path / "b.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    from trtkit.model import ModelArtifact

    meta = ModelArtifact.load(tmp_path / "a.onnx").metadata["quantization"]
    assert meta["method"] == "percentile" and meta["activation_amax"]["relu0_out"] == pytest.approx(scales["relu0_out"])
    assert meta["calibration"]["model"]["sha256"] == scales.model["sha256"]
    assert meta["calibration"]["model_matches"] is True
    with pytest.raises(OptionError, match="overwrite the input"):
        quantize(tmp_path / "m.onnx", scales, output=tmp_path / "m.onnx")


def test_activation_candidates_cover_what_placement_needs():
    for build in (residual_model, concat_model, pool_model, silu_model, detector_model, gemm_model):
        model = build()
        candidates = set(activation_candidates(model))
        artifact, _ = _quantize(model)
        assert set(artifact.metadata["quantization"]["activation_amax"]) <= candidates, build.__name__


# ---- TensorRT (tensorrt_rtx builds engines ahead of time on the CPU) ---------------------------------------

def trt_build(path, shape=(1, 3, 8, 8), opt=(4, 3, 8, 8), maximum=(8, 3, 8, 8)) -> bytes:
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    assert ok, errors
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, shape, opt, maximum)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0
    return bytes(engine)


@pytest.mark.parametrize("build", [residual_model, concat_model, pool_model, silu_model])
def test_qdq_models_parse_and_build_with_tensorrt_rtx(build, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    artifact, _ = _quantize(build())
    artifact.save(tmp_path / "q.onnx")
    trt_build(tmp_path / "q.onnx")


def test_qdq_builder_plugin_matches_the_api(tmp_path):
    from trtkit.registry import get_registry

    model = residual_model()
    onnx.save(model, tmp_path / "m.onnx")
    calibrate(tmp_path / "m.onnx", random_batch(model, 8), progress=False).save(tmp_path / "s.json")
    builder = get_registry().builder("qdq")
    options = builder.resolve_options({"scales": str(tmp_path / "s.json"), "exclude": "conv1"})
    assert builder.build(tmp_path / "m.onnx", tmp_path / "b.onnx", **options) == tmp_path / "b.onnx"
    quantize(tmp_path / "m.onnx", tmp_path / "s.json", output=tmp_path / "a.onnx", exclude=["conv1"])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    with pytest.raises(OptionError, match="needs option 'scales'"):
        builder.resolve_options({})


def test_old_opset_is_converted_for_per_axis_dequantize():
    model = residual_model()
    model.opset_import[0].version = 11
    artifact, _ = _quantize(model)
    assert [o.version for o in artifact.model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    x = random_batch(model, 2)
    ref = session(model).run(None, {"x": x})[0]
    got = session(artifact).run(None, {"x": x})[0]
    assert _sqnr(ref, got) > 20


def test_scales_naming_missing_tensors_are_an_error(tmp_path):
    model = residual_model()
    (tmp_path / "s.json").write_text('{"x": 1.0, "relu0_ot": 2.0}')
    with pytest.raises(UnknownNameError, match=r"s.json: unknown tensor 'relu0_ot'.*did you mean: relu0_out"):
        quantize(model, tmp_path / "s.json")
    assert quantize(model, tmp_path / "s.json", strict_names=False).metadata["quantization"]["activation_amax"]
