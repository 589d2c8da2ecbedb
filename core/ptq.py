"""Beyond plain post-training quantization: cross-layer equalization, bias correction, Q/DQ placement tuning.

Three graph rewrites on ONNX models, each returning a new `ModelArtifact` (the input is never modified):

- `equalize(artifact)`: cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) on the FP32
  model, before quantization. For each pair of layers A -> (positively homogeneous ops) -> B, output channel
  i of A is divided by s_i and input channel i of B multiplied by s_i, with s_i = sqrt(r_A,i / r_B,i), so both
  per-channel weight ranges become sqrt(r_A,i * r_B,i). ReLU/LeakyReLU/PReLU, max/average/global pooling and
  channel-preserving reductions commute with a positive per-channel scale, so the FP32 function is unchanged
  (exact up to float rounding). Per-tensor activations between A and B stop being dominated by a few channels
  whose weights are 10-100x larger than their neighbours (the depthwise-conv failure of plain PTQ).
- `bias_correct(qdq, reference, data)`: for each quantized Conv/Gemm/MatMul of a Q/DQ model, in topological
  order, the mean per-channel shift of its output against the FP32 reference on calibration data is
  subtracted from its bias (empirical bias correction). Memory is one per-channel sum per layer.
- `qdq_tune(qdq)`: removes redundant Q/DQ pairs (DQ->Q round trips with identical parameters, duplicate
  quantizers of one tensor, Q/DQ on the Conv branch of a residual Add), and aligns scales across Concat
  (one shared scale) and MaxPool (output scale = input scale, after which the output pair is redundant) so
  TensorRT need not insert requantize layers. Every change is reported.

numpy and onnx are imported lazily inside functions (plugins import this module's functions on use only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import DataError, InputFileError, OptionError, unknown_name
from .model import ModelArtifact

if TYPE_CHECKING:
    import numpy as np
    import onnx

# Ops through which a positive per-channel scale passes unchanged: f(s * x) = s * f(x) for s > 0.
HOMOGENEOUS_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity",
    "Dropout",
})
# Ops that remove the spatial dimensions while keeping the channel order (valid only after a global pool).
_SPATIAL_REDUCERS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})
_LINEAR_OPS = frozenset({"Conv", "Gemm", "MatMul"})


# ---- graph helpers -----------------------------------------------------------------------------------------
class _Graph:
    """Producer/consumer maps and initializer access for one ONNX graph (the artefact's top-level graph)."""

    def __init__(self, artifact: ModelArtifact) -> None:
        self.artifact = artifact
        self.graph = artifact.model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}
        self._constants = {
            node.output[0]: node for node in self.graph.node if node.op_type == "Constant" and node.output
        }

    def array(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        from onnx import numpy_helper

        if name in self.inits:
            return self.artifact.tensor(self.inits[name])
        node = self._constants.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def init(self, name: str) -> np.ndarray:
        """The value of an initializer known to exist."""
        return self.artifact.tensor(self.inits[name])

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's value in place (the graph belongs to a copy made by the caller)."""
        from onnx import numpy_helper

        proto = numpy_helper.from_array(value, name)
        self.inits[name].CopyFrom(proto)

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        taken = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        unique, index = name, 0
        while unique in taken:
            index += 1
            unique = f"{name}_{index}"
        proto = numpy_helper.from_array(value, unique)
        self.graph.initializer.append(proto)
        self.inits[unique] = self.graph.initializer[-1]
        return unique

    def single_use(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _topological(nodes: Iterable[Any]) -> list[Any]:
    return list(nodes)  # ONNX requires graph nodes in topological order


# ---- cross-layer equalization ---------------------------------------------------------------------------
@dataclass
class _Layer:
    node: Any
    weight: str
    bias: str | None

    @property
    def op(self) -> str:
        return str(self.node.op_type)


@dataclass
class EqualizePair:
    """One equalized pair: A's output channels are divided by `scales`, B's input channels multiplied."""

    first: str
    second: str
    through: list[str]
    channels: int
    range_ratio_before: float  # max/min per-channel weight range of A before (over nonzero channels)
    range_ratio_after: float = 0.0


@dataclass
class EqualizeReport:
    pairs: list[EqualizePair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    iterations: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "pairs": [
                {"first": p.first, "second": p.second, "through": p.through, "channels": p.channels,
                 "range_ratio_before": round(p.range_ratio_before, 4),
                 "range_ratio_after": round(p.range_ratio_after, 4)}
                for p in self.pairs
            ],
            "skipped": self.skipped,
        }


def _layer(g: _Graph, node: Any) -> _Layer | None:
    """A Conv/Gemm/MatMul whose weight is a float initializer used by this node only."""
    if node.op_type not in _LINEAR_OPS or len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight not in g.inits or len(g.consumers.get(weight, [])) != 1:
        return None
    if g.inits[weight].data_type not in (1, 11):  # float32, float64
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in g.inits or len(g.consumers.get(bias, [])) != 1):
        return None
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or bias is not None and g.init(bias).ndim != 1):
        return None
    if node.op_type == "MatMul" and g.init(weight).ndim != 2:
        return None
    return _Layer(node, weight, bias)


def _out_axis(layer: _Layer, weight: np.ndarray) -> int:
    """Axis of the weight that indexes output channels."""
    if layer.op == "Conv":
        return 0
    if layer.op == "Gemm":
        return 0 if _attr(layer.node, "transB", 0) else 1
    return 1  # MatMul [in, out]


def _in_axis(layer: _Layer) -> int:
    if layer.op == "Conv":
        return 1
    if layer.op == "Gemm":
        return 1 if _attr(layer.node, "transB", 0) else 0
    return 0


def _output_ranges(layer: _Layer, weight: np.ndarray) -> np.ndarray:
    import numpy as np

    axis = _out_axis(layer, weight)
    moved = np.moveaxis(np.abs(weight), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def _input_ranges(layer: _Layer, weight: np.ndarray, channels: int) -> np.ndarray | None:
    """Per input channel max |w| of B; None when the channel count does not fit."""
    import numpy as np

    if layer.op == "Conv":
        groups = int(_attr(layer.node, "group", 1))
        cout, cpg = weight.shape[0], weight.shape[1]
        if cpg * groups != channels or cout % groups:
            return None
        per = np.abs(weight).reshape(cout, cpg, -1).max(axis=2)  # [Cout, cpg]
        return per.reshape(groups, cout // groups, cpg).max(axis=1).reshape(-1)
    axis = _in_axis(layer)
    if weight.shape[axis] != channels:
        return None
    moved = np.moveaxis(np.abs(weight), axis, 0)
    return moved.reshape(channels, -1).max(axis=1)


def _scale_output(layer: _Layer, weight: np.ndarray, bias: np.ndarray | None,
                  inv: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    axis = _out_axis(layer, weight)
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_weight = (weight * inv.reshape(shape)).astype(weight.dtype)
    new_bias = None if bias is None else (bias * inv).astype(bias.dtype)
    return new_weight, new_bias


def _scale_input(layer: _Layer, weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    if layer.op == "Conv":
        groups = int(_attr(layer.node, "group", 1))
        cout, cpg = weight.shape[0], weight.shape[1]
        per_out = scales.reshape(groups, 1, cpg).repeat(cout // groups, axis=1).reshape(cout, cpg)
        grouped_shape = (cout, cpg) + (1,) * (weight.ndim - 2)
        return (weight * per_out.reshape(grouped_shape)).astype(weight.dtype)
    axis = _in_axis(layer)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return (weight * scales.reshape(shape)).astype(weight.dtype)


def _follow(g: _Graph, first: _Layer, relu6: str) -> tuple[list[Any], _Layer] | str:
    """Walk from A's output through homogeneous single-use ops to the next linear layer B.

    Returns (ops passed through, B) or the reason the walk stopped (a string)."""
    tensor = first.node.output[0]
    through: list[Any] = []
    channels_last = first.op != "Conv"  # Gemm/MatMul outputs keep channels on the last axis
    reduced = False  # spatial dims removed or of size 1 (after a global pool)
    rank = None
    if first.op == "Conv":
        weight = g.array(first.weight)
        rank = weight.ndim if weight is not None else None
    while True:
        if not g.single_use(tensor):
            return f"{tensor} has several consumers or is a graph output"
        node = g.consumers[tensor][0]
        if node.input[0] != tensor:
            return f"{tensor} is not the data input of {node.name or node.op_type}"
        op = node.op_type
        if op in _LINEAR_OPS:
            second = _layer(g, node)
            if second is None:
                return f"{node.name or op} has no private float weight initializer"
            if second.op == "Conv" and channels_last:
                return f"{node.name or op}: channel layout changes between the layers"
            if second.op != "Conv" and not channels_last:
                return f"{node.name or op}: the Conv output reaches a {op} without a global pool and flatten"
            return through, second
        if op == "PRelu":
            slope = g.array(node.input[1])
            if slope is None:
                return f"{node.name or op}: slope is not a constant"
        elif op == "Clip":
            low = g.array(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "min")
            high = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else _attr(node, "max")
            if low is None or float(low) != 0.0 or (high is not None and relu6 != "relu"):
                return f"{node.name or op}: Clip is not positively homogeneous (relu6=relu treats ReLU6 as ReLU)"
        elif op in ("MaxPool", "AveragePool") and channels_last:
            return f"{node.name or op}: pooling over a channels-last tensor"
        elif op in _SPATIAL_REDUCERS:
            reduced = True
        elif op == "Flatten":
            if not reduced or int(_attr(node, "axis", 1)) != 1:
                return f"{node.name or op}: flatten of a tensor with spatial dims"
            channels_last = True
        elif op == "ReduceMean" and not channels_last:
            axes = _attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                value = g.array(node.input[1])
                axes = None if value is None else [int(a) for a in value.reshape(-1)]
            if axes is None or rank is None:
                return f"{node.name or op}: reduction axes unknown"
            axes = sorted(a % rank for a in axes)
            if 0 in axes or 1 in axes:
                return f"{node.name or op}: reduces over the batch or channel axis"
            if axes == list(range(2, rank)):
                reduced = True
                if not int(_attr(node, "keepdims", 1)):
                    channels_last = True
        elif op not in HOMOGENEOUS_OPS:
            return f"{node.name or op}: {op} is not positively homogeneous"
        through.append(node)
        tensor = node.output[0]


def equalize(
    artifact: ModelArtifact,
    iterations: int = 20,
    max_scale: float = 1e4,
    tolerance: float = 1e-3,
    relu6: str = "skip",
    layers: Iterable[str] | None = None,
) -> tuple[ModelArtifact, EqualizeReport]:
    """Cross-layer equalization of an FP32 ONNX model. Returns (new artefact, report).

    iterations: sweeps over all pairs (each sweep moves ranges closer to a fixed point); stops early when no
      scale changes by more than `tolerance` (relative).
    max_scale: per-channel scales are clipped to [1/max_scale, max_scale].
    relu6: "skip" (Clip(0, 6) blocks equalization: exact) or "relu" (treat ReLU6 as ReLU: not exact for
      activations above 6 / s; the classic DFQ trade-off).
    layers: restrict to pairs whose first layer's node name is listed (unknown names are errors).
    """
    import numpy as np

    if relu6 not in ("skip", "relu"):
        raise OptionError(f"equalize option 'relu6' must be skip or relu, got {relu6!r}")
    if iterations < 1:
        raise OptionError("equalize option 'iterations' must be >= 1")
    if max_scale < 1.0:
        raise OptionError("equalize option 'max_scale' must be >= 1")
    result = artifact.copy()
    g = _Graph(result)
    wanted = set(layers) if layers is not None else None
    if wanted is not None:
        names = {n.name for n in g.graph.node if n.name}
        for name in sorted(wanted):
            if name not in names:
                raise unknown_name("node", name, names)

    report = EqualizeReport()
    chains: list[tuple[_Layer, list[Any], _Layer]] = []
    for node in _topological(g.graph.node):
        first = _layer(g, node)
        if first is None or (wanted is not None and node.name not in wanted):
            continue
        found = _follow(g, first, relu6)
        if isinstance(found, str):
            report.skipped.append(f"{node.name or node.op_type}: {found}")
            continue
        through, second = found
        chains.append((first, through, second))

    weights = {name: g.init(name) for chain in chains for name in (chain[0].weight, chain[2].weight)}
    biases: dict[str, np.ndarray] = {chain[0].bias: g.init(chain[0].bias) for chain in chains if chain[0].bias}
    valid: list[tuple[_Layer, list[Any], _Layer]] = []
    for first, through, second in chains:
        r1 = _output_ranges(first, weights[first.weight])
        if _input_ranges(second, weights[second.weight], len(r1)) is None:
            report.skipped.append(f"{first.node.name or first.op}: channel counts do not match "
                                  f"{second.node.name or second.op}")
            continue
        valid.append((first, through, second))

    def ratio(values: np.ndarray) -> float:
        nonzero = values[values > 0]
        return float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0

    before = [ratio(_output_ranges(f, weights[f.weight])) for f, _, _ in valid]
    for sweep in range(iterations):
        report.iterations = sweep + 1
        largest = 0.0
        for first, _, second in valid:
            w1, w2 = weights[first.weight], weights[second.weight]
            r1 = _output_ranges(first, w1).astype(np.float64)
            r2 = _input_ranges(second, w2, len(r1)).astype(np.float64)  # type: ignore[union-attr]
            ok = (r1 > 0) & (r2 > 0)
            scales = np.ones_like(r1)
            scales[ok] = np.sqrt(r1[ok] / r2[ok])
            scales = np.clip(scales, 1.0 / max_scale, max_scale)
            largest = max(largest, float(np.max(np.abs(scales - 1.0))))
            bias = biases.get(first.bias) if first.bias else None
            new_w1, new_bias = _scale_output(first, w1, bias, (1.0 / scales).astype(w1.dtype))
            weights[first.weight] = new_w1
            if first.bias:
                biases[first.bias] = new_bias  # type: ignore[assignment]
            weights[second.weight] = _scale_input(second, w2, scales.astype(w2.dtype))
        if largest <= tolerance:
            break

    for index, (first, through, second) in enumerate(valid):
        report.pairs.append(EqualizePair(
            first=first.node.name or first.node.output[0], second=second.node.name or second.node.output[0],
            through=[n.op_type for n in through], channels=int(len(_output_ranges(first, weights[first.weight]))),
            range_ratio_before=before[index],
            range_ratio_after=ratio(_output_ranges(first, weights[first.weight])),
        ))
    for name, value in weights.items():
        g.set_array(name, value)
    for name, value in biases.items():
        g.set_array(name, value)
    ptq = result.metadata.setdefault("ptq", {})
    ptq["equalize"] = {"pairs": len(report.pairs), "iterations": report.iterations, "relu6": relu6}
    return result, report


# ---- bias correction -----------------------------------------------------------------------------------------
@dataclass
class BiasCorrection:
    node: str
    tensor: str
    channels: int
    shift_before: float  # mean |per-channel mean shift| against the reference, before correction
    shift_after: float | None = None


@dataclass
class BiasReport:
    layers: list[BiasCorrection] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    iterations: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "iterations": self.iterations,
            "layers": [{"node": c.node, "tensor": c.tensor, "channels": c.channels,
                        "shift_before": round(c.shift_before, 6),
                        "shift_after": None if c.shift_after is None else round(c.shift_after, 6)}
                       for c in self.layers],
            "skipped": dict(sorted(self.skipped.items())),
        }


def _as_artifact(model: Any, what: str) -> ModelArtifact:
    import os

    import onnx

    if isinstance(model, ModelArtifact):
        return model
    if isinstance(model, onnx.ModelProto):
        return ModelArtifact.from_model(model)
    if isinstance(model, (str, os.PathLike)) and str(model):
        return ModelArtifact.load(model)
    raise OptionError(f"{what}: expected an ONNX file, ModelArtifact or ModelProto, got {model!r}")


def _is_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _channel_means(artifact: ModelArtifact, axes: Mapping[str, int], batches: Iterable[dict[str, Any]],
                   label: str) -> tuple[dict[str, np.ndarray], int]:
    """Per-channel mean of each named tensor over the data (sums only: memory independent of samples)."""
    import numpy as np

    from .runtime import session

    sess = session(artifact, extra_outputs=sorted(axes))
    names = sorted(axes)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    samples = 0
    for feeds in batches:
        try:
            values = sess.run(names, feeds)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{label}: onnxruntime failed on the data: {first}") from None
        samples += len(next(iter(feeds.values())))
        for name, value in zip(names, values, strict=True):
            axis = axes[name] % value.ndim
            moved = np.moveaxis(value.astype(np.float64), axis, 0).reshape(value.shape[axis], -1)
            sums[name] = sums.get(name, 0.0) + moved.sum(axis=1)
            counts[name] += moved.shape[1]
    return {name: sums[name] / max(counts[name], 1) for name in names if name in sums}, samples


def bias_correct(
    artifact: ModelArtifact | str,
    reference: ModelArtifact | str,
    data: Any,
    limit: int | None = 256,
    batch_size: int = 32,
    iterations: int = 1,
    verify: bool = True,
) -> tuple[ModelArtifact, BiasReport]:
    """Empirical bias correction of a Q/DQ model. Returns (new artefact, report).

    For every Conv/Gemm (and MatMul followed by a bias Add) whose weight is dequantized (int8 ->
    DequantizeLinear) and whose output tensor also exists in `reference` (the FP32 model the Q/DQ model was
    made from: trtkit's QDQ builder keeps tensor names), the per-output-channel mean of (INT8 output - FP32 output) over `data` is subtracted from the
    layer's bias (a bias is added when the layer has none). Q/DQ are emulated in float, as TensorRT computes.
    Layers are corrected one at a time in graph order, each measured with all upstream corrections applied
    (one run over the data per layer). iterations: sweeps over all layers (1 is usually enough).
    verify: measure after the last correction too and keep the state (uncorrected, or after some
      iteration) with the smallest total mean shift on the data, so the pass never makes that worse.
    """
    import copy

    import numpy as np

    from .data import load_data
    from .ui import track

    if not reference:
        raise OptionError("bias-correct needs option 'reference' (the FP32 model the Q/DQ model came from)")
    if data is None or (isinstance(data, str) and not data):
        raise OptionError("bias-correct needs option 'data' (calibration data)")
    if iterations < 1:
        raise OptionError("bias-correct option 'iterations' must be >= 1")
    qdq = _as_artifact(artifact, "bias-correct model")
    ref = _as_artifact(reference, "bias-correct option 'reference'")
    label = str(qdq.source or "model")
    if not _is_qdq(qdq.model):
        raise InputFileError(f"{label}: has no Q/DQ nodes; bias correction applies to a quantized model")
    if _is_qdq(ref.model):
        raise InputFileError(f"{ref.source or 'reference'}: the reference must be the FP32 model (it has Q/DQ)")
    source = load_data(data, ref.model, batch_size=batch_size, limit=limit)

    result = qdq.copy()
    g = _Graph(result)
    ref_tensors = {name for node in ref.model.graph.node for name in node.output}
    report = BiasReport()
    targets: dict[str, tuple[Any, int]] = {}  # corrected tensor -> (node holding the bias, bias input slot)
    names: dict[str, str] = {}
    axes: dict[str, int] = {}
    for node in g.graph.node:
        label_node = node.name or node.output[0]
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight_producer = g.producer.get(node.input[1])
        if weight_producer is None or weight_producer.op_type != "DequantizeLinear":
            continue
        holder, slot, out = node, 2, node.output[0]
        if node.op_type == "MatMul":  # MatMul -> Add(bias initializer): correct the Add's constant
            users = g.consumers.get(out, [])
            if len(users) != 1 or users[0].op_type != "Add" or out in g.outputs:
                report.skipped[label_node] = "MatMul without a following bias Add"
                continue
            holder = users[0]
            slot = 1 - list(holder.input).index(out)
            bias = holder.input[slot]
            if bias not in g.inits or g.init(bias).ndim != 1:
                report.skipped[label_node] = "the Add after the MatMul has no 1-D bias initializer"
                continue
            out = holder.output[0]
        if out not in ref_tensors:
            report.skipped[label_node] = f"output {out} not in the reference model"
            continue
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2] and node.input[2] not in g.inits:
            report.skipped[label_node] = "bias is not a float initializer"
            continue
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                report.skipped[label_node] = "transposed input"
                continue
            if len(node.input) > 2 and node.input[2] and g.init(node.input[2]).ndim != 1:
                report.skipped[label_node] = "bias is not one value per output"
                continue
        targets[out] = (holder, slot)
        names[out] = label_node
        axes[out] = 1 if node.op_type == "Conv" else -1
    if not targets:
        raise InputFileError(f"{label}: no quantized Conv/Gemm/MatMul+Add whose output is in the reference model")

    ref_means, report.samples = _channel_means(ref, axes, source.batches(), "reference")
    if report.samples == 0:
        raise DataError("bias-correct: the data source gave no samples")
    q_means, _ = _channel_means(result, axes, source.batches(), label)
    first_shift = {out: q_means[out] - ref_means[out] for out in targets}
    original_model = copy.deepcopy(result.model)
    order = list(targets)  # graph order is topological: upstream layers are corrected first
    steps = [(sweep, out) for sweep in range(iterations) for out in order]
    for sweep, out in track(steps, total=len(steps), description="bias correction"):
        if sweep == 0 and out == order[0]:
            shift = first_shift[out]
        else:
            means, _ = _channel_means(result, {out: axes[out]}, source.batches(), label)
            shift = means[out] - ref_means[out]
        _add_to_bias(g, *targets[out], -shift)
        report.iterations = sweep + 1
    final_shift: dict[str, np.ndarray] = {}
    if verify:
        q_means, _ = _channel_means(result, axes, source.batches(), label)
        final_shift = {out: q_means[out] - ref_means[out] for out in targets}
        before = sum(float(np.mean(np.abs(v))) for v in first_shift.values())
        after = sum(float(np.mean(np.abs(v))) for v in final_shift.values())
        if after >= before:  # never return a model that is worse on the data than the input
            result.model = original_model
            final_shift = first_shift
            report.skipped["*"] = f"corrections did not reduce the mean shift ({before:.4g} -> {after:.4g}); kept"
    for out in targets:
        report.layers.append(BiasCorrection(
            node=names[out], tensor=out, channels=int(first_shift[out].size),
            shift_before=float(np.mean(np.abs(first_shift[out]))),
            shift_after=float(np.mean(np.abs(final_shift[out]))) if out in final_shift else None,
        ))
    result.metadata.setdefault("ptq", {})["bias_correct"] = {
        "layers": len(report.layers), "samples": report.samples, "iterations": report.iterations,
        "shift_before": round(sum(c.shift_before for c in report.layers), 6),
        "shift_after": None if not verify else round(sum(c.shift_after or 0.0 for c in report.layers), 6),
    }
    return result, report


def _add_to_bias(g: _Graph, node: Any, slot: int, delta: np.ndarray) -> None:
    """node.input[slot] (a bias) += delta (float32), creating or un-sharing the initializer as needed."""
    import numpy as np

    beta = float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    delta = (delta / (beta if beta else 1.0)).astype(np.float32)
    name = node.input[slot] if len(node.input) > slot and node.input[slot] else None
    if name is None:
        new = g.add_initializer(f"{node.name or node.output[0]}_bias", delta)
        while len(node.input) < slot:
            node.input.append("")
        if len(node.input) == slot:
            node.input.append(new)
        else:
            node.input[slot] = new
        g.consumers.setdefault(new, []).append(node)
        return
    current = g.init(name).astype(np.float32)
    if len(g.consumers.get(name, [])) > 1:
        new = g.add_initializer(f"{name}_corrected", (current + delta).astype(np.float32))
        g.consumers[name].remove(node)
        node.input[slot] = new
        g.consumers.setdefault(new, []).append(node)
        return
    g.set_array(name, (current + delta).astype(np.float32))


# ---- Q/DQ placement tuning -----------------------------------------------------------------------------------
@dataclass
class TuneReport:
    changes: list[dict[str, Any]] = field(default_factory=list)
    sqnr_db: float | None = None  # tuned vs input model on random inputs (when verified)

    def add(self, action: str, where: str, detail: str) -> None:
        self.changes.append({"action": action, "where": where, "detail": detail})

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for change in self.changes:
            result[change["action"]] = result.get(change["action"], 0) + 1
        return dict(sorted(result.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "counts": self.counts(), "sqnr_db": self.sqnr_db}


def _qparams(g: _Graph, node: Any) -> tuple[Any, ...] | None:
    """(scale bytes, zero point bytes, zero point dtype, axis) of a Q/DQ node with constant parameters."""
    scale = g.array(node.input[1])
    if scale is None:
        return None
    zero = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    zero_key = (zero.tobytes(), str(zero.dtype)) if zero is not None else (b"", "uint8")
    axis = _attr(node, "axis", 1) if scale.size > 1 else None
    return (scale.astype("float32").tobytes(), *zero_key, axis)


def _per_tensor_scale(g: _Graph, node: Any) -> float | None:
    scale = g.array(node.input[1])
    if scale is None or scale.size != 1:
        return None
    zero = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and zero.reshape(-1)[0] != 0:
        return None
    return float(scale.reshape(-1)[0])


def _rewire(g: _Graph, old: str, new: str) -> None:
    for consumer in g.consumers.get(old, []):
        for index, name in enumerate(consumer.input):
            if name == old:
                consumer.input[index] = new
        g.consumers.setdefault(new, []).append(consumer)
    g.consumers[old] = []


def _remove_dead(g: _Graph, nodes: list[Any]) -> None:
    for node in nodes:
        for name in node.input:
            if name and node in g.consumers.get(name, []):
                g.consumers[name].remove(node)
        g.graph.node.remove(node)


def qdq_tune(
    artifact: ModelArtifact | str,
    align_concat: bool = True,
    align_pool: bool = True,
    residual: bool = True,
    outputs: bool = True,
    verify: bool = True,
) -> tuple[ModelArtifact, TuneReport]:
    """Tune Q/DQ placement of a quantized model for TensorRT. Returns (new artefact, report of every change).

    Exact rewrites (always): duplicate QuantizeLinear nodes of one tensor with identical parameters are
    merged; a DequantizeLinear -> QuantizeLinear round trip with identical parameters is removed.
    By design (options): Q/DQ feeding graph outputs are removed (`outputs`); on a residual Add whose two
    inputs are both dequantized, the pair on the branch coming straight from a Conv is removed so TensorRT
    can fuse the Add into that Conv (`residual`); Concat inputs and output share the largest scale
    (`align_concat`); a MaxPool's output quantizer takes its input's scale (`align_pool`), so no requantize
    layer is needed. verify: SQNR of the tuned model against the input model on random inputs must stay
    above 15 dB (NumericalCheckError otherwise: a sanity check, since aligned scales change outputs).
    """
    import numpy as np
    from onnx import helper

    from .errors import NumericalCheckError

    source = _as_artifact(artifact, "qdq-tune model")
    label = str(source.source or "model")
    if not _is_qdq(source.model):
        raise InputFileError(f"{label}: has no Q/DQ nodes; qdq-tune applies to a quantized model")
    result = source.copy()
    report = TuneReport()

    def name_of(node: Any) -> str:
        return str(node.name or node.output[0])

    # 1. duplicate quantizers of one tensor (exact)
    g = _Graph(result)
    seen: dict[tuple[Any, ...], Any] = {}
    dead: list[Any] = []
    for node in list(g.graph.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        params = _qparams(g, node)
        if params is None or node.output[0] in g.outputs:
            continue
        key = (node.op_type, node.input[0], params)
        if key in seen:
            _rewire(g, node.output[0], seen[key].output[0])
            dead.append(node)
            report.add("merge-duplicate", name_of(node), f"same {node.op_type} as {name_of(seen[key])}")
        else:
            seen[key] = node
    _remove_dead(g, dead)

    # 2. DQ -> Q round trips with identical parameters (exact)
    g = _Graph(result)
    dead = []
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear" or node.output[0] in g.outputs:
            continue
        producer = g.producer.get(node.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        if _qparams(g, producer) != _qparams(g, node) or _qparams(g, node) is None:
            continue
        if g.inits.get(producer.input[0]) is not None:
            continue
        _rewire(g, node.output[0], producer.input[0])
        dead.append(node)
        report.add("remove-requantize", name_of(node), f"{name_of(producer)} -> {name_of(node)} is an identity")
    _remove_dead(g, dead)
    g = _Graph(result)
    dead = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and not g.consumers.get(n.output[0])
            and n.output[0] not in g.outputs and n.input[0] not in g.inits]
    _remove_dead(g, dead)

    def activation_pair(tensor: str) -> tuple[Any, Any] | None:
        """(Q, DQ) when `tensor` is the output of DQ(Q(x)) on an activation with per-tensor parameters."""
        dq = g.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in g.inits:
            return None
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or _per_tensor_scale(g, q) is None:
            return None
        return q, dq

    # 3. Q/DQ on graph outputs
    if outputs:
        g = _Graph(result)
        for output in list(g.outputs):
            pair = activation_pair(output)
            if pair is None:
                continue
            q, dq = pair
            if len(g.consumers.get(q.output[0], [])) != 1:
                continue
            index = list(g.graph.node).index(dq)
            g.graph.node.insert(index, helper.make_node("Identity", [q.input[0]], [output],
                                                        name=f"{name_of(dq)}_unquantized"))
            _remove_dead(g, [dq, q])
            report.add("unquantize-output", output, "graph outputs are not quantized (TensorRT rule)")

    # 4. residual Add: keep Q/DQ on the skip branch only
    if residual:
        g = _Graph(result)
        for node in list(g.graph.node):
            if node.op_type != "Add" or len(node.input) != 2:
                continue
            pairs = [activation_pair(name) for name in node.input]
            if any(p is None for p in pairs):
                continue
            for slot, (q, dq) in enumerate(pairs):  # type: ignore[misc]
                producer = g.producer.get(q.input[0])
                if producer is None or producer.op_type != "Conv":
                    continue
                if len(g.consumers.get(q.input[0], [])) != 1 or len(g.consumers.get(q.output[0], [])) != 1 \
                        or len(g.consumers.get(dq.output[0], [])) != 1:
                    continue
                node.input[slot] = q.input[0]
                _remove_dead(g, [dq, q])
                report.add("residual-branch", name_of(node),
                           f"removed Q/DQ between {name_of(producer)} and the Add (TensorRT fuses them)")
                break

    def set_pair_scale(q: Any, scale: float, tag: str) -> None:
        """Give Q and every DQ reading it a new scale initializer (unshared)."""
        new = g.add_initializer(f"{q.input[0]}_{tag}_scale", np.array(scale, dtype=np.float32))
        q.input[1] = new
        for dq in g.consumers.get(q.output[0], []):
            if dq.op_type == "DequantizeLinear":
                dq.input[1] = new

    # 5. Concat: one shared scale
    if align_concat:
        g = _Graph(result)
        for node in list(g.graph.node):
            if node.op_type != "Concat":
                continue
            pairs = [activation_pair(name) for name in node.input]
            users = g.consumers.get(node.output[0], [])
            out_qs = [u for u in users if u.op_type == "QuantizeLinear" and _per_tensor_scale(g, u) is not None]
            if any(p is None for p in pairs) or not out_qs:
                continue
            quantizers_ = [p[0] for p in pairs if p is not None] + out_qs
            scales = [_per_tensor_scale(g, q) for q in quantizers_]
            if len({s for s in scales}) == 1:
                continue
            shared = float(max(s for s in scales if s is not None))
            for q in quantizers_:
                set_pair_scale(q, shared, "concat")
            report.add("align-concat", name_of(node),
                       f"{len(quantizers_)} quantizers share scale {shared:.6g} (were {min(scales):.6g}.."  # type: ignore[type-var]
                       f"{shared:.6g})")

    # 6. MaxPool: output quantizer takes the input scale
    if align_pool:
        g = _Graph(result)
        for node in list(g.graph.node):
            if node.op_type not in ("MaxPool", "GlobalMaxPool"):
                continue
            pair = activation_pair(node.input[0])
            if pair is None:
                continue
            in_scale = _per_tensor_scale(g, pair[1])
            for user in g.consumers.get(node.output[0], []):
                out_scale = _per_tensor_scale(g, user) if user.op_type == "QuantizeLinear" else None
                if out_scale is None or in_scale is None or out_scale == in_scale:
                    continue
                set_pair_scale(user, in_scale, "pool")
                report.add("align-pool", name_of(node), f"output scale {out_scale:.6g} -> input scale {in_scale:.6g}")

    if verify and report.changes:
        from .metrics import sqnr_db
        from .runtime import random_inputs, run, session

        feeds = random_inputs(source.model, seed=0)
        before = run(session(source), feeds)
        after = run(session(result), feeds)
        values = [sqnr_db(before[k], after[k]) for k in before if before[k].dtype.kind == "f"]
        report.sqnr_db = float(min(values)) if values else None
        if report.sqnr_db is not None and report.sqnr_db < 15.0:
            raise NumericalCheckError(f"qdq-tune: tuned model differs from {label} (SQNR {report.sqnr_db:.1f} dB)")
    result.metadata.setdefault("ptq", {})["qdq_tune"] = report.as_dict()
    return result, report
