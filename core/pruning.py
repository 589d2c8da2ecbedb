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
    import torch

    array = data
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


def _samples(data: Any) -> Any:
    import numpy as np

    array = np.asarray(data, dtype=np.float32)
    if array.ndim < 2 or not len(array):
        raise DataError("pruning data must be an array of samples [N, ...]")
    return array


def _batches(array: Any, batch_size: int, device: Any) -> Any:
    import torch

    for start in range(0, len(array), batch_size):
        yield torch.from_numpy(array[start:start + batch_size]).to(device)


def _prunable_consumer(layer: Any) -> bool:
    """A layer whose input channels are summed over (Linear, ungrouped Conv): removing one of its inputs
    leaves its outputs, so a removed channel's constant part can be moved into its bias."""
    from torch import nn

    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == 1
                                            and not getattr(layer, "transposed", False))


def _input_means(model: Any, array: Any, batch_size: int) -> dict[Any, Any]:
    """{layer: mean of each of its input channels over `array` (samples and positions)}, for the layers
    that can take a removed input's constant part into their bias."""
    import torch

    sums: dict[Any, Any] = {}

    def hook(module: Any, inputs: Any, output: Any) -> None:
        x = inputs[0].detach().double()
        rows = x.reshape(-1, x.shape[-1]) if isinstance(module, torch.nn.Linear) else \
            x.transpose(0, 1).reshape(x.shape[1], -1).T
        sums[module] = sums.get(module, 0) + rows.mean(0) * x.shape[0]

    hooks = [m.register_forward_hook(hook) for m in model.modules() if _prunable_consumer(m)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in _batches(array, batch_size, device):
                model(batch)
    finally:
        for handle in hooks:
            handle.remove()
    return {module: (total / len(array)).float() for module, total in sums.items()}


def _bookkeep(group: Any, means: dict[Any, Any], kept_out: dict[Any, Any], consumers: dict[Any, int]) -> None:
    """Before a group is removed: fold its channels' mean input into each consumer's bias (when `means`
    has the consumer), and note which original output channels each layer keeps (for reconstruction)."""
    import torch
    from torch import nn
    from torch_pruning.pruner import function

    out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)
    in_fns = (function.prune_conv_in_channels, function.prune_linear_in_channels)
    for dep, idxs in group:
        layer, fn = dep.target.module, dep.handler
        index = torch.as_tensor(sorted(int(i) for i in idxs), dtype=torch.long)
        if fn in out_fns:
            total = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
            current = kept_out.get(layer, torch.arange(total))
            mask = torch.ones(len(current), dtype=torch.bool)
            mask[index] = False
            kept_out[layer] = current[mask]
        elif fn in in_fns and _prunable_consumer(layer):
            consumers[layer] = consumers.get(layer, 0) + len(index)
            if layer not in means:
                continue
            mean = means[layer].to(layer.weight.device)
            weight = layer.weight.detach()
            columns = weight[:, index].flatten(2).sum(2) if weight.dim() > 2 else weight[:, index]
            shift = (columns * mean[index]).sum(1)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            layer.bias.data += shift.to(layer.bias.dtype)
            mask = torch.ones(len(mean), dtype=torch.bool, device=mean.device)
            mask[index.to(mean.device)] = False
            means[layer] = mean[mask]


def _coupled_producers(tp: Any, model: Any, example: tuple[Any, ...], ignored: list[Any]) -> list[Any]:
    """The Conv/Linear layers whose output channels are tied to another such layer's (residual Adds,
    Concat branches): pruning them narrows a whole stream at once. Depthwise convs (which carry a channel
    through rather than mix channels) do not count as producers."""
    from torch import nn

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    found: list[Any] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd,
                                                                                 nn.Linear]):
        producers = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)
                     and _prunable_consumer(dep.target.module)]  # a depthwise conv passes channels through
        if len({id(p) for p in producers}) > 1:
            found += [p for p in producers if all(p is not q for q in found)]
    return found


class _Stop(Exception):
    """Ends a forward once the layer of interest has run."""


def _run_until(model: Any, layer: Any, batch: Any, want: str) -> Any:
    """The input (want="input") or output of `layer` when `model` runs on `batch`, stopping there."""
    import torch

    got: list[Any] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        got.append(inputs[0].detach() if want == "input" else output.detach())
        got.append(output.detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise TrtkitError("prune: reconstruct: a layer did not run on the data")
    return got


def _as_rows(layer: Any, x: Any, y: Any, index: Any) -> tuple[Any, Any] | None:
    """Rows (inputs [R, Cin], outputs [R, Cout]) of a Linear or a 1x1 Conv without padding at the output
    positions `index` (flat, per sample); None for other layers (they keep the compensated weights)."""
    from torch import nn

    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if any(k != 1 for k in layer.kernel_size) or any(int(p) != 0 for p in _padding(layer)) or x.dim() != 4:
        return None
    stride = layer.stride
    x = x[:, :, ::stride[0], ::stride[1]][:, :, :y.shape[2], :y.shape[3]]
    if x.shape[2:] != y.shape[2:]:
        return None
    xs = x.flatten(2)[:, :, index].permute(0, 2, 1).reshape(-1, x.shape[1])
    ys = y.flatten(2)[:, :, index].permute(0, 2, 1).reshape(-1, y.shape[1])
    return xs, ys


def _padding(layer: Any) -> tuple[int, ...]:
    padding = layer.padding
    return (0,) if isinstance(padding, str) and padding == "valid" else \
        (1,) if isinstance(padding, str) else tuple(padding)


def _reconstruct(dense: Any, pruned: Any, array: Any, consumers: Mapping[Any, int], kept_out: Mapping[Any, Any],
                 batch_size: int, rows: int = 16384, ridge: float = 1e-2) -> dict[str, list[float]]:
    """Refit each consumer (in forward order) so its outputs on `array` match the dense network's:
    ridge least squares towards the current weights, min ||Y - [X 1] W||^2 + ridge * mean(diag X'X) ||W - W0||^2.
    Returns {layer: [relative error before, after]} on the fitted rows; a layer whose output the rows do not
    reproduce (a forward the hook cannot see: padding in a subclass) is left as compensated."""
    import torch

    device = next(pruned.parameters()).device
    dense_modules = dict(dense.named_modules())
    names = {module: name for name, module in pruned.named_modules()}
    order: list[Any] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in consumers]
    try:
        with torch.no_grad():
            pruned(torch.from_numpy(array[:1]).to(device))
    finally:
        for handle in hooks:
            handle.remove()
    generator = torch.Generator().manual_seed(0)
    result: dict[str, list[float]] = {}
    for layer in dict.fromkeys(order):
        name = names[layer]
        original = dense_modules[name]
        gram = cross = None
        energy = 0.0
        positions = None
        usable = True
        for batch in _batches(array, batch_size, device):
            x, out = _run_until(pruned, layer, batch, "input")
            target = _run_until(dense, original, batch, "output")[0]
            if positions is None:
                spatial = int(torch.tensor(target.shape[2:]).prod()) if target.dim() > 2 else 1
                per_sample = max(1, min(spatial, -(-rows // len(array))))
                positions = torch.randperm(spatial, generator=generator)[:per_sample].to(device)
            if layer in kept_out:
                target = target[:, kept_out[layer].to(device)]
            pair = _as_rows(layer, x, target, positions)
            check = _as_rows(layer, x, out, positions)
            if pair is None or check is None:
                usable = False
                break
            xs, ys = pair
            xs = torch.cat([xs.double(), torch.ones(len(xs), 1, dtype=torch.float64, device=device)], 1)
            weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
            bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(
                weight.shape[0], dtype=torch.float64, device=device)
            current = torch.cat([weight, bias[:, None]], 1).T
            if (xs @ current - check[1].double()).abs().max() > 1e-3 * (check[1].abs().max() + 1e-6):
                usable = False  # the hook's input is not what the layer convolved (padding in its forward)
                break
            gram = xs.T @ xs if gram is None else gram + xs.T @ xs
            cross = xs.T @ ys.double() if cross is None else cross + xs.T @ ys.double()
            energy += float(ys.double().pow(2).sum())
        if not usable or gram is None or cross is None:
            continue
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(
            weight.shape[0], dtype=torch.float64, device=device)
        current = torch.cat([weight, bias[:, None]], 1).T
        penalty = torch.eye(len(gram), dtype=torch.float64, device=device) * ridge * gram.diagonal()[:-1].mean()
        penalty[-1, -1] = 0.0
        solved = torch.linalg.solve(gram + penalty, cross + penalty @ current)
        before = _fit_error(gram, cross, current, energy)
        after = _fit_error(gram, cross, solved, energy)
        if after >= before:
            continue
        layer.weight.data = solved[:-1].T.reshape(layer.weight.shape).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = torch.nn.Parameter(torch.zeros(weight.shape[0], dtype=layer.weight.dtype, device=device))
        layer.bias.data = solved[-1].to(layer.bias.dtype)
        result[name] = [round(before, 5), round(after, 5)]
    return result


def _fit_error(gram: Any, cross: Any, weights: Any, energy: float) -> float:
    """||X W - Y||^2 / ||Y||^2 from X'X, X'Y and ||Y||^2."""
    return float((weights * (gram @ weights)).sum() - 2 * (weights * cross).sum() + energy) / max(energy, 1e-30)


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
    compensate: bool | None = None,
    reconstruct: bool = False,
    keep_coupled: bool = False,
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
    data: calibration samples [N, ...] (unlabelled): criteria that need data (taylor) rank with them, and
      the removed channels are compensated with them (below).
    compensate: fold each removed channel's mean input into the bias of the layers that consumed it (None:
      when `data` is given). A removed channel does not output zero: after BatchNorm and the activation it
      outputs about act(beta) plus its variation, and the next layer summed that constant through its weights;
      dropping it shifts every output of that layer. Exact for the constant part of 1x1 convs and Linear
      layers; approximate at the zero-padded borders of larger kernels.
    reconstruct: also refit, by ridge least squares, the weights and bias of every Linear and 1x1 Conv that
      lost inputs so that its outputs match the unpruned network's on `data` (He et al. 2017 / ThiNet
      channel pruning; AIMET's "winnowing + weight reconstruction"); layers refitted in forward order, on the
      pruned network's own inputs, so earlier errors are corrected too. Needs `data`.
    keep_coupled: leave groups whose channels are produced by several coupled layers (a residual stream tied
      by Adds, the branches of a Concat) alone: only the channels private to one layer are pruned.
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
    if reconstruct and data is None:
        raise OptionError("prune: reconstruct needs data (calibration samples)")
    compensate = data is not None if compensate is None else bool(compensate)
    if compensate and data is None:
        raise OptionError("prune: compensate needs data (calibration samples)")
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
    samples = _samples(data) if data is not None else None
    if keep_coupled:
        ignored += _coupled_producers(tp, pruned, example, ignored)
    if found.needs_data:
        _label_free_gradients(pruned, samples, batch_size)
    means = _input_means(pruned, samples, batch_size) if compensate else {}
    kept_out: dict[Any, Any] = {}
    consumers: dict[Any, int] = {}
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
            for group in pruner.step(interactive=True):
                _bookkeep(group, means, kept_out, consumers)
                group.prune()
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
    refitted: dict[str, list[float]] = {}
    if reconstruct:
        dense = copy.deepcopy(model).eval()
        refitted = _reconstruct(dense, pruned, samples, consumers, kept_out, batch_size)
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
        "compensated": len(consumers) if compensate else 0, "keep_coupled": keep_coupled,
        "reconstructed": refitted,
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
