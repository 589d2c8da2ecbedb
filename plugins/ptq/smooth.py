"""The `smooth` pass: the per-channel ranges of LayerNorm outputs moved into the weights of the MatMuls that read
them (SmoothQuant's migration, Xiao et al. 2023), and those of depthwise Conv inputs into the depthwise filters,
on the FP32 model before calibration. Exact in float.

A LayerNorm's output often has channels whose range is many times the others' (its learnt gamma): one
per-tensor int8 scale then leaves most channels a few levels. With s per channel, gamma / s and beta / s in the
LayerNorm and the rows of each reading MatMul's weight times s compute the same products, while the activation's
channels now share one range:

    s_c = max|x_c|^alpha / max|w_c|^(1 - alpha), normalised to a geometric mean of 1

(alpha = 1 evens the activation completely; the weights, quantized per output column, take the spread). A
residual Add that reads the same output (post-LN transformers: BERT, MiniLM) reads it through a Mul by s, so
it still sees the original values; TensorRT fuses such a per-channel constant Mul into the pointwise chain.
Measured on all-MiniLM-L6-v2 (real weights, 96 real calibration and 96 evaluation sentences, percentile scales,
nearest rounding): output SQNR 11.1 -> 16.7 dB at alpha = 1 (alpha 0.5: 10.4, 0.8: 14.7, 0.9: 15.9).

A LayerNorm is smoothed only when every reader of its output is a MatMul with a constant 2-D weight read by
nobody else, a residual Add, or a Shape; its gamma and beta must be constants read by it alone.

The input of a depthwise Conv (one input channel per group) is evened the same way, s_c = max|x_c|^alpha: the
Conv reads it through an inserted Mul by 1/s, and the filters of channel c are multiplied by s_c. Those weights
are quantized per output channel, so the weights lose nothing and the activation's channels share one range.
Other readers of the tensor keep the original. TensorRT fuses the per-channel Mul into the producer's pointwise
chain. A depthwise input that is a ReLU/ReLU6 output is left alone: recentring (plugins/ptq/recenter.py) halves
its step, and a Mul in between would stop that. MobileNet-style blocks need it: in the PP-OCRv4 text detector
(PP-LCNetV3) one depthwise input's channel maxima run from 1 to 38; evening its 14 depthwise inputs lifted its
map from 8.8 to 12.5 dB, pixel IoU 0.862 -> 0.926 (48 real calibration crops, 48 evaluation crops, percentile
scales, nearest rounding). Evening the inputs of ordinary Convs too made it worse (7.4 dB): their weights,
quantized per output channel, take the spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.errors import InputFileError, OptionError
from trtkit.graph import GraphIndex
from trtkit.model import as_artifact

from .common import add_initializer, attribute, constant_array, has_qdq, set_constant

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from trtkit.model import ModelArtifact

SMOOTH_READERS = ("MatMul", "Add", "Shape")  # readers a smoothed LayerNorm output may have
RECENTRED = ("Relu", "Clip")  # depthwise inputs left to recentring (plugins/ptq/recenter.py)


@dataclass
class _LayerNormSite:
    node: onnx.NodeProto
    gamma: np.ndarray
    beta: np.ndarray
    matmuls: list[tuple[onnx.NodeProto, np.ndarray]]  # reader, its weight [channels, outputs]
    adds: list[tuple[onnx.NodeProto, int]]


@dataclass
class _DepthwiseSite:
    tensor: str  # the activation read by the depthwise Convs, channel axis 1
    convs: list[tuple[onnx.NodeProto, np.ndarray]]  # reader, its weight [channels * multiplier, 1, ...]


@dataclass
class SmoothReport:
    layers: list[dict[str, Any]] = field(default_factory=list)  # kind, node, tensor, channels, spread, readers
    skipped: dict[str, str] = field(default_factory=dict)  # LayerNorm or depthwise Conv -> why not
    samples: int = 0
    alpha: float = 1.0
    sqnr_db: float | None = None  # outputs of the smoothed model against the input model (float check)

    @property
    def tensors(self) -> list[str]:
        """The activations whose values changed (LayerNorm outputs, the depthwise Convs' new inputs)."""
        return [layer["tensor"] for layer in self.layers]

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "samples": self.samples, "layers": self.layers,
                "skipped": dict(sorted(self.skipped.items())),
                "sqnr_db": None if self.sqnr_db is None else round(self.sqnr_db, 1)}


def _layernorm_sites(artifact: ModelArtifact, index: GraphIndex, report: SmoothReport) -> list[_LayerNormSite]:
    sites = []
    for node in artifact.model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        name, out = node.name or node.output[0], node.output[0]
        reasons = []
        if attribute(node, "axis", -1) != -1:
            reasons.append("normalizes another axis than the last")
        affine = [constant_array(artifact, index, t) if len(index.consumers.get(t, [])) == 1 else None
                  for t in node.input[1:3]]
        gamma, beta = (affine + [None, None])[:2]
        channels = None
        if gamma is None or beta is None:
            reasons.append("gamma/beta are not constants of its own")
        elif gamma.ndim != 1 or gamma.shape != beta.shape:
            reasons.append("gamma/beta are not vectors of one length")
        else:
            channels = gamma.shape[0]
        if out in index.outputs:
            reasons.append("its output is a graph output")
        matmuls, adds = [], []
        for reader, slot in index.consumers.get(out, []):
            if reader.op_type not in SMOOTH_READERS:
                reasons.append(f"read by {reader.op_type} '{reader.name}'")
            elif reader.op_type == "MatMul":
                weight = constant_array(artifact, index, reader.input[1])
                if (slot != 0 or weight is None or weight.ndim != 2 or weight.shape[0] != channels
                        or len(index.consumers[reader.input[1]]) != 1):
                    reasons.append(f"MatMul '{reader.name}' has no constant 2-D weight of its own, one row per "
                                   "channel")
                else:
                    matmuls.append((reader, weight))
            elif reader.op_type == "Add":
                adds.append((reader, slot))
        if not matmuls:
            reasons.append("no MatMul reads it")
        if reasons or gamma is None or beta is None:
            report.skipped[name] = reasons[0]
            continue
        sites.append(_LayerNormSite(node, gamma, beta, matmuls, adds))
    return sites


def _depthwise_sites(artifact: ModelArtifact, index: GraphIndex, report: SmoothReport) -> list[_DepthwiseSite]:
    """The activations read (as data input) by depthwise Convs with constant weights of their own."""
    found: dict[str, list[tuple[onnx.NodeProto, np.ndarray]]] = {}
    for node in artifact.model.graph.node:
        group = attribute(node, "group", 1)
        if node.op_type != "Conv" or group == 1 or not index.is_activation(node.input[0]):
            continue
        weight = constant_array(artifact, index, node.input[1])
        if weight is None or weight.ndim < 3 or weight.shape[1] != 1 or weight.shape[0] % group:
            continue  # not depthwise (or weights computed in the graph)
        if not index.single_use(node.input[1]):
            report.skipped[node.name or node.output[0]] = "its weight is shared with another node"
            continue
        producer = index.producer.get(node.input[0])
        if producer is not None and producer.op_type == "Pad":
            producer = index.producer.get(producer.input[0])
        if producer is not None and producer.op_type in RECENTRED:
            # A Mul in between would stop recentring, which is worth more there (EfficientNet-Lite1, whose
            # depthwise inputs all follow ReLU6: `quantize --data` 22.4 dB with recentring, 18.1 smoothed)
            report.skipped[node.name or node.output[0]] = (f"reads a {producer.op_type} output: recentring halves "
                                                           "its int8 step instead")
            continue
        found.setdefault(node.input[0], []).append((node, weight))
    return [_DepthwiseSite(tensor, convs) for tensor, convs in found.items()
            if len({attribute(conv, "group", 1) for conv, _ in convs}) == 1]


def _spread(x: np.ndarray) -> float:
    """The largest channel range over the median one (how uneven the channels were)."""
    import numpy as np

    return round(float(x.max() / max(np.median(x), np.finfo(np.float32).tiny)), 2)


def _channel_ranges(artifact: ModelArtifact, tensors: dict[str, int], data: Any, limit: int,
                    batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """max |x| per channel (tensor -> its channel axis) of each tensor over the data, and the samples read."""
    import numpy as np

    from trtkit.data import batch_len, load_data
    from trtkit.runtime import session

    names = list(tensors)
    sess = session(artifact, emulate_qdq=False, extra_outputs=names)
    ranges: dict[str, np.ndarray] = {}
    samples = 0
    for feeds in load_data(data, artifact.model, batch_size=batch_size, limit=limit).batches():
        samples += batch_len(feeds)
        for name, value in zip(names, sess.run(names, feeds), strict=True):
            axis = tensors[name]
            peak = np.abs(value).max(axis=tuple(a for a in range(value.ndim) if a != axis % value.ndim))
            peak = peak.astype(np.float64)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges, samples


def smooth(model: ModelArtifact | str | onnx.ModelProto, data: Any, alpha: float = 1.0, limit: int = 256,
           batch_size: int = 32, max_scale: float = 1e3, verify: bool = True) -> tuple[ModelArtifact, SmoothReport]:
    """Smooth every eligible LayerNorm output and depthwise Conv input of an FP32 model (see the module doc)
    with channel ranges measured on `data`. Returns (new artefact, report); the input is not modified.
    Calibrate the result afterwards."""
    import numpy as np
    from onnx import helper

    from trtkit.metrics import sqnr_db

    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"smooth: alpha must be in [0, 1], got {alpha}")
    source = as_artifact(model)
    if has_qdq(source.model):
        raise InputFileError(f"{source.source or 'model'}: already quantized (has Q/DQ nodes); smooth the FP32 model")
    report = SmoothReport(alpha=alpha)
    result = source.copy()
    index = GraphIndex(result.model.graph)
    sites = _layernorm_sites(result, index, report)
    smoothed = {s.node.output[0] for s in sites}
    depthwise = [s for s in _depthwise_sites(result, index, report) if s.tensor not in smoothed]
    if not sites and not depthwise:
        return result, report
    axes = {**{s.node.output[0]: -1 for s in sites}, **{s.tensor: 1 for s in depthwise}}
    ranges, report.samples = _channel_ranges(source, axes, data, limit, batch_size)
    after: dict[int, list[onnx.NodeProto]] = {}  # producer position (-1: graph input) -> Mul nodes to insert after it
    positions = {id(node): i for i, node in enumerate(result.model.graph.node)}
    tiny = np.finfo(np.float32).tiny

    def normalised(scale: np.ndarray) -> np.ndarray:
        return np.clip(scale / np.exp(np.mean(np.log(scale))), 1.0 / max_scale, max_scale)

    for site in sites:
        out = site.node.output[0]
        x = ranges[out]
        w = np.max([np.abs(weight).max(axis=1) for _, weight in site.matmuls], axis=0)
        scale = normalised(np.maximum(x, tiny) ** alpha / np.maximum(w, tiny) ** (1.0 - alpha))
        for name, value in zip(site.node.input[1:3], (site.gamma, site.beta), strict=True):
            set_constant(index, name, (value.astype(np.float64) / scale).astype(np.float32))
        for matmul, weight in site.matmuls:
            set_constant(index, matmul.input[1], (weight.astype(np.float64) * scale[:, None]).astype(np.float32))
        restored = None
        if site.adds:
            scale_name = add_initializer(index, f"{out}_smooth_scale", scale.astype(np.float32))
            restored = index.fresh_name(f"{out}_unsmoothed")
            after.setdefault(positions[id(site.node)], []).append(helper.make_node(
                "Mul", [out, scale_name], [restored], name=index.fresh_name(f"{site.node.name or out}_unsmooth")))
            for add, slot in site.adds:
                add.input[slot] = restored
        report.layers.append({"kind": "layernorm", "node": site.node.name, "tensor": out, "restored": restored,
                              "channels": int(x.size), "spread_before": _spread(x),
                              "readers": [m.name for m, _ in site.matmuls] + [a.name for a, _ in site.adds]})
    for dw in depthwise:
        x = ranges[dw.tensor]
        if x.size != attribute(dw.convs[0][0], "group", 1):
            report.skipped[dw.convs[0][0].name or dw.tensor] = f"its input has {x.size} channels on axis 1, not one per group"
            continue
        scale = normalised(np.maximum(x, tiny) ** alpha)  # per-output-channel weight scales absorb s exactly
        for conv, weight in dw.convs:
            shape = (x.size, -1) + (1,) * (weight.ndim - 1)
            scaled = weight.astype(np.float64).reshape(x.size, -1, *weight.shape[1:]) * scale.reshape(shape)
            set_constant(index, conv.input[1], scaled.reshape(weight.shape).astype(np.float32))
        inverse = (1.0 / scale).astype(np.float32).reshape((x.size,) + (1,) * (dw.convs[0][1].ndim - 2))
        scale_name = add_initializer(index, f"{dw.tensor}_smooth_inverse", inverse)
        evened = index.fresh_name(f"{dw.tensor}_smoothed")
        mul = helper.make_node("Mul", [dw.tensor, scale_name], [evened], name=index.fresh_name(f"{dw.tensor}_smooth"))
        producer = index.producer.get(dw.tensor)
        after.setdefault(-1 if producer is None else positions[id(producer)], []).append(mul)
        for conv, _ in dw.convs:
            conv.input[0] = evened
        report.layers.append({"kind": "depthwise", "node": mul.name, "tensor": evened, "restored": None,
                              "channels": int(x.size), "spread_before": _spread(x),
                              "readers": [conv.name for conv, _ in dw.convs]})
    if after:
        nodes = list(result.model.graph.node)
        ordered = after.get(-1, []) + [n for i, node in enumerate(nodes) for n in [node, *after.get(i, [])]]
        del result.model.graph.node[:]
        result.model.graph.node.extend(ordered)
    if verify:
        from trtkit.data import load_data
        from trtkit.runtime import session

        feeds = next(iter(load_data(data, source.model, batch_size=batch_size, limit=batch_size).batches()))
        before = session(source, emulate_qdq=False).run(None, feeds)
        now = session(result, emulate_qdq=False).run(None, feeds)
        report.sqnr_db = min(sqnr_db(a, b) for a, b in zip(before, now, strict=True))
    result.metadata.setdefault("ptq", {})["smooth"] = report.as_dict()
    return result, report
