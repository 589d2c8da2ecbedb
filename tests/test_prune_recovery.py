"""Pruning's recovery without training (trtkit.pruning: compensate, reconstruct, keep_coupled): real torch
nets, checked against the unpruned network's outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from torch import nn  # noqa: E402

from trtkit import pruning  # noqa: E402
from trtkit.errors import OptionError  # noqa: E402


class Net(nn.Module):
    """conv 3x3 -> BN -> ReLU6 -> 1x1 conv (no bias) -> BN -> ReLU6 -> 1x1 conv -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = nn.functional.relu6(self.bn(self.stem(x)))
        x = nn.functional.relu6(self.bn2(self.expand(x)))
        return self.head(self.project(x).mean((2, 3)))


def net(dead: int = 0) -> Net:
    """`dead` stem channels have BatchNorm scale 0 and bias 1.5: they output the constant relu6(1.5)."""
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 1.0)
        model.bn.weight[:dead] = 0.0
        model.bn.bias[:dead] = 1.5
    return model


def error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = dense(x)
        return float((model(x) - want).pow(2).mean() / want.pow(2).mean())


def test_a_constant_channel_is_removed_exactly_when_its_mean_is_folded_into_the_consumer():
    """bn-scale removes the gamma = 0 channels first; they output a constant the 1x1 consumer summed."""
    dense = net(dead=2)
    x = torch.randn(16, 3, 12, 12)
    data = torch.randn(32, 3, 12, 12).numpy()
    plain, report = pruning.prune(dense, x[:1], criterion="bn-scale", ratios={"stem": 0.25}, compensate=False)
    folded, report_folded = pruning.prune(dense, x[:1], criterion="bn-scale", ratios={"stem": 0.25}, data=data)
    assert report["narrowed"]["stem"] == {"before": 8, "after": 6}
    assert report["compensated"] == 0 and report_folded["compensated"] == 1
    assert error(plain, dense, x) > 1e-3
    assert error(folded, dense, x) < 1e-10
    assert folded.expand.bias is not None and dense.expand.bias is None  # the original is untouched


def test_reconstruction_refits_the_consumers_towards_the_dense_outputs():
    dense = net()
    data = torch.randn(64, 3, 12, 12).numpy()
    x = torch.randn(32, 3, 12, 12)
    folded, _ = pruning.prune(dense, x[:1], ratio=0.4, data=data)
    refitted, report = pruning.prune(dense, x[:1], ratio=0.4, data=data, reconstruct=True)
    assert set(report["reconstructed"]) >= {"expand", "project"}
    assert all(after < before for before, after in report["reconstructed"].values())
    assert error(refitted, dense, x) < 0.7 * error(folded, dense, x)  # held-out samples, not the fitted ones
    assert refitted(x).shape == (32, 5)


def test_keep_coupled_leaves_residual_streams_alone():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.expand = nn.Conv2d(16, 32, 1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.project = nn.Conv2d(32, 16, 1)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            s = self.stem(x)
            s = s + self.project(torch.relu(self.dw(torch.relu(self.expand(s)))))
            return self.head(s.mean((2, 3)))

    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    _, everything = pruning.prune(model, x, ratio=0.5)
    pruned, report = pruning.prune(model, x, ratio=0.5, keep_coupled=True)
    assert {"stem", "project"} <= set(everything["narrowed"])
    assert set(report["narrowed"]) == {"expand", "dw"}
    assert pruned.project.out_channels == 16 and pruned.expand.out_channels == 16


def test_recovery_options_need_data():
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(OptionError, match="reconstruct needs data"):
        pruning.prune(net(), x, ratio=0.3, reconstruct=True)
    with pytest.raises(OptionError, match="compensate needs data"):
        pruning.prune(net(), x, ratio=0.3, compensate=True)
