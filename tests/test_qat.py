"""QAT: fake quantization with a straight-through estimator, learned amax, no global patching, accuracy
recovery on the digits CNN after a deliberately poor calibration, and Q/DQ ONNX that tensorrt_rtx builds."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trtkit import qat  # noqa: E402
from trtkit.errors import OptionError, UnknownNameError  # noqa: E402
from trtkit.model import ModelArtifact  # noqa: E402
from trtkit.runtime import run, session  # noqa: E402


def low_contrast(images: np.ndarray, contrast: float = 0.25) -> np.ndarray:
    """A deliberately poor calibration set: washed-out captures (pixel values squeezed towards mid-grey)."""
    return (8.0 + (images - 8.0) * contrast).astype(np.float32)


# ---- the fake quantizer ----------------------------------------------------------------------------------------
def test_fake_quantizer_forward_is_int8_grid():
    quantizer = qat.fake_quantizer()
    x = torch.linspace(-3, 3, 601)
    assert torch.equal(quantizer(x), x)  # uncalibrated: identity
    quantizer.set_amax(2.0)
    y = quantizer(x)
    scale = 2.0 / 127
    steps = y / scale
    assert torch.allclose(steps, torch.round(steps), atol=1e-4)
    assert float(y.max()) == pytest.approx(127 * scale) and float(y.min()) == pytest.approx(-128 * scale)
    inside = x.abs() <= 2.0
    assert float((y[inside] - x[inside]).abs().max()) <= scale / 2 + 1e-6


def test_straight_through_estimator_and_learned_amax_gradients():
    quantizer = qat.fake_quantizer(learn_amax=True)
    quantizer.set_amax(1.0)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.99, 1.5], requires_grad=True)
    quantizer(x).sum().backward()
    # identity gradient inside [-128/127, 1] * amax, zero outside (clipped STE)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # d/d amax: +1 for the value clipped above, -128/127 for the value clipped below
    assert float(quantizer.amax.grad) == pytest.approx(1.0 - 128 / 127)
    per_channel = qat.fake_quantizer(axis=0, weight=True, learn_amax=True)
    per_channel.set_amax([1.0, 2.0])
    w = torch.tensor([[3.0, 0.5], [1.0, -5.0]], requires_grad=True)
    per_channel(w).sum().backward()
    assert per_channel.amax.grad.tolist() == pytest.approx([1.0, -1.0])
    assert w.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_quantize_model_copies_and_never_patches_torch(digits_model):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    conv_class, linear_class = torch.nn.Conv2d, torch.nn.Linear
    qmodel = qat.quantize_model(digits_model, device="cpu")  # compared with the CPU model below
    assert torch.nn.Conv2d is conv_class and torch.nn.Linear is linear_class
    assert type(torch.nn.Conv2d(1, 1, 1)) is conv_class
    assert all(torch.equal(before[k], v) for k, v in digits_model.state_dict().items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in qmodel.modules())  # folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in digits_model.modules())
    found = qat.quantizers(qmodel)
    assert sum(q.weight for q in found.values()) == 5 and sum(not q.weight for q in found.values()) == 5
    # with every quantizer off, the BN-folded copy computes the original function
    for quantizer in found.values():
        quantizer.enabled = False
    x = torch.rand(16, 1, 8, 8) * 16
    with torch.no_grad():
        assert torch.allclose(qmodel(x), digits_model(x), atol=1e-4)
    with pytest.raises(UnknownNameError):
        qat.quantize_model(digits_model, exclude=["stem.9"])
    kept = qat.quantize_model(digits_model, exclude=["fc"])
    assert isinstance(kept.fc, torch.nn.Linear)


# ---- recovery on digits -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poor_calibration(digits_data):
    x_train = digits_data[0]
    return low_contrast(x_train[:16])


@pytest.fixture(scope="module")
def plain_ptq_accuracy(digits_onnx, digits_data, poor_calibration):
    """trtkit's own PTQ (calibrate + QDQ builder) with the poor calibration set."""
    from trtkit.calibration import calibrate
    from trtkit.plugins.qdq.insert import quantize

    _, _, x_test, y_test = digits_data
    scales = calibrate(digits_onnx, {"image": poor_calibration}, method="minmax", progress=False)
    quantized = quantize(digits_onnx, scales)
    logits = run(session(quantized), {"image": x_test})["logits"]
    fp32 = run(session(ModelArtifact.load(digits_onnx)), {"image": x_test})["logits"]
    return float((logits.argmax(1) == y_test).mean()), float((fp32.argmax(1) == y_test).mean())


@pytest.fixture(scope="module")
def qat_model(digits_model, digits_data, poor_calibration):
    x_train, y_train, _, _ = digits_data
    qmodel = qat.quantize_model(digits_model, learn_amax=True)
    amax = qat.calibrate(qmodel, [poor_calibration], method="minmax")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared test machine: one thread is fastest under contention
    try:
        losses = qat.finetune(qmodel, x_train[:512], y_train[:512], epochs=2, lr=1e-3, batch_size=32)
    finally:
        torch.set_num_threads(threads)
    return qmodel, amax, losses


@pytest.fixture(scope="module")
def qat_onnx(qat_model, tmp_path_factory):
    qmodel, _, _ = qat_model
    path = tmp_path_factory.mktemp("qat") / "digits.qat.onnx"
    qat.export_onnx(qmodel, path, torch.zeros(1, 1, 8, 8), input_names=["image"], output_names=["logits"],
                    dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def test_qat_recovers_accuracy_lost_by_poor_ptq(plain_ptq_accuracy, qat_model, qat_onnx, digits_data):
    _, _, x_test, y_test = digits_data
    ptq, fp32 = plain_ptq_accuracy
    assert ptq < fp32 - 0.3, "the poor calibration set must really hurt plain PTQ"
    qmodel, amax, losses = qat_model
    assert amax["stem.0.input_quantizer"] < 0.2  # the poor set's range (the true one is 0.5)
    assert losses[-1] < losses[0]
    logits = run(session(qat_onnx), {"image": x_test})["logits"]  # Q/DQ emulated in float, as TensorRT
    recovered = float((logits.argmax(1) == y_test).mean())
    assert recovered > ptq + 0.3
    assert recovered >= fp32 - 0.03, (ptq, recovered, fp32)
    # the exported graph computes what the fake-quantized torch model computes
    with torch.no_grad():
        torch_logits = qmodel(torch.from_numpy(x_test).to(qat.model_device(qmodel))).cpu().numpy()
    assert float((torch_logits.argmax(1) == logits.argmax(1)).mean()) > 0.99
    assert float(qmodel.stem[0].input_quantizer.amax.detach().abs()) > amax["stem.0.input_quantizer"]


def test_exported_qdq_follows_tensorrt_rules(qat_onnx):
    artifact = ModelArtifact.load(qat_onnx)
    graph = artifact.model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    computes = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(computes) == 5
    for node in computes:
        data, weight = producers[node.input[0]], producers[node.input[1]]
        assert data.op_type == "DequantizeLinear" and producers[data.input[0]].op_type == "QuantizeLinear"
        assert weight.op_type == "DequantizeLinear" and weight.input[0] in inits
        q = artifact.tensor(weight.input[0])
        assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
        scale = artifact.tensor(weight.input[1])
        assert scale.ndim == 1 and scale.size == q.shape[0] and (scale > 0).all()
        assert next(a.i for a in weight.attribute if a.name == "axis") == 0
        assert len(node.input) < 3 or node.input[2] in inits  # bias stays float
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = artifact.tensor(node.input[2])
            assert zero.dtype == np.int8 and not zero.any()
    outputs = {o.name for o in graph.output}
    assert not any(producers[o].op_type == "DequantizeLinear" for o in outputs)
    assert artifact.metadata["qat"]["learned_amax"] is True


def test_exported_qdq_parses_and_builds_with_tensorrt_rtx(qat_onnx):
    trt = pytest.importorskip("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(qat_onnx.read_bytes())
    assert ok, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layer_types = {str(network.get_layer(i).type) for i in range(network.num_layers)}
    assert any("QUANTIZE" in t for t in layer_types) and any("DEQUANTIZE" in t for t in layer_types)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 1000


def test_export_is_deterministic_and_atomic(qat_model, tmp_path):
    qmodel, _, _ = qat_model
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for path in (first, second):
        qat.export_onnx(qmodel, path, torch.zeros(1, 1, 8, 8), input_names=["image"], output_names=["logits"])
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporary leftovers
    assert qmodel.training is False


def test_qat_errors(digits_model):
    with pytest.raises(OptionError, match="no Conv or Linear"):
        qat.quantize_model(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(OptionError, match="opset"):
        qat.export_onnx(qat.quantize_model(digits_model), "/nonexistent/x.onnx", torch.zeros(1, 1, 8, 8), opset=11)
    qmodel = qat.quantize_model(digits_model)
    with pytest.raises(UnknownNameError):
        qat.set_amax(qmodel, {"stem.0.input_quantiser": 1.0})
    with pytest.raises(UnknownNameError, match="entropy"):
        qat.calibrate(qmodel, [np.zeros((2, 1, 8, 8), np.float32)], method="entropyy")
    from trtkit.errors import DataError

    with pytest.raises(DataError, match="no batches"):
        qat.calibrate(qmodel, [], method="minmax")
    with pytest.raises(OptionError):
        qat.finetune(qmodel, np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64), epochs=0)


def test_trtkit_tensorrt_rtx_builder_accepts_the_export(qat_onnx, tmp_path):
    """The same file through trtkit's own build stage (`trtkit build -b tensorrt-rtx`)."""
    pytest.importorskip("tensorrt_rtx")
    from conftest import run_cli

    engine = tmp_path / "digits.qat.engine"
    done = run_cli("build", str(qat_onnx), "-b", "tensorrt-rtx", "-o", str(engine),
                   "-O", "min_shapes=image:1x1x8x8", "-O", "opt_shapes=image:8x1x8x8",
                   "-O", "max_shapes=image:32x1x8x8", "--json")
    assert done.returncode == 0, done.stderr
    assert engine.stat().st_size > 1000
    import json

    assert json.loads(done.stdout)["precision"]["qdq"] is True


def test_label_free_distillation_with_a_custom_loss(digits_model, digits_data):
    """finetune() takes any loss: match the FP32 model's logits (no labels needed)."""
    x_train = digits_data[0][:128]
    with torch.no_grad():
        teacher = digits_model(torch.from_numpy(x_train))
    qmodel = qat.quantize_model(digits_model)
    qat.calibrate(qmodel, [x_train[:32]], method="percentile", options={"percentile": 99.0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = qat.finetune(qmodel, x_train, teacher, epochs=3, lr=5e-4, batch_size=32,
                              loss=torch.nn.functional.mse_loss)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))
