"""The bundled example: a small CNN trained on scikit-learn's digits (real 8x8 images shipped with
scikit-learn, no download). Training takes a few seconds on a CPU.

Shared by the example recipe, the tests and the benchmarks:

    x_train, y_train, x_test, y_test = load_digits_split()      # float32 NCHW in [0, 16], int64 labels
    model = train_digits_cnn(x_train, y_train, epochs=15)          # torch.nn.Module, eval mode
    path = export_digits_onnx(model, "digits.onnx")                # input "image" [N,1,8,8], output "logits"

The network sees raw pixel values 0..16; the first layer's normalisation (x / 16 - 0.5) is part of the model
as a Div/Sub pair, which the fuse-preprocess pass folds into the first Conv.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SEED = 0


def load_digits_split(test_fraction: float = 0.3, seed: int = SEED) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): x float32 [N, 1, 8, 8] with values 0..16, y int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(len(labels) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def make_digits_cnn(width: int = 16) -> Any:
    """Conv-BN-ReLU stacks with a residual block, pooling and a linear head (a miniature ResNet)."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.block = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
            )
            self.pool = nn.MaxPool2d(2)
            self.head_conv = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                                           nn.ReLU())
            self.fc = nn.Linear(2 * width, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image / 16.0 - 0.5
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            x = self.head_conv(self.pool(x))
            x = torch.mean(x, dim=(2, 3))
            return self.fc(x)

    return DigitsCNN()


def train_digits_cnn(
    x_train: np.ndarray, y_train: np.ndarray, epochs: int = 15, seed: int = SEED, width: int = 16
) -> Any:
    """Train deterministically on the CPU (a few seconds). Returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = make_digits_cnn(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def export_digits_onnx(model: Any, path: str | os.PathLike[str], opset: int = 17) -> Path:
    """Export with a dynamic batch axis through the TorchScript exporter (deterministic, no onnxscript)."""
    import torch

    from ..fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
            dynamo=False,
        )
    return path


def factory() -> Any:
    """`trtkit.examples.digits:factory`: the trained digits CNN, for `trtkit export` and recipes."""
    x_train, y_train, _, _ = load_digits_split()
    return train_digits_cnn(x_train, y_train)


def prepare_example(folder: str | os.PathLike[str]) -> Path:
    """Write the example recipe and its data (calibration images, held-out images and labels) into `folder`.

    Returns the recipe path. Existing files are replaced only when their content changes, so re-running
    keeps the recipe's cache valid.
    """
    from ..fileio import atomic_open

    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    x_train, _, x_test, y_test = load_digits_split()
    arrays = {"calibration.npy": x_train[:256], "test_images.npy": x_test, "test_labels.npy": y_test}
    for name, array in arrays.items():
        target = data / name
        if target.exists() and np.array_equal(np.load(target), array):
            continue
        with atomic_open(target, "wb") as handle:  # a file object: np.save would append .npy to a path
            np.save(handle, array)
    recipe = folder / "recipe.toml"
    text = (Path(__file__).parent / "digits.toml").read_text()
    if not recipe.exists() or recipe.read_text() != text:
        from ..fileio import write_text

        write_text(recipe, text)
    return recipe


# ---- an INT8 failure case: depthwise convs with huge zero-sum edge filters (used by tests and benchmarks) ----

EDGE_CHANNELS = (0, 5, 9)
EDGE_FACTORS = (50.0, 80.0, 30.0)


def train_edge_filter_cnn(x_train: np.ndarray, y_train: np.ndarray, epochs: int = 4, seed: int = 0) -> Any:
    """The INT8 failure case of depthwise-separable nets, reproduced on the digits.

    Conv-BN-ReLU, then two depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, BN, ReLU), global
    mean, linear head. Trained briefly; then the edge channels of the first depthwise conv are scaled up
    (BN gamma/beta x factor) and the pointwise conv scaled down by the same factor (exact in FP32)."""
    import torch
    from torch import nn

    def cbr(cin: int, cout: int, k: int, groups: int = 1) -> list:
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class DepthwiseSeparable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*cbr(1, 16, 3), *cbr(16, 16, 3, 16), *cbr(16, 32, 1), nn.MaxPool2d(2),
                                          *cbr(32, 32, 3, 32), *cbr(32, 32, 1))
            self.fc = nn.Linear(32, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(image / 16.0 - 0.5).mean(dim=(2, 3)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: one thread trains fastest under contention
    try:
        torch.manual_seed(seed)
        model = DepthwiseSeparable()
        depthwise, norm, pointwise = model.features[3], model.features[4], model.features[6]
        assert isinstance(depthwise, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)  # typed layer access
        assert isinstance(pointwise, nn.Conv2d)
        kernels = [torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
                   torch.tensor([[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]]),
                   torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])]
        mask = torch.ones_like(depthwise.weight)
        with torch.no_grad():
            for channel, kernel in zip(EDGE_CHANNELS, kernels, strict=True):
                depthwise.weight[channel, 0] = kernel * depthwise.weight[channel].norm() / kernel.norm()
                mask[channel] = 0.0  # zero-sum edge filters stay edge filters while training
        depthwise.weight.register_hook(lambda grad: grad * mask)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = torch.from_numpy(x_train[:768]), torch.from_numpy(y_train[:768])
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for index in torch.randperm(len(x), generator=generator).split(32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            for channel, factor in zip(EDGE_CHANNELS, EDGE_FACTORS, strict=True):
                norm.weight[channel] *= factor
                norm.bias[channel] *= factor
                pointwise.weight[:, channel] /= factor
    finally:
        torch.set_num_threads(threads)
    return model
