"""The torch exporter: real torch modules, real torch.onnx export, real onnxruntime comparison."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402

from trtkit.errors import DataError, InputFileError, OptionError, UnknownNameError  # noqa: E402
from trtkit.exporting import export  # noqa: E402
from trtkit.model import ModelArtifact  # noqa: E402
from trtkit.runtime import run, session  # noqa: E402

NET_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, image):
            x = torch.relu(self.bn(self.conv(image / 255.0)))
            return self.fc(x.mean(dim=(2, 3)))


    def factory():
        torch.manual_seed(0)
        return Net().eval()


    def not_a_module():
        return 42


    def broken():
        raise RuntimeError("weights server unreachable")
''')


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "net.py"
    path.write_text(NET_SOURCE)
    return path


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def torch_net(seed):
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def test_module_export_with_dynamic_batch_matches_torch(tmp_path):
    net = torch_net(1)
    out = tmp_path / "net.onnx"
    artifact = export(net, out, input_shapes={"image": [1, 3, 8, 8]}, output_names=["logits"], dynamic_batch=True,
                      method="torchscript")
    info = artifact.metadata["export"]
    assert info["exporter"] == "torchscript" and info["opset"] == 17
    assert 0 <= info["max_abs_diff"] < 1e-4
    saved = ModelArtifact.load(out)
    assert saved.metadata["export"]["max_abs_diff"] == info["max_abs_diff"]
    assert saved.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    got = run(session(out), {"image": x})["logits"]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_export_is_deterministic(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export(torch_net(2), a, input_shapes=[1, 3, 8, 8], method="torchscript")
    export(torch_net(2), b, input_shapes=[1, 3, 8, 8], method="torchscript")
    assert sha(a) == sha(b)


def test_factory_spec_with_weights_only_checkpoint(net_file, tmp_path):
    spec = f"{net_file}:factory"
    # a checkpoint trained elsewhere: different weights, wrapped the way training loops save them
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(net_file), "exec"), namespace)  # the same class, to make a checkpoint
    torch.manual_seed(7)
    trained = namespace["Net"]().eval()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, ckpt)
    out = tmp_path / "net.onnx"
    export(spec, out, input_shapes={"image": "1x3x8x8"}, checkpoint=ckpt, method="torchscript")
    x = np.random.default_rng(1).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = trained(torch.from_numpy(x)).numpy()
    got = run(session(out), {"image": x})["output"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert ModelArtifact.load(out).metadata["export"]["checkpoint"] == "ckpt.pt"


def test_bad_checkpoints_are_refused(net_file, tmp_path):
    spec = f"{net_file}:factory"
    wrong = tmp_path / "wrong.pt"
    torch.save({"other.weight": torch.zeros(3)}, wrong)
    with pytest.raises(DataError, match="wrong.pt.*does not match"):
        export(spec, tmp_path / "a.onnx", input_shapes=["1x3x8x8"], checkpoint=wrong, method="torchscript")
    pickled = tmp_path / "pickled.pt"
    torch.save({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, pickled)
    with pytest.raises(InputFileError, match="pickled.pt.*weights-only"):
        export(spec, tmp_path / "b.onnx", input_shapes=["1x3x8x8"], checkpoint=pickled, method="torchscript")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_bad_sources_and_options(net_file, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(InputFileError, match="missing.py"):
        export(f"{tmp_path / 'missing.py'}:factory", out, input_shapes=["1x3x8x8"])
    with pytest.raises(UnknownNameError, match="did you mean: factory"):
        export(f"{net_file}:factroy", out, input_shapes=["1x3x8x8"])
    with pytest.raises(OptionError, match="not a torch.nn.Module"):
        export(f"{net_file}:not_a_module", out, input_shapes=["1x3x8x8"])
    with pytest.raises(OptionError, match="weights server unreachable"):
        export(f"{net_file}:broken", out, input_shapes=["1x3x8x8"])
    with pytest.raises(OptionError, match="input shape"):
        export(f"{net_file}:factory", out)
    with pytest.raises(OptionError, match="fails on inputs of shape 1x4x8x8"):
        export(f"{net_file}:factory", out, input_shapes=["1x4x8x8"], method="torchscript")
    with pytest.raises(OptionError, match="did you mean: opset"):
        export(f"{net_file}:factory", out, input_shapes=["1x3x8x8"], options={"opsett": 17})
    with pytest.raises(OptionError, match="must be one of"):
        export(f"{net_file}:factory", out, input_shapes=["1x3x8x8"], method="onnxscript")
    with pytest.raises(InputFileError, match="no_such_package"):
        export("no_such_package.models:factory", out, input_shapes=["1x3x8x8"])
    assert not out.exists()


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    out = tmp_path / "dynamo.onnx"
    artifact = export(torch_net(3), out, input_shapes={"image": [1, 3, 8, 8]}, output_names=["logits"])
    assert artifact.metadata["export"]["exporter"] == "dynamo"  # auto picks dynamo when onnxscript is installed
    assert artifact.metadata["export"]["max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob("*.data")), "dynamo's external data must be folded into the saved model"
    assert ModelArtifact.load(out).model.graph.output[0].name == "logits"


def test_cli_export_then_optimize(net_file, tmp_path):
    out = tmp_path / "cli.onnx"
    result = run_cli("export", f"{net_file}:factory", "-o", str(out), "--input", "image:1x3x8x8", "--output-name",
                     "logits", "--dynamic-batch", "--exporter", "torchscript", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["exporter"] == "torchscript" and data["outputs"] == ["logits"] and data["max_abs_diff"] < 1e-3
    assert out.exists()
    fused = tmp_path / "fused.onnx"
    result = run_cli("optimize", str(out), "-o", str(fused), "-p", "simplify", "-p", "optimize", "-p",
                     "fuse-preprocess", "--range", "image=0,255")
    assert result.returncode == 0, result.stderr
    assert "fuse-preprocess" in result.stderr and "total nodes" in result.stderr
    ops = [n.op_type for n in ModelArtifact.load(fused).model.graph.node]
    assert "Div" not in ops and "BatchNormalization" not in ops

    missing = run_cli("export", f"{net_file}:factory", "-o", str(tmp_path / "none.onnx"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "input shape" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "none.onnx").exists()


def test_public_api_names():
    import trtkit
    from trtkit import exporting, optimizing

    assert trtkit.export is exporting.export
    assert trtkit.optimize is optimizing.optimize
    assert optimizing.DEFAULT_PASSES == ["simplify", "optimize"]
