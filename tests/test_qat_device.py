"""QAT on a device: quantize_model(device=...) (default CUDA when available), and calibrate / finetune /
evaluate / export_onnx correct whatever device the model is on and whatever the inputs are (numpy, tensors).
The CUDA test skips cleanly where torch sees no GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trtkit import qat  # noqa: E402


def small_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 4)).eval()


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64) + 2 * (x[:, 0, :4].mean(axis=(1, 2)) > 0)
    return x, y


def run_qat(device: str, tmp_path, learn_amax: bool = True) -> tuple[object, float, bytes]:
    x, y = data()
    qmodel = qat.quantize_model(small_classifier(), learn_amax=learn_amax, device=device)
    assert {p.device.type for p in qmodel.parameters()} == {torch.device(device).type}
    qat.calibrate(qmodel, [x[:32], torch.from_numpy(x[32:])], method="minmax")  # numpy and CPU tensors
    assert all(q.amax.device.type == torch.device(device).type for q in qat.quantizers(qmodel).values())
    losses = qat.finetune(qmodel, x, torch.from_numpy(y), epochs=2, lr=1e-3, batch_size=16)
    assert len(losses) == 2 and all(np.isfinite(losses))
    accuracy = qat.evaluate(qmodel, torch.from_numpy(x), torch.from_numpy(y))  # tensors in, not only numpy
    artifact = qat.export_onnx(qmodel, tmp_path / f"{device}.onnx", x[:1], input_names=["x"], output_names=["y"])
    assert {p.device.type for p in qmodel.parameters()} == {torch.device(device).type}  # moved back after export
    ops = {node.op_type for node in artifact.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    return qmodel, accuracy, (tmp_path / f"{device}.onnx").read_bytes()


def test_default_device_is_cuda_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert qat.default_device() == expected
    qmodel = qat.quantize_model(small_classifier())
    assert qat.model_device(qmodel).type == expected


def test_qat_on_the_cpu_with_an_explicit_device(tmp_path):
    qmodel, accuracy, onnx_bytes = run_qat("cpu", tmp_path)
    assert 0.0 <= accuracy <= 1.0 and onnx_bytes
    moved = qat.finetune(qmodel, *data(), epochs=1, device=torch.device("cpu"))  # torch.device accepted
    assert len(moved) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
def test_qat_on_cuda_runs_evaluates_and_exports_like_the_cpu(tmp_path):
    qmodel, accuracy, cuda_bytes = run_qat("cuda", tmp_path)
    assert 0.0 <= accuracy <= 1.0
    on_cpu = copy.deepcopy(qmodel).cpu()  # the same weights and ranges, exported from the CPU
    qat.export_onnx(on_cpu, tmp_path / "copy.onnx", data()[0][:1], input_names=["x"], output_names=["y"])
    assert (tmp_path / "copy.onnx").read_bytes() == cuda_bytes
    x, y = data()
    assert abs(qat.evaluate(on_cpu, x, y) - accuracy) <= 1 / len(y)  # one flip at most from float differences
