"""The `adaptive-round` pass: choose each int8 weight of a Q/DQ model against its layer's output, not alone.

Rounding every weight to its nearest int8 level minimises the weight error, not the layer's output error:
on depthwise layers whose BN-folded filters nearly cancel (EfficientNet-Lite, MobileNet), nearest rounding
of a few weights decides the output. For each quantized Conv/Gemm/MatMul this pass minimises

    || X (W_q - W)^T ||^2,   X = the layer's input in the Q/DQ model (quantized upstream) on calibration data

over the int8 codes of W_q, with the layer's per-channel scales unchanged, in the closed form of Frantar et
al. (GPTQ/OBQ, 2022): columns are rounded one at a time and each rounding error is spread over the columns
not yet rounded, weighted by the inverse of H = X^T X. It optimises the same objective as AdaRound (Nagel et
al., 2020) without its thousands of gradient steps per layer. A column of ones joins X where the layer has a
bias slot, so the float bias takes up the mean output shift last (bias correction in the same solve).

Layers are solved in `blocks` groups in graph order; each group sees inputs produced by the groups already
rounded, so errors upstream are compensated downstream. Memory per layer is H (K x K per conv group), whatever
the number of samples: rows are `positions` sampled output positions per sample (fixed seeds: deterministic).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.errors import DataError, InputFileError, OptionError, first_line
from trtkit.graph import GraphIndex
from trtkit.model import as_artifact

from .common import add_initializer, attribute, constant_array, has_qdq, initializer_array, set_initializer

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from trtkit.engine import Execution
    from trtkit.model import ModelArtifact

QMAX = 127  # TensorRT int8 weights: [-127, 127]


@dataclass
class RoundedLayer:
    node: str
    weight: str
    rows: int
    columns: int
    error_nearest_db: float  # output SQNR of the layer's weight rounding alone, nearest rounding (on X)
    error_adaptive_db: float  # the same after adaptive rounding (bias update included)


@dataclass
class RoundReport:
    layers: list[RoundedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "layers": [{"node": x.node, "weight": x.weight, "rows": x.rows, "columns": x.columns,
                        "nearest_db": round(x.error_nearest_db, 3), "adaptive_db": round(x.error_adaptive_db, 3)}
                       for x in self.layers],
            "skipped": dict(sorted(self.skipped.items())),
        }


@dataclass
class _Layer:
    node: onnx.NodeProto
    codes: str             # int8 weight initializer read by the weight's DequantizeLinear
    scale: np.ndarray      # per-row weight scales, [groups, rows]
    weight: np.ndarray     # the FP32 reference weight as rows, [groups, rows, columns]
    bias: str | None       # float bias initializer (Conv/Gemm input 2), if any
    has_bias_slot: bool    # Conv/Gemm with a per-row (or no) bias: solved with it; MatMul: none
    kernel: tuple[int, ...]  # Conv kernel (spatial dims of the weight)


def _weight_rows(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray | None:
    """The weight as [groups, rows, columns] with one row per output channel (None: layout not handled)."""
    if node.op_type == "Conv":
        group = attribute(node, "group", 1)
        return weight.reshape(group, weight.shape[0] // group, -1)
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return weight[None]
    return weight.T[None]  # MatMul / Gemm(transB=0): [K, N] -> N rows of K


def _codes_layout(node: onnx.NodeProto, codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attribute(node, "transB", 0)):
        return codes.reshape(shape)
    return codes[0].T


def _find_layers(qdq: ModelArtifact, ref: ModelArtifact, report: RoundReport) -> list[_Layer]:
    import numpy as np

    index = GraphIndex(qdq.model.graph)
    ref_index = GraphIndex(ref.model.graph)
    layers = []
    for node in qdq.model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        label = node.name or node.output[0]
        dq = index.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in index.initializers:
            continue
        ref_node = ref_index.producer.get(node.output[0])
        weight = None if ref_node is None else constant_array(ref, ref_index, ref_node.input[1])
        if weight is None:
            report.skipped[label] = "no FP32 weight for this layer in the reference"
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0):
            report.skipped[label] = "Gemm with transA or alpha != 1"
            continue
        if node.op_type == "Conv" and weight.ndim != 4:
            report.skipped[label] = "not a 2-D convolution"
            continue
        rows = _weight_rows(node, weight.astype(np.float64))
        scale = initializer_array(qdq, index, dq.input[1]) if dq.input[1] in index.initializers else None
        codes = initializer_array(qdq, index, dq.input[0])
        zero = dq.input[2] if len(dq.input) > 2 and dq.input[2] else ""
        if rows is None or scale is None or codes.dtype != np.int8 or codes.shape != weight.shape or (
                zero and np.any(initializer_array(qdq, index, zero))):
            report.skipped[label] = "weight not a symmetric int8 initializer of the reference's shape"
            continue
        groups, count, _ = rows.shape
        scale = np.broadcast_to(scale.astype(np.float64).reshape(-1), (groups * count,)).reshape(groups, count)
        bias = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 else ""
        if bias and bias not in index.initializers:
            report.skipped[label] = "bias is not an initializer"
            continue
        per_row = not bias or initializer_array(qdq, index, bias).size == groups * count
        layers.append(_Layer(node, dq.input[0], scale, rows, bias or None, node.op_type != "MatMul" and per_row,
                             tuple(weight.shape[2:])))
    return layers


def _rows(node: onnx.NodeProto, kernel: tuple[int, ...], groups: int, x: np.ndarray, positions: int,
          seed: int) -> np.ndarray:
    """A layer's input as regression rows [groups, samples*positions, columns] (im2col for Conv), at
    `positions` output positions per sample drawn with `seed`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if node.op_type != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        count = min(positions * x.shape[0], flat.shape[0])
        pick = np.sort(rng.choice(flat.shape[0], size=count, replace=False)) if count < flat.shape[0] else slice(None)
        return flat[pick][None]
    kh, kw = kernel
    sh, sw = attribute(node, "strides", [1, 1])
    dh, dw = attribute(node, "dilations", [1, 1])
    top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
    batch, channels, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    count = min(positions, out_h * out_w)
    pick = np.sort(rng.choice(out_h * out_w, size=count, replace=False)) if count < out_h * out_w \
        else np.arange(out_h * out_w)
    ys = (pick // out_w)[:, None, None] * sh + (np.arange(kh) * dh)[None, :, None]
    xs = (pick % out_w)[:, None, None] * sw + (np.arange(kw) * dw)[None, None, :]
    patches = padded[:, :, ys, xs].transpose(0, 2, 1, 3, 4)  # [batch, positions, channels, kh, kw]
    return patches.reshape(batch * count, groups, -1).transpose(1, 0, 2)


_GramParts = tuple["np.ndarray", "np.ndarray | None", int]


def _gram(rows: np.ndarray, bias_column: bool) -> np.ndarray:
    """X^T X of rows [G, P, K] in float64, with a column of ones appended to X when `bias_column`."""
    return _assemble(_gram_parts(rows, bias_column))


def _gram_parts(rows: np.ndarray, bias_column: bool) -> _GramParts:
    """What X^T X of one batch is made of: X^T X in float32, X^T 1 in float64 (when `bias_column`), the row
    count. A worker returns these (float32: half the bytes) and the driver assembles them as here."""
    import numpy as np

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    # Both operands contiguous: numpy's matmul then calls BLAS (a transposed view takes its slow loop). Float32
    # products over one batch, summed in float64 across batches.
    gram = np.ascontiguousarray(np.swapaxes(rows, 1, 2)) @ rows
    sums = rows.sum(axis=1, dtype=np.float64) if bias_column else None  # X^T 1
    return gram, sums, rows.shape[1]


def _assemble(parts: _GramParts) -> np.ndarray:
    import numpy as np

    gram32, sums, count = parts
    gram = gram32.astype(np.float64)
    if sums is None:
        return gram
    groups, columns = sums.shape
    full = np.empty((groups, columns + 1, columns + 1))
    full[:, :columns, :columns] = gram
    full[:, :columns, columns] = sums
    full[:, columns, :columns] = sums
    full[:, columns, columns] = count
    return full


def round_columns(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, float_tail: int = 0,
                  damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Round weight [G, R, K] to int8 codes against hessian [G, K, K] (= X^T X) with per-row scale [G, R].

    Returns (codes [G, R, K - float_tail] int8, the last float_tail columns after error feedback [G, R, tail]).
    """
    import numpy as np

    w = weight.astype(np.float64, copy=True)
    h = hessian.astype(np.float64, copy=True)
    diagonal = np.arange(h.shape[1])
    dead = h[:, diagonal, diagonal] <= 0  # inputs never non-zero: any code is as good; keep the damping sane
    h[:, diagonal, diagonal] += damp * h[:, diagonal, diagonal].mean(axis=1, keepdims=True) + dead
    inverse = np.linalg.inv(h)
    inverse = (inverse + np.swapaxes(inverse, 1, 2)) / 2
    upper = np.swapaxes(np.linalg.cholesky(inverse), 1, 2)  # H^-1 = U^T U
    columns = w.shape[2] - float_tail
    codes = np.empty(w.shape[:2] + (columns,), dtype=np.int8)
    for j in range(columns):
        code = np.clip(np.rint(w[:, :, j] / scale), -QMAX, QMAX)
        codes[:, :, j] = code
        error = (w[:, :, j] - code * scale) / upper[:, j, j][:, None]
        w[:, :, j + 1:] -= error[:, :, None] * upper[:, None, j, j + 1:]
    return codes, w[:, :, columns:]


def _output_sqnr(h: np.ndarray, target: np.ndarray, approx: np.ndarray) -> float:
    """SQNR (dB) of X approx^T against X target^T, from H = X^T X alone."""
    import numpy as np

    diff = approx - target
    signal = float(np.sum((target @ h) * target))
    noise = float(np.sum((diff @ h) * diff))
    return 10 * np.log10(max(signal, 1e-30) / max(noise, 1e-30))


def adaptive_round(
    artifact: ModelArtifact | str,
    reference: ModelArtifact | str,
    data: Any,
    limit: int | None = 64,
    batch_size: int = 8,
    positions: int = 256,
    blocks: int = 4,
    damp: float = 0.01,
    execution: Execution | None = None,
) -> tuple[ModelArtifact, RoundReport]:
    """Adaptive rounding of every int8 weight of a Q/DQ model. Returns (new artefact, report).

    reference: the FP32 model the Q/DQ model was made from (trtkit's QDQ builder keeps tensor names; its
      float weights are what the codes approximate). data: anything `trtkit calibrate` reads.
    limit: samples used; positions: output positions sampled per sample and layer; blocks: layer groups
      solved in sequence (more: upstream errors better compensated, one model run over the data each);
    damp: H's diagonal damping, relative to its mean (numerical safety when inputs are nearly dependent).
    execution: accumulate the Gram matrices on an engine's workers (`trtkit.engine.Execution`): each worker
      runs a contiguous range of the batches and returns each batch's X^T X (float32, as computed here),
      and they are summed here in batch order: the result is the in-process one, byte for byte. The
      rounding samples (`limit`, 64 by default) travel with the model, once per block, in the engine's
      object store. A model with external data (over 2 GB) is rounded in this process.
    """
    import numpy as np

    from trtkit.data import batch_len, load_data
    from trtkit.engine import split
    from trtkit.ui import track

    for name, value, low in (("limit", limit or 1, 1), ("batch_size", batch_size, 1),
                             ("positions", positions, 1), ("blocks", blocks, 1)):
        if value < low:
            raise OptionError(f"adaptive-round option '{name}' must be >= {low}, got {value}")
    if not 0 <= damp < 1:
        raise OptionError(f"adaptive-round option 'damp' must be in [0, 1), got {damp}")
    if not reference:
        raise OptionError("adaptive-round needs option 'reference' (the FP32 model the Q/DQ model came from)")
    if data is None or (isinstance(data, str) and not data):
        raise OptionError("adaptive-round needs option 'data' (calibration data)")
    qdq = as_artifact(artifact, "adaptive-round model")
    ref = as_artifact(reference, "adaptive-round option 'reference'")
    label = str(qdq.source or "model")
    if not has_qdq(qdq.model):
        raise InputFileError(f"{label}: has no Q/DQ nodes; adaptive rounding applies to a quantized model")
    batches = list(load_data(data, ref.model, batch_size=batch_size, limit=limit).batches())
    report = RoundReport(samples=sum(batch_len(b) for b in batches))

    result = qdq.copy()
    index = GraphIndex(result.model.graph)
    layers = _find_layers(result, ref, report)
    parts = [part for part in np.array_split(np.arange(len(layers)), blocks) if len(part)]
    on_workers = execution is not None and not execution.in_process and not result.has_external_data()
    for block in track(parts, description="adaptive rounding"):
        todo = [layers[i] for i in block]
        specs = tuple(_LayerSpec(layer.node.output[0], layer.kernel, layer.weight.shape[0], layer.has_bias_slot)
                      for layer in todo)
        if on_workers:
            assert execution is not None
            shards = [_GramJob(specs, start, stop, positions, label)
                      for start, stop in split(len(batches), execution.slots())]
            # the driver holds every batch's parts of the block at once: a few of them (`limit` samples)
            per_batch: Iterable[list[_GramParts]] = [
                grams for shard in execution.map(_shard_grams, (result.model.SerializeToString(), batches), shards)
                for grams in shard]
        else:
            per_batch = _batch_grams(result, batches, _GramJob(specs, 0, len(batches), positions, label))
        grams: list[Any] = [0.0] * len(todo)
        for batch in per_batch:  # batch order, as one pass sums them: the same float64 sums, bit for bit
            for k, gram_parts in enumerate(batch):
                grams[k] = grams[k] + _assemble(gram_parts)
        for layer, gram in zip(todo, grams, strict=True):
            _round_layer(result, index, layer, gram, damp, report)
    return result, report


@dataclass(frozen=True)
class _LayerSpec:
    """A layer as the Gram accumulation needs it (small: it travels to workers with each shard)."""

    output: str               # the node's first output (names it in the model)
    kernel: tuple[int, ...]
    groups: int
    bias_column: bool


@dataclass(frozen=True)
class _GramJob:
    """Batches [start, stop) of the rounding data (numbered as in one pass: the position sampling's seeds)."""

    layers: tuple[_LayerSpec, ...]
    start: int
    stop: int
    positions: int
    label: str


def _batch_grams(model: ModelArtifact, batches: list[dict[str, np.ndarray]], job: _GramJob,
                 threads: int | None = None) -> Iterator[list[_GramParts]]:
    """For each batch of job's range, in order: each layer's Gram parts of its input in `model` (one batch's
    at a time: in-process, each is added to the sums before the next batch runs)."""
    from trtkit.runtime import session

    nodes = {node.output[0]: node for node in model.model.graph.node}
    picked = [(nodes[spec.output], spec) for spec in job.layers]
    inputs = sorted({node.input[0] for node, _ in picked})
    sess = session(model, threads=threads, extra_outputs=inputs)
    for number in range(job.start, job.stop):
        try:
            values = dict(zip(inputs, sess.run(inputs, batches[number]), strict=True))
        except Exception as exc:
            raise DataError(f"{job.label}: onnxruntime failed on the data: {first_line(exc)}") from None
        yield [_gram_parts(_rows(node, spec.kernel, spec.groups, values[node.input[0]], job.positions, number),
                           spec.bias_column) for node, spec in picked]


def _shard_grams(shared: tuple[bytes, list[dict[str, np.ndarray]]], job: _GramJob) -> list[list[_GramParts]]:
    """On a worker: the Gram parts of the batches [job.start, job.stop) (one onnxruntime thread: the engine
    gives each call one CPU). `shared`: the model as rounded so far and the rounding batches."""
    import onnx

    from trtkit.model import ModelArtifact

    model_bytes, batches = shared
    return list(_batch_grams(ModelArtifact.from_model(onnx.load_from_string(model_bytes)), batches, job, threads=1))


def _round_layer(result: ModelArtifact, index: GraphIndex, layer: _Layer, gram: np.ndarray, damp: float,
                 report: RoundReport) -> None:
    import numpy as np

    groups, count, _ = layer.weight.shape
    target = layer.weight
    if layer.has_bias_slot:
        bias = (initializer_array(result, index, layer.bias).astype(np.float64) if layer.bias
                else np.zeros(groups * count))
        target = np.concatenate([target, bias.reshape(groups, count, 1)], axis=2)
    codes, tail = round_columns(target, gram, layer.scale, float_tail=int(layer.has_bias_slot), damp=damp)
    nearest = np.clip(np.rint(layer.weight / layer.scale[:, :, None]), -QMAX, QMAX) * layer.scale[:, :, None]
    adaptive = codes * layer.scale[:, :, None]
    if layer.has_bias_slot:
        nearest = np.concatenate([nearest, target[:, :, -1:]], axis=2)
        adaptive = np.concatenate([adaptive, tail], axis=2)
    before, after = _output_sqnr(gram, target, nearest), _output_sqnr(gram, target, adaptive)
    name = layer.node.name or layer.node.output[0]
    if after <= before:  # the solve did not help this layer (rare): keep nearest rounding
        report.skipped[name] = f"adaptive rounding not better ({after:.1f} dB vs {before:.1f} dB nearest)"
        return
    shape = tuple(index.initializers[layer.codes].dims)
    set_initializer(index, layer.codes, _codes_layout(layer.node, codes, shape).astype(np.int8))
    if layer.has_bias_slot:
        new_bias = tail.reshape(-1).astype(np.float32)
        if layer.bias and len(index.consumers.get(layer.bias, [])) == 1:
            set_initializer(index, layer.bias, new_bias)
        else:  # no bias yet, or one shared with another layer: this layer gets its own
            bias_name = add_initializer(index, f"{name}_bias", new_bias)
            if len(layer.node.input) > 2:
                layer.node.input[2] = bias_name
            else:
                layer.node.input.append(bias_name)
    report.layers.append(RoundedLayer(name, layer.codes, groups * count, layer.weight.shape[2], before, after))
