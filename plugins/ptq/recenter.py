"""The `recenter` pass: one-sided activations of a Q/DQ model re-centred on zero, so that symmetric INT8
spends all its levels on them.

TensorRT's activation quantizers are symmetric with zero point 0, so the output of a ReLU or ReLU6 (values in
[0, amax]) uses only the 128 non-negative levels: twice the step an asymmetric quantizer would take. Where the
activation sits between two linear layers, shifting it by s = amax / 2 costs nothing at run time and halves
the step (+6 dB on that tensor's quantization noise):

    A (Conv/Gemm, float bias) -> Relu | Clip(0, hi) -> [Pad 0] -> Q(scale) -> DQ -> B (Conv/Gemm, float bias)
becomes
    A (bias - s) -> Clip(-s, hi - s) -> [Pad -s] -> Q(scale / 2) -> DQ -> B (bias + s * sum of B's int8 weights)

B's bias takes the shift with B's dequantized int8 weights, so the model computes exactly what it did, on a
grid twice as fine: x - s in [-s, s] where x was in [0, 2s]. Only consumers without implicit zero padding are
rewritten (1x1 convs, Gemm, convs behind an explicit Pad, whose fill value moves with the shift): an implicit
zero pad would now read -s. On EfficientNet-Lite2 (real weights, 160 real evaluation crops, nearest rounding,
percentile scales) shifting its 42 such tensors lifts the logits' SQNR from 14.7 to 16.4 dB; the stem's
output alone gives 16.2 dB: its first depthwise layer amplifies that tensor's noise.

TensorRT imports ONNX's ReLU6 (Clip 0..6) and the shifted Clip as the same layer, a kCLIP activation with
other bounds, so its convolution + activation fusion treats both alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.graph import GraphIndex
from trtkit.model import as_artifact

from .common import add_initializer, attribute, constant_array, has_qdq, set_initializer

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from trtkit.model import ModelArtifact

_LINEAR = frozenset({"Conv", "Gemm"})


@dataclass
class RecenterReport:
    shifted: list[dict[str, Any]] = field(default_factory=list)  # tensor, shift, consumers
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why not
    max_abs_diff: float | None = None  # the float check (recenter(verify=True)), None when not run

    def as_dict(self) -> dict[str, Any]:
        return {"shifted": self.shifted, "skipped": self.skipped, "max_abs_diff": self.max_abs_diff}


def _dequantized(artifact: ModelArtifact, index: GraphIndex, name: str) -> np.ndarray | None:
    """The float value a layer reads as its weight: a constant, or a DequantizeLinear of constants."""
    import numpy as np

    value = constant_array(artifact, index, name)
    if value is not None:
        return value.astype(np.float64)
    node = index.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    q = constant_array(artifact, index, node.input[0])
    scale = constant_array(artifact, index, node.input[1])
    zero = constant_array(artifact, index, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if q is None or scale is None:
        return None
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[attribute(node, "axis", 1) % q.ndim] = -1
    centred = q.astype(np.float64) - (0.0 if zero is None else zero.astype(np.float64).reshape(shape))
    return centred * scale.astype(np.float64).reshape(shape)


def _weight_sums(artifact: ModelArtifact, index: GraphIndex, layer: Any) -> np.ndarray | str:
    """Per output channel, the sum of the layer's (dequantized) weights over everything it reads from its
    activation input: what a constant shift of that input adds to the output. A reason string if not exact."""
    weight = _dequantized(artifact, index, layer.input[1])
    if weight is None:
        return f"{layer.name or layer.op_type}: weight is not a constant or a DequantizeLinear of constants"
    if layer.op_type == "Conv":
        if any(attribute(layer, "pads", []) or []) or attribute(layer, "auto_pad", b"NOTSET") not in (b"NOTSET",
                                                                                                     "NOTSET"):
            return f"{layer.name or 'Conv'}: implicit zero padding would read the shift"
        return weight.reshape(weight.shape[0], -1).sum(axis=1)
    if attribute(layer, "transA", 0) or weight.ndim != 2:
        return f"{layer.name or 'Gemm'}: transposed input"
    return weight.sum(axis=1) if attribute(layer, "transB", 0) else weight.sum(axis=0)


def _bias(artifact: ModelArtifact, index: GraphIndex, layer: Any, channels: int) -> tuple[str | None, Any]:
    """(name of a float bias initializer the layer owns alone, its value); (None, reason) when it has none
    that can be edited (a bias is added where the layer has none)."""
    import numpy as np

    slot = 2
    if len(layer.input) <= slot or not layer.input[slot]:
        name = add_initializer(index, f"{layer.name or layer.op_type}_bias", np.zeros(channels, np.float32))
        while len(layer.input) <= slot:
            layer.input.append("")
        layer.input[slot] = name
        index.consumers.setdefault(name, []).append((layer, slot))
        return name, np.zeros(channels, np.float32)
    name = layer.input[slot]
    if name not in index.initializers:
        return None, f"{layer.name or layer.op_type}: bias is not a float initializer"
    value = artifact.tensor(index.initializers[name])
    if value.dtype != np.float32 or value.shape != (channels,):
        return None, f"{layer.name or layer.op_type}: bias is not float32 per output channel"
    if len(index.consumers.get(name, [])) > 1:  # shared: give this layer its own copy
        own = add_initializer(index, name, value.copy())
        layer.input[slot] = own
        return own, value
    return name, value


def _scalar(artifact: ModelArtifact, index: GraphIndex, node: Any, slot: int) -> float | None:
    if len(node.input) <= slot or not node.input[slot]:
        return None
    value = constant_array(artifact, index, node.input[slot])
    return None if value is None or value.size != 1 else float(value.reshape(-1)[0])


def _candidate(artifact: ModelArtifact, index: GraphIndex, quantizer: Any) -> dict[str, Any] | str:
    """The chain around one activation quantizer, or why it cannot be shifted."""
    tensor = quantizer.input[0]
    if len(index.consumers.get(tensor, [])) != 1 or tensor in index.outputs:
        return "read by more than its quantizer"
    pad = index.producer.get(tensor)
    if pad is not None and pad.op_type == "Pad":
        if attribute(pad, "mode", b"constant") not in (b"constant", "constant") or (_scalar(artifact, index, pad, 2)
                                                                                    or 0.0) != 0.0:
            return "Pad is not a zero constant pad"
        activation = index.producer.get(pad.input[0])
        if activation is None or not index.single_use(pad.input[0]):
            return "Pad input is read elsewhere"
    else:
        activation, pad = pad, None
    if activation is None or activation.op_type not in ("Relu", "Clip"):
        return "not the output of a Relu or Clip"
    if activation.op_type == "Clip":
        if attribute(activation, "min") is not None or attribute(activation, "max") is not None:
            return "Clip with attributes (opset < 11)"
        if _scalar(artifact, index, activation, 1) != 0.0:
            return "Clip does not start at 0"
    producer = index.producer.get(activation.input[0])
    if producer is None or producer.op_type not in _LINEAR or not index.single_use(activation.input[0]):
        return "the activation's input is not a Conv/Gemm read by it alone"
    if producer.op_type == "Gemm" and (attribute(producer, "beta", 1.0) != 1.0 or attribute(producer, "transA", 0)):
        return "producer Gemm with beta != 1 or transA"
    scale = constant_array(artifact, index, quantizer.input[1])
    zero = constant_array(artifact, index, quantizer.input[2]) if len(quantizer.input) > 2 and quantizer.input[2] \
        else None
    if scale is None or scale.size != 1 or (zero is not None and (zero.reshape(-1)[0] != 0 or zero.dtype.kind != "i")):
        return "quantizer is not per-tensor symmetric int8"
    dequantizers = index.readers(quantizer.output[0])
    if not dequantizers or any(d.op_type != "DequantizeLinear" or d.input[1] != quantizer.input[1] or
                               d.output[0] in index.outputs for d in dequantizers):
        return "quantizer not followed by DequantizeLinear nodes of the same scale"
    consumers = [(node, slot) for d in dequantizers for node, slot in index.consumers.get(d.output[0], [])]
    if not consumers or any(node.op_type not in _LINEAR or slot != 0 for node, slot in consumers):
        return "read by something other than the activation input of a Conv/Gemm"
    for node, _ in consumers:
        if node.op_type == "Gemm" and attribute(node, "beta", 1.0) != 1.0:
            return "consumer Gemm with beta != 1"
    return {"pad": pad, "activation": activation, "producer": producer, "scale": scale, "zero": zero,
            "dequantizers": dequantizers, "consumers": [node for node, _ in consumers]}


def recenter(artifact: ModelArtifact | str, tensors: Iterable[str] | None = None, verify: bool = True
             ) -> tuple[ModelArtifact, RecenterReport]:
    """Shift every ReLU/ReLU6 activation between two linear layers of a Q/DQ model onto [-amax/2, amax/2]
    (see the module docstring). tensors: only these quantized tensors (default: every one that qualifies).
    verify: prove the rewrite on a random input: with activation quantization taken away, the shifted model
    computes what the input model computes (report.max_abs_diff; an error if it does not).
    Returns (new artefact, report)."""
    import numpy as np

    from trtkit.errors import InputFileError

    source = as_artifact(artifact, "model")
    if not has_qdq(source.model):
        raise InputFileError(f"{source.source or 'model'}: has no Q/DQ nodes; recenter applies to a quantized model "
                             "(run trtkit quantize first)")
    result = source.copy()
    index = GraphIndex(result.model.graph)
    report = RecenterReport()
    opset = next((o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:  # Clip takes its bounds as inputs from opset 11 on
        report.skipped["*"] = f"opset {opset} < 11"
        return result, report
    replaced: set[str] = set()
    wanted = None if tensors is None else set(tensors)
    quantizers = [n for n in index.graph.node if n.op_type == "QuantizeLinear" and index.is_activation(n.input[0])
                  and (wanted is None or n.input[0] in wanted)]
    for quantizer in quantizers:
        tensor = quantizer.input[0]
        found = _candidate(result, index, quantizer)
        if isinstance(found, str):
            report.skipped[tensor] = found
            continue
        found_sums = [_weight_sums(result, index, layer) for layer in found["consumers"]]
        reason = next((s for s in found_sums if isinstance(s, str)), None)
        if reason is not None:
            report.skipped[tensor] = reason
            continue
        sums = [s for s in found_sums if not isinstance(s, str)]
        scale = float(found["scale"].reshape(-1)[0])
        shift = np.float32(127.0 * scale / 2.0)
        producer, activation = found["producer"], found["activation"]
        channels = _out_channels(result, index, producer)
        if channels is None:
            report.skipped[tensor] = f"{producer.name or producer.op_type}: output channels unknown"
            continue
        # Every check passed: edit. The producer's bias takes -shift, the consumers' +shift * sum(W).
        name, bias = _bias(result, index, producer, channels)
        targets = [_bias(result, index, layer, len(s)) for layer, s in zip(found["consumers"], sums, strict=True)]
        if name is None or any(t[0] is None for t in targets):
            report.skipped[tensor] = str(bias if name is None else next(t[1] for t in targets if t[0] is None))
            continue
        set_initializer(index, name, (bias.astype(np.float64) - float(shift)).astype(np.float32))
        for (target, value), s in zip(targets, sums, strict=True):
            set_initializer(index, str(target), (value.astype(np.float64) + float(shift) * s).astype(np.float32))
        upper = _scalar(result, index, activation, 2) if activation.op_type == "Clip" else None
        low = add_initializer(index, f"{tensor}_low", np.array(-shift, np.float32))
        bounds = [activation.input[0], low]
        if upper is not None:
            bounds.append(add_initializer(index, f"{tensor}_high", np.array(upper - shift, np.float32)))
        activation.op_type = "Clip"
        del activation.input[:]
        activation.input.extend(bounds)
        if found["pad"] is not None:
            pad = found["pad"]
            while len(pad.input) < 3:
                pad.input.append("")
            pad.input[2] = low
        new_scale = add_initializer(index, f"{tensor}_scale", np.array(scale / 2.0, np.float32))
        replaced.add(quantizer.input[1])
        for node in (quantizer, *found["dequantizers"]):
            node.input[1] = new_scale
        report.shifted.append({"tensor": tensor, "shift": round(float(shift), 6),
                               "consumers": [n.name or n.op_type for n in found["consumers"]]})
    used = {name for node in index.graph.node for name in node.input}
    unused = [t for t in index.graph.initializer if t.name in replaced and t.name not in used]
    for tensor_proto in unused:  # scales no quantizer reads any more
        index.graph.initializer.remove(tensor_proto)
    if verify and report.shifted:
        report.max_abs_diff = _float_difference(source, result)
    result.metadata.setdefault("ptq", {})["recenter"] = report.as_dict()
    return result, report


def activations_in_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a Q/DQ model with every activation QuantizeLinear -> DequantizeLinear pair bypassed: the
    float arithmetic around the int8 weights, in which a shift is exact."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    weights = {t.name for t in graph.initializer}
    quantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] not in weights}
    bypass = {n.output[0]: quantized[n.input[0]] for n in graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    for node in graph.node:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    for output in graph.output:
        output.name = bypass.get(output.name, output.name)
    return copy


def _float_difference(before: ModelArtifact, after: ModelArtifact) -> float:
    """Max |output difference| of the two models without activation quantization, on one random input in
    [0, 1]; raises if it exceeds float32 round-off (a wrong rewrite)."""
    import numpy as np

    from trtkit.runtime import random_inputs, session

    feeds = random_inputs(before.model, seed=0, low=0.0, high=1.0, dims={})
    worst = 0.0
    ran = [session(activations_in_float(m.model), emulate_qdq=True).run(None, feeds) for m in (before, after)]
    for old, new in zip(*ran, strict=True):
        scale = float(np.abs(old).max()) if old.size else 0.0
        difference = float(np.abs(old.astype(np.float64) - new).max()) if old.size else 0.0
        if difference > 1e-3 * max(scale, 1.0):
            raise RuntimeError(f"recenter changed the model's float arithmetic (max |difference| {difference:.3g} "
                               f"against outputs up to {scale:.3g}): a bug, please report it")
        worst = max(worst, difference)
    return worst


def _out_channels(artifact: ModelArtifact, index: GraphIndex, layer: Any) -> int | None:
    weight = _dequantized(artifact, index, layer.input[1])
    if weight is None:
        return None
    if layer.op_type == "Conv":
        return int(weight.shape[0])
    return int(weight.shape[0] if attribute(layer, "transB", 0) else weight.shape[1])
