"""The benchmark model zoo: small, deterministic FP32 ONNX models of realistic edge architectures.

Shared by every benchmark (graph passes, calibration, quantization, build speed):

    from benchmarks.models import ZOO_NAMES, build_zoo, sample_inputs

    paths = build_zoo("/tmp/zoo")                      # {"resnet": Path(".../resnet.onnx"), ...}
    paths = build_zoo("/tmp/zoo", names=["yolo"], batch=4)
    feeds = sample_inputs(paths["resnet"], n=8, seed=0)  # {"image": float32 [8, 3, 64, 64]}

Every model is exported with torch's TorchScript exporter (dynamo=False, opset 17), static batch (1 unless
asked), from seeded weights, so the same call produces byte-identical files. BatchNorm layers carry
non-trivial running statistics (means far from 0, variances far from 1, affine weights and biases) so that
folding them matters numerically. All image models take one input named "image" of shape [B, 3, 64, 64]
with values in the 0..1 range (already-normalised camera frames); the transformer takes the same image.

Models:
- "resnet": ResNet-style CNN (stem conv/BN/ReLU/maxpool, 4 basic residual blocks with strided projection
  shortcuts, global average pool, linear classifier); output "logits" [B, 10].
- "mobilenet": MobileNetV2-style (inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 project, BN and
  ReLU6, residual add when shapes match); output "logits" [B, 10].
- "yolo": conv backbone with SiLU, an FPN-free detection head predicting per-anchor boxes (decoded with
  sigmoid, grid offsets and stride into pixel coordinates 0..640) concatenated with sigmoid objectness
  and class scores into one output "detections" [B, N, 4 + 1 + C].
- "transformer": small ViT (16x16 patch embedding by strided conv, class token, learned position
  embedding, 2 pre-norm blocks with LayerNorm, 4-head attention written with MatMul/Softmax, GELU MLP);
  output "logits" [B, 10].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ZOO_NAMES: tuple[str, ...] = ("resnet", "mobilenet", "yolo", "transformer")
INPUT_NAME = "image"
IMAGE_SHAPE = (3, 64, 64)
NUM_CLASSES = 10
YOLO_CLASSES = 3
YOLO_ANCHORS = 3
YOLO_IMAGE_SIZE = 640.0
OPSET = 17
SEED = 0

_OUTPUT_NAMES = {"resnet": "logits", "mobilenet": "logits", "yolo": "detections", "transformer": "logits"}


# ---- architectures ---------------------------------------------------------------------------------------
def _realistic_bn(module: Any, generator: Any) -> None:
    """Give every BatchNorm realistic running stats and affine parameters (as after real training)."""
    import torch
    from torch import nn

    for layer in module.modules():
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = layer.num_features
            with torch.no_grad():
                layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.5 + 0.2)
                layer.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
                layer.weight.copy_(torch.rand(n, generator=generator) * 1.0 + 0.5)
                layer.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: Any = None) -> Any:
    from torch import nn

    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def make_resnet(width: int = 16) -> Any:
    """ResNet-style residual CNN (basic blocks, projection shortcuts)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = _conv_bn(cin, cout, 3, stride, act=nn.ReLU())
            self.conv2 = _conv_bn(cout, cout, 3, 1)
            self.shortcut = (
                _conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(_conv_bn(3, width, 3, 1, act=nn.ReLU()), nn.MaxPool2d(2))
            self.blocks = nn.Sequential(
                Block(width, width, 1), Block(width, 2 * width, 2),
                Block(2 * width, 4 * width, 2), Block(4 * width, 4 * width, 1),
            )
            self.fc = nn.Linear(4 * width, NUM_CLASSES)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.stem(image))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


def make_mobilenet(width: int = 16) -> Any:
    """MobileNetV2-style network: inverted residuals with depthwise convs, BN and ReLU6."""
    import torch
    from torch import nn

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_residual = stride == 1 and cin == cout
            self.body = nn.Sequential(
                _conv_bn(cin, hidden, 1, act=nn.ReLU6()),
                _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()),
                _conv_bn(hidden, cout, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.use_residual else y

    class MobileNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(3, width, 3, 2, act=nn.ReLU6())
            self.blocks = nn.Sequential(
                Inverted(width, width, 1), Inverted(width, 2 * width, 2), Inverted(2 * width, 2 * width, 1),
                Inverted(2 * width, 4 * width, 2), Inverted(4 * width, 4 * width, 1),
            )
            self.head = _conv_bn(4 * width, 8 * width, 1, act=nn.ReLU6())
            self.fc = nn.Linear(8 * width, NUM_CLASSES)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.head(self.blocks(self.stem(image)))
            return self.fc(x.mean(dim=(2, 3)))

    return MobileNet()


def make_yolo(width: int = 16) -> Any:
    """YOLO-style detector: SiLU conv backbone and a head decoding boxes to pixels (0..640) plus sigmoid scores."""
    import torch
    from torch import nn

    silu = nn.SiLU

    class Yolo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(
                _conv_bn(3, width, 3, 2, act=silu()), _conv_bn(width, 2 * width, 3, 2, act=silu()),
                _conv_bn(2 * width, 2 * width, 3, 1, act=silu()), _conv_bn(2 * width, 4 * width, 3, 2, act=silu()),
                _conv_bn(4 * width, 4 * width, 3, 1, act=silu()),
            )
            self.outputs = 4 + 1 + YOLO_CLASSES
            self.head = nn.Conv2d(4 * width, YOLO_ANCHORS * self.outputs, 1)
            self.register_buffer("anchors", torch.tensor([[16.0, 24.0], [48.0, 40.0], [96.0, 112.0]]))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            features = self.head(self.backbone(image))
            b, _, h, w = features.shape
            p = features.view(b, YOLO_ANCHORS, self.outputs, h, w).permute(0, 1, 3, 4, 2)
            stride = YOLO_IMAGE_SIZE / w
            ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            grid = torch.stack((xs, ys), dim=-1).view(1, 1, h, w, 2)
            xy = (p[..., 0:2].sigmoid() * 2.0 - 0.5 + grid) * stride
            wh = (p[..., 2:4].sigmoid() * 2.0) ** 2 * self.anchors.view(1, YOLO_ANCHORS, 1, 1, 2)
            boxes = torch.cat((xy - wh / 2, xy + wh / 2), dim=-1).clamp(0.0, YOLO_IMAGE_SIZE)
            scores = p[..., 4:].sigmoid()
            return torch.cat((boxes, scores), dim=-1).reshape(b, -1, self.outputs)

    return Yolo()


def make_transformer(dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 16) -> Any:
    """Small ViT: patch embedding, class token, LayerNorm, MatMul/Softmax attention, GELU MLP."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.scale = (dim // heads) ** -0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attention = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
            return self.proj(torch.matmul(attention, v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attention = Attention()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            tokens = (IMAGE_SHAPE[1] // patch) * (IMAGE_SHAPE[2] // patch)
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.fc = nn.Linear(dim, NUM_CLASSES)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.embed(image).flatten(2).transpose(1, 2)
            x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.position
            x = self.norm(self.blocks(x))
            return self.fc(x[:, 0])

    return ViT()


_FACTORIES = {
    "resnet": make_resnet, "mobilenet": make_mobilenet, "yolo": make_yolo, "transformer": make_transformer,
}


def make_model(name: str, seed: int = SEED) -> Any:
    """The seeded torch module of one zoo model, in eval mode, with realistic BatchNorm statistics."""
    import torch

    if name not in _FACTORIES:
        from trtkit.errors import unknown_name

        raise unknown_name("zoo model", name, ZOO_NAMES)
    torch.manual_seed(seed)
    model = _FACTORIES[name]()
    _realistic_bn(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


# ---- export ----------------------------------------------------------------------------------------------
def export_model(name: str, path: str | os.PathLike[str], batch: int = 1, dynamic_batch: bool = False,
                 opset: int = OPSET, seed: int = SEED, fold_constants: bool = True) -> Path:
    """Export one zoo model to `path` (atomically) with the TorchScript exporter.

    fold_constants=False keeps what torch would fold on export (BatchNormalization nodes, Constant chains),
    as other exporters and older pipelines produce: the raw material graph passes are judged on.
    """
    import torch

    from trtkit.fileio import atomic_path

    model = make_model(name, seed)
    output = _OUTPUT_NAMES[name]
    dummy = torch.zeros(batch, *IMAGE_SHAPE)
    dynamic = {INPUT_NAME: {0: "batch"}, output: {0: "batch"}} if dynamic_batch else None
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[output], opset_version=opset,
            dynamic_axes=dynamic, dynamo=False, do_constant_folding=fold_constants,
        )
    return path


def build_zoo(folder: str | os.PathLike[str], names: list[str] | tuple[str, ...] | None = None, batch: int = 1,
              dynamic_batch: bool = False, opset: int = OPSET, overwrite: bool = False,
              fold_constants: bool = True) -> dict[str, Path]:
    """Export the zoo models (all of ZOO_NAMES by default) into `folder` as NAME.onnx; returns name -> path.

    Existing files are reused unless `overwrite=True` (they are deterministic, so reuse is safe: the file
    name encodes non-default settings). fold_constants=False: see export_model (keeps BatchNorm nodes).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for name in names or ZOO_NAMES:
        suffix = "" if batch == 1 and not dynamic_batch and opset == OPSET else (
            f"_b{'dyn' if dynamic_batch else batch}_op{opset}"
        )
        suffix += "" if fold_constants else "_unfolded"
        path = folder / f"{name}{suffix}.onnx"
        if overwrite or not path.exists():
            export_model(name, path, batch=batch, dynamic_batch=dynamic_batch, opset=opset,
                         fold_constants=fold_constants)
        result[name] = path
    return result


# ---- inputs ----------------------------------------------------------------------------------------------
def sample_inputs(path_or_name: str | os.PathLike[str], n: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic-range inputs: `n` images in 0..1 for a zoo name or any ONNX file, deterministic in `seed`.

    Images are smooth (low-frequency blobs plus mild noise, like natural photos), not uniform noise, so the
    activation statistics resemble real data. For an ONNX file, every float input gets such images when it
    is 4-D, otherwise standard-normal values; integer inputs get small non-negative integers. The first axis
    is always `n` (for a static batch-1 model, feed the samples one at a time: `x[i:i+1]`); other
    symbolic dimensions are set to 1.
    """
    rng = np.random.default_rng(seed)
    text = str(path_or_name)
    if text in _FACTORIES:
        return {INPUT_NAME: _images(rng, (n, *IMAGE_SHAPE))}
    import onnx

    from trtkit.runtime import input_specs

    model = onnx.load(text, load_external_data=False)
    feeds: dict[str, np.ndarray] = {}
    for spec in input_specs(model):
        shape = tuple(
            (n if i == 0 else 1) if not (isinstance(d, int) and d > 0) else d for i, d in enumerate(spec.shape)
        )
        if shape:
            shape = (n, *shape[1:])  # the first axis is the sample axis (batch)
        if spec.dtype.startswith(("int", "uint")):
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.random(shape) > 0.5
        elif len(shape) == 4:
            feeds[spec.name] = _images(rng, shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def _images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random images in [0, 1]: a few Gaussian blobs per channel over a gradient, plus noise."""
    b, c, h, w = shape
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    blobs = 4
    cy = rng.random((b, c, blobs, 1, 1), dtype=np.float32)
    cx = rng.random((b, c, blobs, 1, 1), dtype=np.float32)
    sigma = rng.uniform(0.08, 0.3, (b, c, blobs, 1, 1)).astype(np.float32)
    amp = rng.uniform(-0.5, 0.8, (b, c, blobs, 1, 1)).astype(np.float32)
    field = (amp * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))).sum(axis=2)
    gradient = rng.uniform(-0.3, 0.3, (b, c, 1, 1)).astype(np.float32) * (xs + ys) / 2
    base = rng.uniform(0.2, 0.6, (b, c, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 0.02, (b, c, h, w)).astype(np.float32)
    return np.clip(base + gradient + field + noise, 0.0, 1.0).astype(np.float32)
