"""The `equalize` pass: cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) of an FP32
model, before quantization.

For each pair of layers A -> (positively homogeneous ops) -> B, output channel i of A is divided by s_i and
input channel i of B multiplied by s_i, with s_i = sqrt(r_A,i / r_B,i), so both per-channel weight ranges
become sqrt(r_A,i * r_B,i). ReLU/LeakyReLU/PReLU, max/average/global pooling and channel-preserving
reductions commute with a positive per-channel scale, so the FP32 function is unchanged (exact up to float
rounding). Per-tensor activations between A and B stop being dominated by a few channels whose weights are
10-100x larger than their neighbours (the depthwise-conv failure of plain PTQ).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.errors import OptionError, unknown_name
from trtkit.graph import GraphIndex

from .common import attribute, constant_array, initializer_array, set_initializer

if TYPE_CHECKING:
    import numpy as np

    from trtkit.model import ModelArtifact

# Ops through which a positive per-channel scale passes unchanged: f(s * x) = s * f(x) for s > 0.
HOMOGENEOUS_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity",
    "Dropout",
})
# Ops that remove the spatial dimensions while keeping the channel order (valid only after a global pool).
_SPATIAL_REDUCERS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})
_LINEAR_OPS = frozenset({"Conv", "Gemm", "MatMul"})


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


def _layer(artifact: ModelArtifact, index: GraphIndex, node: Any) -> _Layer | None:
    """A Conv/Gemm/MatMul whose weight is a float initializer used by this node only."""
    if node.op_type not in _LINEAR_OPS or len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight not in index.initializers or len(index.consumers.get(weight, [])) != 1:
        return None
    if index.initializers[weight].data_type not in (1, 11):  # float32, float64
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in index.initializers or len(index.consumers.get(bias, [])) != 1):
        return None
    if node.op_type == "Gemm" and (attribute(node, "transA", 0)
                                   or bias is not None and initializer_array(artifact, index, bias).ndim != 1):
        return None
    if node.op_type == "MatMul" and initializer_array(artifact, index, weight).ndim != 2:
        return None
    return _Layer(node, weight, bias)


def _out_axis(layer: _Layer, weight: np.ndarray) -> int:
    """Axis of the weight that indexes output channels."""
    if layer.op == "Conv":
        return 0
    if layer.op == "Gemm":
        return 0 if attribute(layer.node, "transB", 0) else 1
    return 1  # MatMul [in, out]


def _in_axis(layer: _Layer) -> int:
    if layer.op == "Conv":
        return 1
    if layer.op == "Gemm":
        return 1 if attribute(layer.node, "transB", 0) else 0
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
        groups = int(attribute(layer.node, "group", 1))
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
        groups = int(attribute(layer.node, "group", 1))
        cout, cpg = weight.shape[0], weight.shape[1]
        per_out = scales.reshape(groups, 1, cpg).repeat(cout // groups, axis=1).reshape(cout, cpg)
        grouped_shape = (cout, cpg) + (1,) * (weight.ndim - 2)
        return (weight * per_out.reshape(grouped_shape)).astype(weight.dtype)
    axis = _in_axis(layer)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return (weight * scales.reshape(shape)).astype(weight.dtype)


def _follow(artifact: ModelArtifact, index: GraphIndex, first: _Layer,
            relu6: str) -> tuple[list[Any], _Layer] | str:
    """Walk from A's output through homogeneous single-use ops to the next linear layer B.

    Returns (ops passed through, B) or the reason the walk stopped (a string)."""
    tensor = first.node.output[0]
    through: list[Any] = []
    channels_last = first.op != "Conv"  # Gemm/MatMul outputs keep channels on the last axis
    reduced = False  # spatial dims removed or of size 1 (after a global pool)
    rank = None
    if first.op == "Conv":
        weight = constant_array(artifact, index, first.weight)
        rank = weight.ndim if weight is not None else None
    while True:
        if not index.single_use(tensor):
            return f"{tensor} has several consumers or is a graph output"
        node = index.readers(tensor)[0]
        if node.input[0] != tensor:
            return f"{tensor} is not the data input of {node.name or node.op_type}"
        op = node.op_type
        if op in _LINEAR_OPS:
            second = _layer(artifact, index, node)
            if second is None:
                return f"{node.name or op} has no private float weight initializer"
            if second.op == "Conv" and channels_last:
                return f"{node.name or op}: channel layout changes between the layers"
            if second.op != "Conv" and not channels_last:
                return f"{node.name or op}: the Conv output reaches a {op} without a global pool and flatten"
            return through, second
        if op == "PRelu":
            slope = constant_array(artifact, index, node.input[1])
            if slope is None:
                return f"{node.name or op}: slope is not a constant"
        elif op == "Clip":
            low = (constant_array(artifact, index, node.input[1]) if len(node.input) > 1 and node.input[1]
                   else attribute(node, "min"))
            high = (constant_array(artifact, index, node.input[2]) if len(node.input) > 2 and node.input[2]
                    else attribute(node, "max"))
            if low is None or float(low) != 0.0 or (high is not None and relu6 != "relu"):
                return f"{node.name or op}: Clip is not positively homogeneous (relu6=relu treats ReLU6 as ReLU)"
        elif op in ("MaxPool", "AveragePool") and channels_last:
            return f"{node.name or op}: pooling over a channels-last tensor"
        elif op in _SPATIAL_REDUCERS:
            reduced = True
        elif op == "Flatten":
            if not reduced or int(attribute(node, "axis", 1)) != 1:
                return f"{node.name or op}: flatten of a tensor with spatial dims"
            channels_last = True
        elif op == "ReduceMean" and not channels_last:
            axes = attribute(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                value = constant_array(artifact, index, node.input[1])
                axes = None if value is None else [int(a) for a in value.reshape(-1)]
            if axes is None or rank is None:
                return f"{node.name or op}: reduction axes unknown"
            axes = sorted(a % rank for a in axes)
            if 0 in axes or 1 in axes:
                return f"{node.name or op}: reduces over the batch or channel axis"
            if axes == list(range(2, rank)):
                reduced = True
                if not int(attribute(node, "keepdims", 1)):
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
    index = GraphIndex(result.model.graph)
    wanted = set(layers) if layers is not None else None
    if wanted is not None:
        names = {n.name for n in index.graph.node if n.name}
        for name in sorted(wanted):
            if name not in names:
                raise unknown_name("node", name, names)

    report = EqualizeReport()
    chains: list[tuple[_Layer, list[Any], _Layer]] = []
    for node in index.graph.node:
        first = _layer(result, index, node)
        if first is None or (wanted is not None and node.name not in wanted):
            continue
        found = _follow(result, index, first, relu6)
        if isinstance(found, str):
            report.skipped.append(f"{node.name or node.op_type}: {found}")
            continue
        through, second = found
        chains.append((first, through, second))

    weights = {name: initializer_array(result, index, name)
               for chain in chains for name in (chain[0].weight, chain[2].weight)}
    biases: dict[str, np.ndarray] = {chain[0].bias: initializer_array(result, index, chain[0].bias)
                                     for chain in chains if chain[0].bias}
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

    for position, (first, through, second) in enumerate(valid):
        report.pairs.append(EqualizePair(
            first=first.node.name or first.node.output[0], second=second.node.name or second.node.output[0],
            through=[n.op_type for n in through], channels=int(len(_output_ranges(first, weights[first.weight]))),
            range_ratio_before=before[position],
            range_ratio_after=ratio(_output_ranges(first, weights[first.weight])),
        ))
    for name, value in weights.items():
        set_initializer(index, name, value)
    for name, value in biases.items():
        set_initializer(index, name, value)
    ptq = result.metadata.setdefault("ptq", {})
    ptq["equalize"] = {"pairs": len(report.pairs), "iterations": report.iterations, "relu6": relu6}
    return result, report

