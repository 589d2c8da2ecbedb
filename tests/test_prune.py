"""Structured pruning (trtkit.pruning, plugins/pruning, `trtkit prune`): real torch models, real onnxruntime."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from conftest import run_cli

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")


from trtkit import pruning  # noqa: E402
from trtkit.errors import OptionError, UnknownNameError  # noqa: E402

MODEL_FILE = '''
import torch
from torch import nn


class Block(nn.Module):
    """Depthwise + pointwise with a residual Add (the Add couples the channels of input and output)."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw(torch.relu(self.bn(self.dw(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b1 = Block(16)
        self.mid = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.b2 = Block(32)
        self.mix = nn.Conv2d(64, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.b1(torch.relu(self.bn(self.stem(x))))
        x = self.b2(self.mid(x))
        x = self.mix(torch.cat([x, x * 0.5], 1))  # a Concat: both halves prune together
        return self.head(x.mean((2, 3)))


def net():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # BatchNorm scales that differ, so bn-scale has something to rank
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.1, 1.0)
    return model


class Untraceable(nn.Module):
    """The channel count is chosen in Python from a weight: the dependency graph cannot see it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.b(self.a(x))
        y = y[:, : self.a.out_channels] + torch.zeros(1, 8, 1, 1)  # a fixed-size constant
        return self.head(y.mean((2, 3)))


def untraceable():
    return Untraceable().eval()
'''


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def load(model_file, name="net"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"nets_{name}", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)()


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "taylor"])
def test_every_builtin_criterion_prunes_and_keeps_the_interface(model_file, criterion):
    model = load(model_file)
    x = torch.randn(4, 3, 16, 16)
    pruned, report = pruning.prune(model, x[:1], criterion=criterion, ratio=0.5, data=x.numpy())
    assert pruned(x).shape == (4, 10)
    assert report["after"]["macs"] < 0.5 * report["before"]["macs"]
    assert report["narrowed"]["b1.dw"] == {"before": 16, "after": 8}  # depthwise follows its input
    assert "head" in report["kept"] and pruned.head.out_features == 10
    assert model.stem.out_channels == 16  # the original is untouched


def test_criteria_rank_channels_differently(model_file):
    """bn-scale keeps the channels with the largest |gamma|, averaged over the group's BatchNorms (the stem's
    channels are coupled to block 1's depthwise BatchNorm through the residual Add)."""
    model = load(model_file)
    x = torch.randn(1, 3, 16, 16)
    pruned, _ = pruning.prune(model, x, criterion="bn-scale", ratios={"stem": 0.5})
    score = model.bn.weight.detach().abs() + model.b1.bn.weight.detach().abs()
    best = torch.sort(torch.topk(score, 8).indices).values
    assert torch.equal(pruned.bn.weight.detach(), model.bn.weight.detach()[best])
    by_l1, _ = pruning.prune(model, x, criterion="l1", ratios={"stem": 0.5})
    assert not torch.equal(by_l1.bn.weight.detach(), pruned.bn.weight.detach())


def test_target_flops_global_and_round_to(model_file):
    model = load(model_file)
    x = torch.randn(1, 3, 16, 16)
    pruned, report = pruning.prune(model, x, target_flops=0.7, global_ranking=True)
    assert 0.4 < report["macs_fraction"] <= 0.7
    rounded, report8 = pruning.prune(model, x, ratio=0.3, round_to=8)
    assert all(layer["after"] % 8 == 0 for layer in report8["narrowed"].values())
    ignored, report_ignored = pruning.prune(model, x, ratio=0.5, ignore=["mid"])
    assert ignored.mid.out_channels == 32 and "mid" not in report_ignored["narrowed"]


def test_pruned_model_exports_and_matches_torch_in_onnxruntime(model_file, tmp_path):
    from trtkit.exporting import export
    from trtkit.runtime import session

    model = load(model_file)
    x = torch.randn(3, 3, 16, 16)
    pruned, _ = pruning.prune(model, x[:1], ratio=0.3)
    artifact = export(pruned, tmp_path / "p.onnx", input_shapes=[[1, 3, 16, 16]], dynamic_batch=True)
    sess = session(artifact.model)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, pruned(x).detach().numpy(), atol=1e-4)


def test_python_api_bad_input(model_file):
    model = load(model_file)
    x = torch.randn(1, 3, 16, 16)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(OptionError, match=r"ratio must be in \(0, 1\)"):
            pruning.prune(model, x, ratio=bad)
    with pytest.raises(UnknownNameError, match="unknown layer 'stemm'.*stem"):
        pruning.prune(model, x, ratio=0.3, ignore=["stemm"])
    with pytest.raises(UnknownNameError, match="unknown pruning criterion 'l3'"):
        pruning.prune(model, x, ratio=0.3, criterion="l3")
    with pytest.raises(OptionError, match="needs data"):
        pruning.prune(model, x, ratio=0.3, criterion="taylor")
    with pytest.raises(pruning.UntraceableModelError, match="cannot trace"):
        pruning.prune(load(model_file, "untraceable"), x, ratio=0.5)


def test_cli_prunes_exports_and_reports(model_file, tmp_path):
    out = tmp_path / "small.onnx"
    result = run_cli("prune", f"{model_file}:net", "-i", "1x3x16x16", "-o", str(out), "--ratio", "0.5",
                     "--criterion", "l2", "--round-to", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["criterion"] == "l2" and report["macs_fraction"] < 0.5
    import onnx

    model = onnx.load(out)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert [8, 3, 3, 3] in shapes.values()  # the stem lost half of its 16 filters
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:] == [10]


def test_cli_reconstructs_and_keeps_residual_streams(model_file, tmp_path):
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    result = run_cli("prune", f"{model_file}:net", "-i", "1x3x16x16", "-o", str(tmp_path / "small.onnx"),
                     "--ratio", "0.5", "-d", str(data), "--reconstruct", "--keep-coupled", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["keep_coupled"] and report["compensated"] > 0 and report["reconstructed"]
    assert "stem" not in report["narrowed"] and "b1.pw" not in report["narrowed"]  # tied by b1's Add


@pytest.mark.parametrize(("args", "message"), [
    (["--ratio", "1.2"], "ratio must be in (0, 1), got 1.2"),
    (["--ratio", "0"], "ratio must be in (0, 1), got 0.0"),
    (["--target-flops", "1.0"], "target_flops must be in (0, 1), got 1.0"),
    (["--ratio", "0.3", "--ignore", "b1.pww"], "unknown layer 'b1.pww'"),
    (["--layer-ratio", "nope=0.5"], "unknown layer 'nope'"),
    (["--ratio", "0.3", "--criterion", "taylor"], "needs data"),
    (["--ratio", "0.3", "--reconstruct"], "reconstruct needs data"),
])
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(model_file, tmp_path, args, message):
    out = tmp_path / "small.onnx"
    result = run_cli("prune", f"{model_file}:net", "-i", "1x3x16x16", "-o", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == [model_file]


def test_cli_untraceable_model_is_one_line_exit_2(model_file, tmp_path):
    out = tmp_path / "u.onnx"
    result = run_cli("prune", f"{model_file}:untraceable", "-i", "1x3x8x8", "-o", str(out), "--ratio", "0.5")
    assert result.returncode == 2, result.stderr
    assert "cannot trace" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


class RandomCriterion:
    """A plugin object registering a criterion (the hook a third-party distribution implements)."""

    __name__ = "random_criterion_plugin"

    @staticmethod
    def register_pruning_criteria(register):
        from trtkit.stages import Option, PruningCriterion

        def score(weight, kind, grad=None, seed=0):
            generator = torch.Generator().manual_seed(seed + weight.shape[0])
            return torch.rand(weight.shape[0], generator=generator)

        register(PruningCriterion(name="random", description="random scores (a baseline)", score=score,
                                  kinds=("conv",), options={"seed": Option("int", 0, "seed")}))


def test_a_plugin_criterion_is_found_by_name_and_gets_its_options(model_file, monkeypatch):
    from trtkit import hookimpl, registry

    plugin = RandomCriterion()
    plugin.register_pruning_criteria = hookimpl(RandomCriterion.register_pruning_criteria)
    monkeypatch.setenv("TRTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    loaded = registry.load_plugins(extra_modules=[plugin])
    assert not loaded.problems
    monkeypatch.setattr(registry, "_registry", loaded)
    model = load(model_file)
    x = torch.randn(1, 3, 16, 16)
    a, _ = pruning.prune(model, x, criterion="random", ratio=0.5, options={"seed": 1})
    b, _ = pruning.prune(model, x, criterion="random", ratio=0.5, options={"seed": 2})
    assert a.stem.out_channels == b.stem.out_channels == 8
    assert not torch.equal(a.stem.weight, b.stem.weight)  # the option reached the score
    with pytest.raises(OptionError, match="has no option 'sed'"):
        pruning.prune(model, x, criterion="random", ratio=0.5, options={"sed": 2})
