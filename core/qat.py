"""Quantization-aware training (torch) that exports TensorRT-ready Q/DQ ONNX.

    from trtkit import qat

    qmodel = qat.quantize_model(model)                        # copy: BN folded, Conv/Linear wrapped, on
                                                              # device= (default: CUDA when available)
    qat.calibrate(qmodel, batches, method="entropy")          # activation amax from trtkit's calibrators
    qat.finetune(qmodel, x_train, y_train, epochs=2)          # a few epochs, straight-through estimator
    qat.export_onnx(qmodel, "model.qdq.onnx", example)        # QuantizeLinear/DequantizeLinear ONNX

What TensorRT needs, and what this module does:
- symmetric int8, zero points 0; weights per output channel (Conv axis 0, Linear axis 0) in [-127, 127],
  activations per tensor in [-128, 127]; scale = amax / 127.
- Q/DQ on the inputs of Conv/Linear (the data input and the weight), not on biases or graph outputs.
- BatchNorm folded into the preceding Conv before quantization (TensorRT folds it before quantizing too).

The model is never changed in place and torch.nn is never monkey-patched: `quantize_model` deep-copies the
model and replaces Conv/Linear modules of the copy by small wrappers (`QuantConv`, `QuantLinear`) holding a
`FakeQuantizer` for the input and one for the weight. The fake quantizer's gradient is the straight-through
estimator (identity inside [-amax, amax], zero outside); with `learn_amax=True`, amax is a parameter trained
through the clipping gradient (as in PACT / pytorch-quantization's learned amax).

Devices: `quantize_model(device=...)` puts the copy on a device (default: CUDA when available, else the CPU);
calibrate, finetune and evaluate feed each batch to the model's device (inputs may be numpy or tensors on any
device), amax tensors live with the model, and export_onnx exports from the CPU (the model is moved back
after), so the ONNX file is the same whichever device trained it.

torch is imported inside functions only for the module-level API; the module classes are created on first
use (so `import trtkit.qat` stays cheap and works without torch installed).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, OptionError
from .model import ModelArtifact

if TYPE_CHECKING:
    import numpy as np
    import torch

ACTIVATION_QMIN, ACTIVATION_QMAX = -128, 127
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
_CLASSES: dict[str, Any] = {}


# ---- fake quantization ---------------------------------------------------------------------------------------
def _classes() -> dict[str, Any]:
    """Build the torch classes once (torch is imported lazily)."""
    if _CLASSES:
        return _CLASSES
    import numpy as np
    import torch
    from torch import nn

    class FakeQuantFunction(torch.autograd.Function):
        """x -> clamp(round(x / s), qmin, qmax) * s with s = amax / 127; straight-through gradient."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
            scale = amax / 127.0
            ctx.save_for_backward(x, amax)
            ctx.qmin, ctx.qmax = qmin, qmax
            return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            x, amax = ctx.saved_tensors
            scale = amax / 127.0
            low, high = ctx.qmin * scale, ctx.qmax * scale
            inside = (x >= low) & (x <= high)
            grad_x = grad * inside
            grad_amax = None
            if ctx.needs_input_grad[1]:
                # d/d amax of clamp: +q_max/127 above the range, q_min/127 below it (0 inside, STE on round).
                edge = torch.where(x > high, grad * (ctx.qmax / 127.0),
                                   torch.where(x < low, grad * (ctx.qmin / 127.0), torch.zeros_like(grad)))
                grad_amax = _reduce_to(edge, amax.shape)
            return grad_x, grad_amax, None, None

        @staticmethod
        def symbolic(g: Any, x: Any, amax: Any, qmin: int, qmax: int) -> Any:
            raise RuntimeError("export fake-quantized models with trtkit.qat.export_onnx")  # pragma: no cover

    class QDQExportFunction(torch.autograd.Function):
        """Emits ONNX QuantizeLinear -> DequantizeLinear (int8, zero point 0) when exported."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
            shape = [1] * x.dim()
            if scale.dim() == 1:
                shape[axis] = -1
            return torch.clamp(torch.round(x / scale.reshape(shape)), qmin, qmax) * scale.reshape(shape)

        @staticmethod
        def symbolic(g: Any, x: Any, scale: Any, axis: int, qmin: int, qmax: int) -> Any:
            import torch as _torch

            per_channel = scale.type().dim() == 1 if scale.type().dim() is not None else False
            sizes = scale.type().sizes() if per_channel else []
            zero = g.op("Constant", value_t=_torch.zeros(sizes, dtype=_torch.int8))
            kwargs = {"axis_i": axis} if per_channel else {}
            quant = g.op("QuantizeLinear", x, scale, zero, **kwargs)
            return g.op("DequantizeLinear", quant, scale, zero, **kwargs)

    class FakeQuantizer(nn.Module):
        """Symmetric int8 fake quantization, per tensor (axis=None) or per channel along `axis`.

        amax: None until calibrated (then the quantizer passes values through unchanged), else a tensor of
        shape [] (per tensor) or [C] (per channel). States: `collecting` gathers statistics for calibration;
        `export_mode` makes the quantizer emit ONNX Q/DQ nodes.
        """

        def __init__(self, axis: int | None = None, weight: bool = False, learn_amax: bool = False) -> None:
            super().__init__()
            self.axis = axis
            self.weight = weight
            self.learn_amax = learn_amax
            self.qmin, self.qmax = (WEIGHT_QMIN, WEIGHT_QMAX) if weight else (ACTIVATION_QMIN, ACTIVATION_QMAX)
            self.amax: torch.Tensor | None = None
            self.enabled = True
            self.collecting = False
            self.export_mode = False
            self.collector: Callable[[torch.Tensor], None] | None = None

        def set_amax(self, amax: Any, device: Any = None) -> None:
            """amax as a tensor on `device` (default: where amax is now, or where the given tensor is)."""
            if device is None and isinstance(self.amax, torch.Tensor) and not isinstance(amax, torch.Tensor):
                device = self.amax.device
            value = torch.as_tensor(amax, dtype=torch.float32, device=device).detach().clone()
            if value.numel() and not bool(torch.all(value > 0)):
                value = torch.clamp(value, min=1e-8)
            if "amax" in self._parameters:
                del self._parameters["amax"]
            if "amax" in self._buffers:
                del self._buffers["amax"]
            if hasattr(self, "amax"):
                object.__delattr__(self, "amax")
            if self.learn_amax:
                self.register_parameter("amax", nn.Parameter(value))
            else:
                self.register_buffer("amax", value)

        def _shaped_amax(self, x: torch.Tensor) -> torch.Tensor:
            amax = self.amax
            assert amax is not None
            if self.axis is None or amax.dim() == 0:
                return amax.abs()
            shape = [1] * x.dim()
            shape[self.axis] = -1
            return amax.abs().reshape(shape)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.collecting and self.collector is not None:
                self.collector(x.detach())
            if not self.enabled or self.amax is None:
                return x
            if self.export_mode:  # constants only, so the exported graph is plain Q/DQ on constants
                amax = np.asarray(np.maximum(np.abs(self.amax.detach().cpu().numpy()), 1e-8), dtype=np.float32)
                scale = torch.from_numpy(np.asarray(amax / np.float32(127.0), dtype=np.float32)).to(x.device)
                if self.weight:  # clamp so that stored int8 weights stay in [-127, 127]
                    shape = [1] * x.dim()
                    shape[self.axis or 0] = -1
                    bound = amax.reshape(shape) if amax.ndim else amax
                    x = torch.from_numpy(np.clip(x.detach().cpu().numpy(), -bound, bound).astype(np.float32)
                                         ).to(x.device)
                return QDQExportFunction.apply(x, scale, self.axis if self.axis is not None else 1,
                                               self.qmin, self.qmax)
            return FakeQuantFunction.apply(x, self._shaped_amax(x), self.qmin, self.qmax)

        def extra_repr(self) -> str:
            kind = "weight" if self.weight else "input"
            amax = "uncalibrated" if self.amax is None else f"amax {tuple(self.amax.shape) or 'scalar'}"
            axis = "per-tensor" if self.axis is None else f"axis={self.axis}"
            return f"{kind}, {axis}, {amax}, learn_amax={self.learn_amax}"

    class QuantConv(nn.Module):
        """A Conv1d/2d/3d with fake-quantized input (per tensor) and weight (per output channel)."""

        def __init__(self, conv: Any, learn_amax: bool = False) -> None:
            super().__init__()
            self.conv: Any = conv
            self.input_quantizer = FakeQuantizer(None, weight=False, learn_amax=learn_amax)
            self.weight_quantizer = FakeQuantizer(0, weight=True, learn_amax=learn_amax)
            self.weight_quantizer.set_amax(_channel_amax(conv.weight.detach(), 0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.weight_quantizer(self.conv.weight)
            if type(self.conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
                return self.conv._conv_forward(self.input_quantizer(x), weight, self.conv.bias)
            # a Conv subclass with its own forward (e.g. TF "same" padding applied inside it): run that
            # forward with the fake-quantized weight in place of its own (swapped in the parameter table for
            # the call: torch.func.functional_call refuses the tracer export_onnx uses)
            original = self.conv._parameters["weight"]
            self.conv._parameters["weight"] = weight
            try:
                return self.conv(self.input_quantizer(x))
            finally:
                self.conv._parameters["weight"] = original

    class QuantLinear(nn.Module):
        """A Linear with fake-quantized input (per tensor) and weight (per output feature)."""

        def __init__(self, linear: Any, learn_amax: bool = False) -> None:
            super().__init__()
            self.linear: Any = linear
            self.input_quantizer = FakeQuantizer(None, weight=False, learn_amax=learn_amax)
            self.weight_quantizer = FakeQuantizer(0, weight=True, learn_amax=learn_amax)
            self.weight_quantizer.set_amax(_channel_amax(linear.weight.detach(), 0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.weight_quantizer(self.linear.weight)
            return torch.nn.functional.linear(self.input_quantizer(x), weight, self.linear.bias)

    _CLASSES.update(FakeQuantFunction=FakeQuantFunction, QDQExportFunction=QDQExportFunction,
                    FakeQuantizer=FakeQuantizer, QuantConv=QuantConv, QuantLinear=QuantLinear)
    return _CLASSES


def _reduce_to(values: torch.Tensor, shape: Any) -> torch.Tensor:
    """Sum a broadcast gradient back to the (broadcastable) shape of amax."""
    shape = tuple(shape)
    if tuple(values.shape) == shape:
        return values
    if not shape:
        return values.sum()
    lead = values.dim() - len(shape)
    out = values.sum(dim=tuple(range(lead))) if lead else values
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and out.shape[d] != 1)
    return out.sum(dim=dims, keepdim=True) if dims else out


def _channel_amax(weight: torch.Tensor, axis: int) -> torch.Tensor:
    import torch

    moved = torch.movedim(weight.abs(), axis, 0)
    amax = moved.reshape(moved.shape[0], -1).max(dim=1).values
    return torch.clamp(amax, min=1e-8)


def fake_quantizer(axis: int | None = None, weight: bool = False, learn_amax: bool = False) -> Any:
    """A standalone `FakeQuantizer` module (for custom layers)."""
    return _classes()["FakeQuantizer"](axis, weight=weight, learn_amax=learn_amax)


def quantizers(model: Any) -> dict[str, Any]:
    """Every FakeQuantizer in `model`, by qualified module name."""
    cls = _classes()["FakeQuantizer"]
    return {name: module for name, module in model.named_modules() if isinstance(module, cls)}


# ---- model preparation ---------------------------------------------------------------------------------------
def fold_batchnorm(model: Any) -> int:
    """Fold every BatchNorm that directly follows a Conv inside an nn.Sequential into that Conv (in place,
    eval statistics); the BatchNorm becomes nn.Identity. Returns how many were folded."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    folded = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, convs) and isinstance(norm, norms) and norm.track_running_stats:
                was_training = conv.training
                fused = fuse_conv_bn_eval(conv.eval(), norm.eval())
                fused.train(was_training)
                module._modules[first] = fused
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model: Any) -> Any:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def quantize_model(model: Any, fold_bn: bool = True, learn_amax: bool = False,
                   exclude: Iterable[str] = (), min_channels: int = 1, device: Any = None) -> Any:
    """A deep copy of `model` with Conv/Linear modules wrapped by fake-quantizing versions.

    fold_bn: fold Conv->BatchNorm pairs of nn.Sequential containers first (what TensorRT does before
      quantizing; keeps QAT and deployment numerics identical).
    learn_amax: make every amax a trainable parameter.
    exclude: qualified module names (as in model.named_modules()) left in float; unknown names are errors.
    min_channels: leave Conv/Linear layers with fewer input channels than this in float (the first layer
      always quantizes).
    device: where the copy lives ("cuda", "cpu", a torch.device; default: CUDA when available, else the CPU).
    Weight quantizers start from the per-channel max |w|; activation quantizers are uncalibrated (identity)
    until `calibrate` or `set_amax`.
    """
    from torch import nn

    from .errors import unknown_name

    classes = _classes()
    result = copy.deepcopy(model).eval()
    names = {name for name, _ in result.named_modules() if name}
    excluded = set(exclude)
    for name in sorted(excluded):
        if name not in names:
            raise unknown_name("module", name, names)
    if fold_bn:
        fold_batchnorm(result)
    targets = []
    first = True
    for name, module in result.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if name not in excluded and (first or fan_in >= min_channels):
                targets.append(name)
            first = False
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        module = getattr(parent, child)
        wrapper = (classes["QuantLinear"] if isinstance(module, nn.Linear) else classes["QuantConv"])(
            module, learn_amax=learn_amax)
        parent._modules[child] = wrapper
    if not targets:
        raise OptionError("quantize_model: the model has no Conv or Linear layer to quantize")
    return result.to(device if device is not None else default_device())


# ---- calibration -----------------------------------------------------------------------------------------
def _to_tensor(value: Any) -> torch.Tensor:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value))


def _model_inputs(batch: Any, device: Any = None) -> tuple[Any, ...]:
    """A batch is an array/tensor, a tuple/list (inputs first) or a mapping of input name -> array; the
    tensors go to `device` (the model's)."""
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = [batch[0]]
    else:
        values = [batch]
    return tuple(_to_tensor(v).to(device) if device is not None else _to_tensor(v) for v in values)


def calibrate(qmodel: Any, batches: Iterable[Any], method: str | Callable[..., float] | None = None,
              options: Mapping[str, Any] | None = None, weights: bool = False) -> dict[str, float]:
    """Set every activation quantizer's amax from trtkit's calibrators (`trtkit calibrators` names).

    batches: arrays/tensors (or (inputs, labels) tuples, or dicts name -> array) fed to the model in order.
    method / options: a calibrator registered in trtkit (`trtkit plugins` lists them) and its options, or a
      function(stats, **options) -> amax; None: the default calibrator (the one its plugin marks default, as
      `trtkit calibrate` uses); statistics are collected once per tensor as
      trtkit.calibration.TensorStats (mergeable, independent of batch order).
    weights: also recompute weight amax (per channel max |w|) from the current weights.
    Returns {quantizer name: amax}.
    """
    import torch

    from .calibration import TensorStats, find_calibrator  # the calibration stage's statistics and lookup

    if callable(method):
        compute_amax, resolved = method, dict(options or {})
    else:
        calibrator = find_calibrator(method)
        compute_amax = calibrator.compute_amax
        resolved = calibrator.resolve_options(options or {}, where=f"calibrator '{calibrator.name}'")
    active = {name: q for name, q in quantizers(qmodel).items() if not q.weight}
    stats: dict[str, Any] = {}
    seen = 0
    was_training = qmodel.training
    qmodel.eval()
    try:
        for name, quantizer in active.items():
            quantizer.collecting = True
            quantizer.enabled = False
            quantizer.collector = _collector(stats, name, TensorStats)
        device = model_device(qmodel)
        with torch.no_grad():
            for batch in batches:
                qmodel(*_model_inputs(batch, device))
                seen += 1
    finally:
        for quantizer in active.values():
            quantizer.collecting = False
            quantizer.enabled = True
            quantizer.collector = None
        qmodel.train(was_training)
    if not seen:
        raise DataError("QAT calibration got no batches")
    result: dict[str, float] = {}
    for name, quantizer in active.items():
        if name not in stats:
            continue  # never reached by the data: stays uncalibrated (float)
        amax = float(compute_amax(stats[name], **resolved))
        quantizer.set_amax(max(amax, 1e-8), device=model_device(qmodel))
        result[name] = amax
    if weights:
        for name, quantizer in quantizers(qmodel).items():
            if quantizer.weight:
                parent = qmodel.get_submodule(name.rpartition(".")[0])
                layer = parent.conv if hasattr(parent, "conv") else parent.linear
                quantizer.set_amax(_channel_amax(layer.weight.detach(), 0))
    return result


def set_amax(qmodel: Any, amax: Mapping[str, float]) -> None:
    """Set activation quantizers' amax by quantizer name (see `quantizers()`); unknown names are errors."""
    from .errors import unknown_name

    found = quantizers(qmodel)
    for name, value in amax.items():
        if name not in found:
            raise unknown_name("quantizer", name, found)
        found[name].set_amax(float(value), device=model_device(qmodel))


def _collector(stats: dict[str, Any], name: str, stats_class: Any) -> Callable[[Any], None]:
    def collect(x: Any) -> None:
        if name not in stats:
            stats[name] = stats_class(name)
        stats[name].update(x.detach().float().cpu().numpy())

    return collect


# ---- fine-tuning -----------------------------------------------------------------------------------------
def finetune(
    qmodel: Any,
    inputs: Any,
    targets: Any,
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int = 64,
    loss: Callable[[Any, Any], Any] | None = None,
    seed: int = 0,
    amax_lr: float | None = None,
    weight_decay: float = 0.0,
    device: Any = None,
) -> list[float]:
    """Short QAT fine-tuning with Adam (in place); returns the mean loss of every epoch.

    inputs/targets: arrays or tensors (cross-entropy on class indices by default; pass `loss` otherwise).
    amax_lr: learning rate of learned amax parameters (default 10 x lr). To recover from badly calibrated
      ranges (too small by several times), use lr around 1e-3 so amax can move far enough in a few epochs.
    device: move the model there first (default: leave it where it is); batches go to the model's device.
    Deterministic for a given seed on the CPU.
    """
    import torch

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise OptionError("finetune: epochs and batch_size must be >= 1 and lr > 0")
    x, y = _to_tensor(inputs), _to_tensor(targets)
    if len(x) != len(y):
        raise DataError(f"finetune: {len(x)} inputs but {len(y)} targets")
    loss = loss or torch.nn.functional.cross_entropy
    if device is not None:
        qmodel.to(device)
    where = model_device(qmodel)
    amax_params = [p for n, p in qmodel.named_parameters() if n.endswith(".amax")]
    ids = {id(p) for p in amax_params}
    others = [p for p in qmodel.parameters() if id(p) not in ids and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": others, "weight_decay": weight_decay}]
    if amax_params:
        groups.append({"params": amax_params, "lr": amax_lr or lr * 10, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    qmodel.train()
    try:
        for _ in range(epochs):
            total, count = 0.0, 0
            for index in torch.randperm(len(x), generator=generator).split(batch_size):
                optimizer.zero_grad()
                value = loss(qmodel(x[index].to(where)), y[index].to(where))
                value.backward()
                optimizer.step()
                with torch.no_grad():  # keep learned ranges positive (the sign is meaningless)
                    for amax in amax_params:
                        amax.abs_().clamp_(min=1e-8)
                total += float(value.detach()) * len(index)
                count += len(index)
            history.append(total / count)
    finally:
        qmodel.eval()
    return history


# ---- export --------------------------------------------------------------------------------------------------
def export_onnx(
    qmodel: Any,
    output: str | os.PathLike[str],
    example_inputs: Any,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 17,
) -> ModelArtifact:
    """Export the fake-quantized model to Q/DQ ONNX (TorchScript exporter, deterministic), written atomically.

    Every calibrated quantizer becomes QuantizeLinear -> DequantizeLinear with int8 zero points: activations
    per tensor, weights per output channel (axis 0), weights clamped to their amax so int8 values stay in
    [-127, 127]. Uncalibrated activation quantizers are left out (those tensors stay float).
    """
    import torch

    if opset < 13:
        raise OptionError("export_onnx: per-channel Q/DQ needs opset >= 13")
    example = tuple(_to_tensor(e) for e in example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (_to_tensor(example_inputs),)
    found = quantizers(qmodel)
    if not found:
        raise OptionError("export_onnx: the model has no fake quantizers (use quantize_model first)")
    path = Path(output)
    was_training = qmodel.training
    device = model_device(qmodel)
    qmodel.cpu()  # export from the CPU: the same file whichever device trained the model
    example = tuple(e.detach().cpu() for e in example)
    qmodel.eval()
    for quantizer in found.values():
        quantizer.export_mode = True
    try:
        import tempfile
        import warnings

        with tempfile.TemporaryDirectory(prefix="trtkit-qat-") as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about constants are intended here
            raw = Path(folder) / "qat.onnx"
            torch.onnx.export(
                qmodel, example, str(raw), input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()} if dynamic_axes else None,
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
            artifact = ModelArtifact.load(raw)
            artifact.model = _fold_weight_quantizers(_loaded_copy(artifact.model))
    finally:
        for quantizer in found.values():
            quantizer.export_mode = False
        qmodel.train(was_training)
        qmodel.to(device)
    calibrated = sum(1 for q in found.values() if q.amax is not None)
    artifact.metadata.setdefault("qat", {}).update({
        "quantizers": calibrated,
        "learned_amax": any(q.learn_amax for q in found.values()),
        "activations": "int8 per-tensor symmetric",
        "weights": "int8 per-channel symmetric",
    })
    artifact.base_dir, artifact.source = path.parent, path
    artifact.save(path, external_data=False)
    return ModelArtifact.load(path)


def _fold_weight_quantizers(model: Any) -> Any:
    """Constants -> initializers; a QuantizeLinear of a constant weight becomes an int8 initializer (exactly
    what onnxruntime's QuantizeLinear computes: round half to even, saturate), so weights read int8 -> DQ."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            consts[node.output[0]] = value
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            continue
        kept.append(node)
    consumers: dict[str, list[Any]] = {}
    for node in kept:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    final = []
    folded: set[str] = set()
    for node in kept:
        if node.op_type == "QuantizeLinear" and node.input[0] in consts and consts[node.input[0]].ndim >= 2:
            weight = consts[node.input[0]].astype(np.float32)
            scale = consts[node.input[1]].astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * weight.ndim
            if scale.ndim == 1:
                shape[axis] = -1
            q = np.clip(np.rint(weight / scale.reshape(shape)), -128, 127).astype(np.int8)
            users = consumers.get(node.output[0], [])
            target = next((c for u in users for c in consumers.get(u.output[0], [])), None)
            base = (target.name or target.output[0]) if target is not None else node.output[0]
            name = f"{base}.weight_int8"
            graph.initializer.append(numpy_helper.from_array(q, name))
            for user in users:
                for index, value in enumerate(user.input):
                    if value == node.output[0]:
                        user.input[index] = name
            folded.add(node.input[0])
            continue
        final.append(node)
    del graph.node[:]
    graph.node.extend(final)
    used = {name for node in final for name in node.input} | {o.name for o in graph.output}
    survivors = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(survivors)
    return model


def _loaded_copy(model: Any) -> Any:
    import onnx

    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def evaluate(model: Any, inputs: Any, labels: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of a torch classifier (handy to compare float, PTQ and QAT)."""
    import numpy as np
    import torch

    x, y = _to_tensor(inputs), as_numpy(labels)
    model.eval()
    device = model_device(model)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            outputs.append(model(x[start:start + batch_size].to(device)).cpu().numpy())
    return float((np.concatenate(outputs).argmax(axis=1) == y).mean())


def as_numpy(value: Any) -> np.ndarray:
    import numpy as np

    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
