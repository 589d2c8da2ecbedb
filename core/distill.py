"""Label-free distillation from the FP32 network: the student learns the teacher's outputs on unlabelled data.

    from trtkit import distill

    history = distill.distill(student, teacher, calib, epochs=4)                   # KL on logits, T = 4
    history = distill.distill(student, teacher, calib, mse=1.0, features=["blocks.6"])

The student is whatever must get its accuracy back: a pruned copy (`trtkit.pruning.prune`), a copy with
2:4 masks (`trtkit.plugins.sparsity`; zeros stay zero), or a fake-quantized QAT copy (`trtkit.qat`:
quantization-aware distillation). The teacher is the original network, frozen. The calibration images are
enough: no labels are read.

Loss per batch = kl * T^2 * KL(softmax(teacher / T) || softmax(student / T)) over classifier-shaped outputs
([N, C]) + mse * MSE(student output, teacher output) over every output + feature_weight * MSE of each named
intermediate feature (the output of the submodule of that name in both networks; where the student's
feature has fewer channels, as after pruning, a learned 1x1 projection maps it to the teacher's, as in
FitNets).

BatchNorm layers train as usual (batch statistics, running statistics re-estimated): after pruning, the
layers downstream of removed channels see other statistics, and re-estimating them is most of the recovery
(on the digits CNN pruned by 60 %: 0.85 top-1 agreement with frozen statistics, 0.90 without, same steps);
`freeze_bn=True` keeps them (e.g. batches too small for batch statistics). Weights that are 2:4 sparse (every group
of 4 along the input dimension has at least 2 zeros) when distillation starts keep their zeros
(`keep_sparsity`): the mask is re-applied after every step.

torch is imported inside functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, InputFileError, OptionError, first_line, unknown_name

if TYPE_CHECKING:
    import numpy as np
    import torch


def load_samples(source: Any, where: str = "data") -> np.ndarray:
    """Samples [N, ...] as float32: an array, or a .npy / .npz file (the first array of an .npz); uint8
    images are kept as stored (convert them before if the model expects normalised input)."""
    import numpy as np

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputFileError(f"{path}: not a .npy/.npz array file ({first_line(exc)})") from None
        if hasattr(loaded, "files"):
            if not loaded.files:
                raise InputFileError(f"{path}: the .npz holds no array")
            loaded = loaded[loaded.files[0]]
        source, where = loaded, str(path)
    array = np.asarray(source)
    if array.ndim < 2 or not len(array):
        raise DataError(f"{where}: expected samples [N, ...], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{where}: expected numbers, got {array.dtype}")
    return array.astype(np.float32, copy=False)


def _outputs(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def sparse_masks(model: Any) -> dict[str, torch.Tensor]:
    """{parameter name: mask} of the Conv/Linear weights that are 2:4 sparse along the input dimension now."""
    import torch

    masks = {}
    for name, param in model.named_parameters():
        if not name.endswith("weight") or param.dim() < 2 or param.shape[1] % 4:
            continue
        groups = param.detach().transpose(0, 1).reshape(param.shape[1] // 4, 4, -1)
        if bool(((groups == 0).sum(1) >= 2).all()) and bool((param != 0).any()):
            masks[name] = (param.detach() != 0).to(torch.float32)
    return masks


def _feature_hooks(model: Any, names: Sequence[str], store: dict[str, Any], which: str) -> list[Any]:
    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        if name not in modules:
            raise unknown_name(f"{which} layer", name, [n for n in modules if n])
        hooks.append(modules[name].register_forward_hook(
            lambda module, inputs, output, key=name: store.__setitem__(key, output)))
    return hooks


def distill(
    student: Any,
    teacher: Any,
    data: Any,
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int = 32,
    temperature: float = 1.0,
    kl: float = 1.0,
    mse: float = 0.0,
    features: Sequence[str] = (),
    feature_weight: float = 1.0,
    freeze_bn: bool = False,
    keep_sparsity: bool = True,
    weight_decay: float = 0.0,
    device: Any = None,
    seed: int = 0,
    progress: bool = True,
    limit: int | None = None,
    augment: bool = False,
    mixup: float = 0.0,
    schedule: str = "cosine",
) -> list[float]:
    """Train `student` (in place) to match `teacher` on unlabelled `data`; returns the mean loss per epoch.

    data: samples [N, ...] (array, tensor, or .npy/.npz path), fed in shuffled batches of `batch_size`.
    temperature / kl: weight of the temperature-scaled KL on [N, C] outputs (0: none). T = 1 (the default)
      matches the teacher's top classes best; higher T weighs the small probabilities more.
    mse: weight of the MSE between outputs. features: submodule names whose outputs are matched too.
    device: "cpu", "cuda" or a torch.device (default: CUDA when available, else the CPU; QAT's default);
      both networks are moved there; the student is left there after.
    limit: use at most this many samples. Deterministic on the CPU for a given seed.
    augment: for image batches [N, C, H, W]: each sample gets a random crop (side 55-100 %) resized back
      and a random horizontal flip, new every step (both networks see the same image, so no label is
      needed); a few hundred calibration images then go further. mixup: also blend each sample with
      another one, weight ~ Beta(mixup, mixup) (0: off; drawn from torch's global generator).
    schedule: "cosine" (the learning rate decays to 0 over the run) or "constant".
    """
    import numpy as np
    import torch
    from torch import nn

    from .qat import default_device

    if epochs < 1 or batch_size < 1 or lr <= 0 or temperature <= 0:
        raise OptionError("distill: epochs and batch_size must be >= 1, lr and temperature > 0")
    if kl < 0 or mse < 0 or feature_weight < 0 or (kl == 0 and mse == 0 and not features):
        raise OptionError("distill: the weights kl, mse, feature_weight must be >= 0 and something must be matched")
    if schedule not in ("cosine", "constant"):
        raise OptionError(f"distill: schedule must be cosine or constant, got {schedule!r}")
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise OptionError("distill: student and teacher must be torch.nn.Module")
    array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else load_samples(data)
    if limit is not None:
        array = array[:limit]
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    where = torch.device(device) if device is not None else default_device()
    student.to(where)
    teacher.to(where).eval()  # run under no_grad: its parameters are left as they are

    found_s: dict[str, Any] = {}
    found_t: dict[str, Any] = {}
    hooks = _feature_hooks(student, features, found_s, "student") + _feature_hooks(teacher, features, found_t,
                                                                                     "teacher")
    projections = nn.ModuleDict()
    masks = sparse_masks(student) if keep_sparsity else {}
    params = dict(student.named_parameters())
    try:
        if features:  # a dry batch gives the feature shapes; mismatched channels get a 1x1 projection
            with torch.no_grad():
                student.eval()
                student(x[:1].to(where))
                teacher(x[:1].to(where))
            for name in features:
                s, t = found_s[name], found_t[name]
                if s.shape == t.shape:
                    continue
                if s.dim() < 2 or s.shape[2:] != t.shape[2:]:
                    raise DataError(f"distill: feature '{name}' has shape {tuple(s.shape)} in the student and "
                                    f"{tuple(t.shape)} in the teacher (only channel counts may differ)")
                conv = nn.Conv2d if s.dim() == 4 else nn.Conv1d if s.dim() == 3 else None
                layer = conv(s.shape[1], t.shape[1], 1, bias=False) if conv else nn.Linear(s.shape[1], t.shape[1],
                                                                                           bias=False)
                projections[name.replace(".", "/")] = layer.to(where)
        trainable = [p for p in student.parameters() if p.requires_grad] + list(projections.parameters())
        optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" else None
        history: list[float] = []
        with _Progress(steps, progress) as bar:
            for epoch in range(epochs):
                student.train()
                if freeze_bn:
                    for module in student.modules():
                        if isinstance(module, nn.modules.batchnorm._BatchNorm):
                            module.eval()
                total, seen = 0.0, 0
                for index in torch.randperm(len(x), generator=generator).split(batch_size):
                    batch = x[index].to(where)
                    if (augment or mixup) and batch.dim() == 4:
                        batch = _augmented(batch, generator, augment, mixup)
                    with torch.no_grad():
                        target = _outputs(teacher(batch))
                    result = _outputs(student(batch))
                    loss = torch.zeros((), device=where)
                    for s, t in zip(result, target, strict=True):
                        if kl and s.dim() == 2:
                            loss = loss + kl * temperature ** 2 * nn.functional.kl_div(
                                nn.functional.log_softmax(s / temperature, 1),
                                nn.functional.log_softmax(t / temperature, 1), reduction="batchmean", log_target=True)
                        if mse:
                            loss = loss + mse * nn.functional.mse_loss(s, t)
                    for name in features:
                        s = found_s[name]
                        key = name.replace(".", "/")
                        if key in projections:
                            s = projections[key](s)
                        loss = loss + feature_weight * nn.functional.mse_loss(s, found_t[name])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    if masks:
                        with torch.no_grad():
                            for name, mask in masks.items():
                                params[name].mul_(mask)
                    total += float(loss.detach()) * len(index)
                    seen += len(index)
                    bar.advance(f"distill epoch {epoch + 1}/{epochs} loss {total / seen:.4f}")
                history.append(total / seen)
    finally:
        for hook in hooks:
            hook.remove()
        student.eval()
    return history


def _augmented(batch: torch.Tensor, generator: torch.Generator, crop: bool, mixup: float) -> torch.Tensor:
    """Random crop + resize + horizontal flip per sample (one affine grid sample), then optional mixup."""
    import torch
    from torch import nn

    n = batch.shape[0]
    if crop:
        scale = torch.empty(n).uniform_(0.55, 1.0, generator=generator)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
        theta[:, :, 2] = shift
        grid = nn.functional.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
        batch = nn.functional.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection",
                                          align_corners=False)
    if mixup > 0:
        weight = torch.distributions.Beta(mixup, mixup).sample((n,)).to(batch.device).view(n, 1, 1, 1)
        other = torch.randperm(n, generator=generator).to(batch.device)
        batch = weight * batch + (1 - weight) * batch[other]
    return batch


class _Progress:
    """A rich progress bar with the running loss on stderr (nothing when stderr is not a terminal or off)."""

    def __init__(self, total: int, enabled: bool) -> None:
        import sys

        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.progress: Any = None
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from .ui import console

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("distill", total=self.total)
        return self

    def advance(self, description: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


def teacher_copy(model: Any) -> Any:
    """A frozen deep copy of the original network to distil from."""
    import copy

    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def agreement(model: Any, reference: Any, data: Any, batch_size: int = 64, device: Any = None) -> float:
    """Fraction of samples on which the two classifiers' top-1 classes agree (first output)."""
    import numpy as np
    import torch

    array = data if isinstance(data, np.ndarray) else load_samples(data)
    where = torch.device(device) if device is not None else next(model.parameters()).device
    same = 0
    model.eval()
    reference.eval()
    with torch.no_grad():
        for start in range(0, len(array), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(array[start:start + batch_size])).to(where)
            a = _outputs(model.to(where)(batch))[0].argmax(1)
            b = _outputs(reference.to(where)(batch))[0].argmax(1)
            same += int((a == b).sum())
    return same / len(array)


def options_from(section: Mapping[str, Any]) -> dict[str, Any]:
    """distill() keyword arguments from a recipe's [distill] table (the keys that are distill's parameters)."""
    import inspect

    keys = set(inspect.signature(distill).parameters) - {"student", "teacher", "data", "progress"}
    return {key: value for key, value in section.items() if key in keys}
