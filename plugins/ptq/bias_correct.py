"""The `bias-correct` pass: empirical bias correction of a Q/DQ model against its FP32 reference.

For each quantized Conv/Gemm/MatMul, in topological order, the mean per-channel shift of its output against
the FP32 reference on calibration data is subtracted from its bias. Memory is one per-channel sum per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.errors import DataError, InputFileError, OptionError, first_line
from trtkit.graph import GraphIndex
from trtkit.model import as_artifact

from .common import add_initializer, attribute, has_qdq, initializer_array, set_initializer

if TYPE_CHECKING:
    import numpy as np

    from trtkit.model import ModelArtifact


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



def _channel_means(artifact: ModelArtifact, axes: Mapping[str, int], batches: Iterable[dict[str, Any]],
                   label: str) -> tuple[dict[str, np.ndarray], int]:
    """Per-channel mean of each named tensor over the data (sums only: memory independent of samples)."""
    import numpy as np

    from trtkit.runtime import session

    sess = session(artifact, extra_outputs=sorted(axes))
    names = sorted(axes)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    samples = 0
    for feeds in batches:
        try:
            values = sess.run(names, feeds)
        except Exception as exc:
            raise DataError(f"{label}: onnxruntime failed on the data: {first_line(exc)}") from None
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

    from trtkit.data import load_data
    from trtkit.ui import track

    if not reference:
        raise OptionError("bias-correct needs option 'reference' (the FP32 model the Q/DQ model came from)")
    if data is None or (isinstance(data, str) and not data):
        raise OptionError("bias-correct needs option 'data' (calibration data)")
    if iterations < 1:
        raise OptionError("bias-correct option 'iterations' must be >= 1")
    qdq = as_artifact(artifact, "bias-correct model")
    ref = as_artifact(reference, "bias-correct option 'reference'")
    label = str(qdq.source or "model")
    if not has_qdq(qdq.model):
        raise InputFileError(f"{label}: has no Q/DQ nodes; bias correction applies to a quantized model")
    if has_qdq(ref.model):
        raise InputFileError(f"{ref.source or 'reference'}: the reference must be the FP32 model (it has Q/DQ)")
    source = load_data(data, ref.model, batch_size=batch_size, limit=limit)

    result = qdq.copy()
    index = GraphIndex(result.model.graph)
    ref_tensors = {name for node in ref.model.graph.node for name in node.output}
    report = BiasReport()
    targets: dict[str, tuple[Any, int]] = {}  # corrected tensor -> (node holding the bias, bias input slot)
    names: dict[str, str] = {}
    axes: dict[str, int] = {}
    for node in index.graph.node:
        label_node = node.name or node.output[0]
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight_producer = index.producer.get(node.input[1])
        if weight_producer is None or weight_producer.op_type != "DequantizeLinear":
            continue
        holder, slot, out = node, 2, node.output[0]
        if node.op_type == "MatMul":  # MatMul -> Add(bias initializer): correct the Add's constant
            users = index.readers(out)
            if len(users) != 1 or users[0].op_type != "Add" or out in index.outputs:
                report.skipped[label_node] = "MatMul without a following bias Add"
                continue
            holder = users[0]
            slot = 1 - list(holder.input).index(out)
            bias = holder.input[slot]
            if bias not in index.initializers or initializer_array(result, index, bias).ndim != 1:
                report.skipped[label_node] = "the Add after the MatMul has no 1-D bias initializer"
                continue
            out = holder.output[0]
        if out not in ref_tensors:
            report.skipped[label_node] = f"output {out} not in the reference model"
            continue
        own_bias = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2] else None
        if own_bias is not None and own_bias not in index.initializers:
            report.skipped[label_node] = "bias is not a float initializer"
            continue
        if node.op_type == "Gemm":
            if attribute(node, "transA", 0):
                report.skipped[label_node] = "transposed input"
                continue
            if own_bias is not None and initializer_array(result, index, own_bias).ndim != 1:
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
        _add_to_bias(result, index, *targets[out], -shift)
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


def _add_to_bias(artifact: ModelArtifact, index: GraphIndex, node: Any, slot: int, delta: np.ndarray) -> None:
    """node.input[slot] (a bias) += delta (float32), creating or un-sharing the initializer as needed."""
    import numpy as np

    beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    delta = (delta / (beta if beta else 1.0)).astype(np.float32)
    name = node.input[slot] if len(node.input) > slot and node.input[slot] else None
    if name is None:
        new = add_initializer(index, f"{node.name or node.output[0]}_bias", delta)
        while len(node.input) < slot:
            node.input.append("")
        if len(node.input) == slot:
            node.input.append(new)
        else:
            node.input[slot] = new
        index.consumers.setdefault(new, []).append((node, slot))
        return
    current = initializer_array(artifact, index, name).astype(np.float32)
    if len(index.consumers.get(name, [])) > 1:  # shared with another layer: this one gets its own copy
        new = add_initializer(index, f"{name}_corrected", (current + delta).astype(np.float32))
        index.consumers[name] = [(n, s) for n, s in index.consumers[name] if not (n is node and s == slot)]
        node.input[slot] = new
        index.consumers.setdefault(new, []).append((node, slot))
        return
    set_initializer(index, name, (current + delta).astype(np.float32))
