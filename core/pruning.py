"""Structured (channel) pruning of torch models: fewer channels, a smaller dense network, same interface.

    from trtkit import pruning

    small, report = pruning.prune(model, example, criterion="l1", ratio=0.3)     # 30 % of channels per layer
    small, report = pruning.prune(model, example, target_flops=0.7)               # until FLOPs <= 70 %
    small, report = pruning.prune(model, example, criterion="taylor", data=calib) # data-driven

Torch-Pruning's dependency graph (`pip install trtkit[prune]`) finds the channels that must go together
(residual Adds, Concats, depthwise and grouped convs, the BatchNorm after a conv, the next layer's inputs);
the importance of each channel comes from a pruning criterion plugin (`trtkit.stages.PruningCriterion`,
hook `register_pruning_criteria`): built-ins l1, l2, bn-scale, taylor. The model is deep-copied (never
changed in place); the layer that produces the output (the last Conv/Linear to run) and the layers named in
`ignore` keep their output channels, so the pruned network takes and returns the same shapes. It is checked
on the example input before it is returned; it exports through `trtkit.exporting.export` like any module.

torch and torch_pruning are imported inside functions (this module is cheap to import).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import DataError, OptionError, TrtkitError, first_line, unknown_name

if TYPE_CHECKING:
    import torch

    from .stages import PruningCriterion


class UntraceableModelError(TrtkitError):
    """The dependency graph cannot follow the model's forward (data-dependent Python, tensors leaving torch)."""


def _need_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise OptionError("pruning needs Torch-Pruning: pip install 'trtkit[prune]'") from None
    return torch_pruning


def find_criterion(name: str | None) -> PruningCriterion:
    """The registered pruning criterion `name` (None: the one marked default)."""
    from .registry import get_registry

    registry = get_registry()
    if name is None:
        return registry.default("pruning_criteria")  # type: ignore[return-value]
    return registry.pruning_criterion(name)


def count(model: Any, example: Any) -> dict[str, int]:
    """{"macs": multiply-accumulates of the Conv/Linear layers in one forward on `example` (per sample),
    "params": parameter count}. Counted with forward hooks on the layers themselves, so Conv subclasses with
    their own forward (TF "same" padding) count like any Conv."""
    import torch
    from torch import nn

    total = [0]

    def hook(module: Any, inputs: Any, output: Any) -> None:
        per_sample = output.numel() // max(1, output.shape[0])
        if isinstance(module, nn.modules.conv._ConvNd):
            kernel = 1
            for size in module.kernel_size:
                kernel *= int(size)
            total[0] += per_sample * (module.in_channels // module.groups) * kernel
        else:
            total[0] += per_sample * module.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(e.to(next(model.parameters()).device) for e in _as_tuple(example)))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return {"macs": int(total[0]), "params": int(sum(p.numel() for p in model.parameters()))}


def _as_tuple(example: Any) -> tuple[Any, ...]:
    import numpy as np
    import torch

    items = example if isinstance(example, (tuple, list)) else (example,)
    return tuple(torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for v in items)


def _check_ratio(where: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise OptionError(f"{where} must be in (0, 1), got {value!r}")
    return float(value)


def _output_layers(model: Any, example: tuple[Any, ...]) -> list[str]:
    """Names of the Conv/Linear layers whose output reaches a model output without another Conv/Linear:
    approximated by the last one to run (a classifier's head). Their output channels are kept."""
    import torch
    from torch import nn

    order: list[str] = []
    hooks = [module.register_forward_hook(lambda m, i, o, n=name: order.append(n))
             for name, module in model.named_modules() if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                                              nn.Linear))]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


def _importance(criterion: PruningCriterion, options: Mapping[str, Any]) -> Any:
    """A Torch-Pruning importance that asks the criterion plugin for each coupled layer's channel scores."""
    tp = _need_torch_pruning()
    import torch
    from torch import nn
    from torch_pruning.pruner import function

    out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)
    in_fns = (function.prune_conv_in_channels, function.prune_linear_in_channels)
    norm_fns = tuple(f for f in (getattr(function, "prune_batchnorm_out_channels", None),
                                 getattr(function, "prune_layernorm_out_channels", None),
                                 getattr(function, "prune_groupnorm_out_channels", None)) if f is not None)

    base: Any = tp.importance.GroupMagnitudeImportance

    class CriterionImportance(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__(p=1, group_reduction="mean", normalizer="mean")

        def _score(self, weight: torch.Tensor, grad: torch.Tensor | None, kind: str) -> torch.Tensor:
            value = criterion.score(weight, kind, grad, **options)
            value = torch.as_tensor(value, dtype=torch.float32, device=weight.device).reshape(-1)
            if value.numel() != weight.shape[0]:
                raise TrtkitError(f"pruning criterion '{criterion.name}' returned {value.numel()} scores for "
                                  f"{weight.shape[0]} channels")
            return value

        @torch.no_grad()
        def __call__(self, group: Any) -> Any:
            scores, root = [], []
            for index, (dep, idxs) in enumerate(group):
                layer, fn = dep.layer, dep.pruning_fn
                root_idxs = group[index].root_idxs
                conv = isinstance(layer, nn.modules.conv._ConvNd)
                kind = "conv" if conv else "linear" if isinstance(layer, nn.Linear) else "norm"
                if kind not in criterion.kinds or not isinstance(getattr(layer, "weight", None), torch.Tensor):
                    continue
                weight = layer.weight
                grad = weight.grad if criterion.needs_data else None
                if criterion.needs_data and grad is None:
                    continue
                transposed = getattr(layer, "transposed", False)
                if fn in out_fns:
                    w = (weight.transpose(0, 1) if transposed else weight)
                    g = (grad.transpose(0, 1) if transposed else grad) if grad is not None else None
                    value = self._score(w[idxs].flatten(1), g[idxs].flatten(1) if g is not None else None, kind)
                elif fn in in_fns:
                    w = weight if transposed else weight.transpose(0, 1)
                    g = (grad if transposed else grad.transpose(0, 1)) if grad is not None else None
                    value = self._score(w.flatten(1), g.flatten(1) if g is not None else None, kind)
                    if conv and layer.groups not in (1, layer.in_channels):
                        value = value.repeat(layer.groups)
                    value = value[idxs]
                elif fn in norm_fns and weight.dim() == 1:
                    value = self._score(weight[idxs].reshape(-1, 1),
                                        grad[idxs].reshape(-1, 1) if grad is not None else None, kind)
                else:
                    continue
                scores.append(value)
                root.append(root_idxs)
            if not scores:
                return None
            reduced = self._reduce(scores, root)
            return self._normalize(reduced, self.normalizer)

    return CriterionImportance()


def _label_free_gradients(model: Any, data: Any, batch_size: int) -> int:
    """Accumulate parameter gradients of a label-free loss over `data`: cross-entropy against the model's
    own top-1 for classifier-shaped outputs ([N, C]), else the mean square of every output. Returns the
    number of samples used."""
    import numpy as np
    import torch

    array = np.asarray(data, dtype=np.float32)
    if array.ndim < 2 or not len(array):
        raise DataError("pruning data must be an array of samples [N, ...]")
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    for start in range(0, len(array), batch_size):
        batch = torch.from_numpy(array[start:start + batch_size]).to(device)
        outputs = model(batch)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        loss = torch.zeros((), device=device)
        for out in outputs:
            if out.dim() == 2:
                loss = loss + torch.nn.functional.cross_entropy(out, out.detach().argmax(1), reduction="sum")
            else:
                loss = loss + out.float().pow(2).mean() * len(batch)
        loss.backward()
    return len(array)


def prune(
    model: Any,
    example_inputs: Any,
    criterion: str | None = None,
    ratio: float | None = None,
    ratios: Mapping[str, float] | None = None,
    global_ranking: bool = False,
    target_flops: float | None = None,
    ignore: Sequence[str] = (),
    round_to: int | None = None,
    data: Any = None,
    batch_size: int = 16,
    options: Mapping[str, Any] | None = None,
    max_layer_ratio: float = 0.9,
) -> tuple[Any, dict[str, Any]]:
    """Remove channels of a copy of `model`; returns (pruned model, report).

    criterion: a registered pruning criterion (`trtkit plugins` lists them; None: the default, l1).
    ratio: fraction of channels removed from every prunable layer (with `global_ranking`, of all channels,
      ranked together: less important layers lose more). ratios: {layer name: fraction} per layer (overrides
      `ratio` there). target_flops: keep pruning in small steps until the multiply-accumulates are at most
      this fraction of the original (0.7 = 30 % fewer); with it, `ratio` is the most any layer loses
      (default `max_layer_ratio`).
    ignore: layer names (as in `model.named_modules()`) whose output channels are kept.
    round_to: keep channel counts multiples of this (8 suits TensorRT's tensor cores).
    data: calibration samples [N, ...] for criteria that need data (taylor).
    Report: criterion, ratio, macs/params before and after, and the channels of each pruned layer.
    """
    tp = _need_torch_pruning()
    import torch
    from torch import nn

    found = find_criterion(criterion)
    resolved = found.resolve_options(options or {}, where=f"pruning criterion '{found.name}'")
    if ratio is None and not ratios and target_flops is None:
        raise OptionError("prune: give a ratio, per-layer ratios or a target_flops")
    if ratio is not None:
        _check_ratio("prune: ratio", ratio)
    if target_flops is not None:
        _check_ratio("prune: target_flops", target_flops)
    if round_to is not None and round_to < 1:
        raise OptionError(f"prune: round_to must be >= 1, got {round_to}")
    if found.needs_data and data is None:
        raise OptionError(f"pruning criterion '{found.name}' needs data (calibration samples)")
    if not isinstance(model, nn.Module):
        raise OptionError(f"prune: expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    for name in list(ignore) + list(ratios or {}):
        if name not in modules or not name:
            raise unknown_name("layer", name, [n for n in modules if n])
    for name, value in (ratios or {}).items():
        _check_ratio(f"prune: ratio of layer '{name}'", value)

    pruned = copy.deepcopy(model).eval()
    device = next(pruned.parameters()).device
    example = tuple(e.to(device) for e in _as_tuple(example_inputs))
    try:
        with torch.no_grad():
            reference = pruned(*example)
    except Exception as exc:
        raise UntraceableModelError(f"prune: the model fails on the example input ({first_line(exc)})") from None
    before = count(pruned, example)
    keep = set(ignore) | set(_output_layers(pruned, example))
    ignored = [module for name, module in pruned.named_modules() if name in keep]
    if found.needs_data:
        _label_free_gradients(pruned, data, batch_size)
    per_layer = {pruned.get_submodule(name): float(value) for name, value in (ratios or {}).items()}
    steps = 1 if target_flops is None else 50
    limit = max_layer_ratio if target_flops is not None and ratio is None else (ratio or 0.0)
    try:
        pruner = tp.pruner.MetaPruner(
            pruned, example, importance=_importance(found, resolved), global_pruning=global_ranking,
            pruning_ratio=limit if target_flops is not None else (ratio or 0.0),
            pruning_ratio_dict=per_layer or None, max_pruning_ratio=max(max_layer_ratio, limit),
            iterative_steps=steps, ignored_layers=ignored, round_to=round_to)
        for _ in range(steps):
            pruner.step()
            if target_flops is not None and count(pruned, example)["macs"] <= target_flops * before["macs"]:
                break
    except TrtkitError:
        raise
    except Exception as exc:
        raise UntraceableModelError(f"prune: the dependency graph cannot trace the model "
                                    f"({type(exc).__name__}: {first_line(exc)})") from None
    finally:
        pruned.zero_grad(set_to_none=True)
    _check_same_interface(pruned, example, reference)
    after = count(pruned, example)
    if target_flops is not None and after["macs"] > target_flops * before["macs"] * 1.001:
        raise OptionError(f"prune: target_flops {target_flops} not reached: {after['macs'] / before['macs']:.3f} "
                          f"of the MACs left with at most {limit} of any layer's channels removed")
    layers = {}
    for name, module in pruned.named_modules():
        original = modules.get(name)
        channels = _out_channels(module)
        if channels is not None and original is not None and _out_channels(original) != channels:
            layers[name] = {"before": _out_channels(original), "after": channels}
    report = {
        "criterion": found.name, "ratio": ratio, "ratios": dict(ratios or {}), "global": global_ranking,
        "target_flops": target_flops, "round_to": round_to, "kept": sorted(keep),
        "before": before, "after": after, "macs_fraction": after["macs"] / before["macs"],
        "params_fraction": after["params"] / before["params"], "narrowed": layers,
    }
    return pruned, report


def _out_channels(module: Any) -> int | None:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


def _check_same_interface(pruned: Any, example: tuple[Any, ...], reference: Any) -> None:
    """The pruned model runs on the example and returns outputs of the original's shapes: otherwise the
    dependency graph missed a coupling (it could not trace part of the forward)."""
    import torch

    try:
        with torch.no_grad():
            result = pruned(*example)
    except Exception as exc:
        raise UntraceableModelError(f"prune: the dependency graph cannot trace the model: the pruned copy fails "
                                    f"({type(exc).__name__}: {first_line(exc)})") from None
    got = result if isinstance(result, (tuple, list)) else (result,)
    want = reference if isinstance(reference, (tuple, list)) else (reference,)
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
        raise UntraceableModelError(
            f"prune: the dependency graph cannot trace the model: output shapes changed from "
            f"{[tuple(t.shape) for t in want]} to {[tuple(t.shape) for t in got]}")


def save(model: Any, path: Any) -> None:
    """Write a pruned module (its structure differs from the factory's) with torch.save, atomically."""
    import torch

    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(model, tmp)
