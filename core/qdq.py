"""The QDQ builder: insert QuantizeLinear/DequantizeLinear the way TensorRT's explicit quantization fuses best.

    artifact = trtkit.quantize("model.onnx", "scales.json", output="model.int8.onnx")

Placement (TensorRT Q/DQ placement guide, ModelOpt heuristics, onnx-tensorrt parser constraints):
- Conv / ConvTranspose / Gemm / MatMul: activation inputs get a per-tensor Q->DQ pair; weights are stored as
  int8 initializers (symmetric, per output channel: Conv axis 0, ConvTranspose axis 1, Gemm/MatMul the output
  axis) followed by a DequantizeLinear. Zero points are 0. Bias stays float (int32 bias DQ fails the parser).
- BN and activations after a Conv are left alone (TensorRT fuses them); SiLU (Conv-Sigmoid-Mul) carries Q/DQ
  only at the head of the next quantized op.
- Residual Add: only the skip branch is quantized (the branch from the Conv that TensorRT fuses the Add into
  stays float).
- Concat: when its output is quantized (and is not a graph output), every input gets Q/DQ with one shared
  scale, so TensorRT needs no requantization; not when the inputs' ranges differ by more than
  `concat_max_ratio` (a detector head mixing boxes 0..640 and scores 0..1).
- Max/average pooling: quantized only next to a quantized neighbour; max pooling shares its input's scale.
- Graph outputs are never quantized. `exclude` node names and `exclude_op_types` stay float.
- Weights stored as Constant nodes are folded into initializers first, so they get per-channel scales.

Each tensor gets one Q/DQ pair shared by all its quantized consumers; the input model is never modified.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import OptionError, UnknownNameError, unknown_name

if TYPE_CHECKING:
    import onnx

    from .model import ModelArtifact
    from .scales import Scales

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
MAX_POOL_OPS = ("MaxPool", "GlobalMaxPool")
MIN_OPSET = 13  # per-axis DequantizeLinear


# ---- analysis ----------------------------------------------------------------------------------------------

@dataclass
class _Graph:
    model: onnx.ModelProto
    initializers: set[str]
    producer: dict[str, int]
    consumers: dict[str, list[tuple[int, int]]]
    outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        graph = model.graph
        producer: dict[str, int] = {}
        consumers: dict[str, list[tuple[int, int]]] = {}
        for index, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    producer[out] = index
            for slot, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((index, slot))
        constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        return cls(model, {t.name for t in graph.initializer} | constants, producer, consumers,
                   {o.name for o in graph.output})

    def is_activation(self, name: str) -> bool:
        return bool(name) and name not in self.initializers


def _compute_inputs(node: onnx.NodeProto) -> list[int]:
    """Input slots of a compute op that carry data to quantize (not bias)."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return [0, 1][: len(node.input)]
    return [0, 1][: len(node.input)]  # Gemm (C is bias), MatMul


def activation_candidates(model: onnx.ModelProto) -> list[str]:
    """Activations the QDQ builder will quantize (what calibration must observe), in graph order.

    The placement is planned with every candidate given the same range, so this is a superset of what any real
    scales quantize (only the Concat range-ratio rule can drop more). Tensors TensorRT keeps in float, such as
    the Conv branch of a residual Add, are not observed: exposing them would also break onnxruntime's fusions.
    """
    g = _Graph.of(model)
    broad: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        names = list(node.input)
        if node.op_type == "Concat" or node.op_type in POOL_OPS:
            names.append(node.output[0])
        if node.op_type in COMPUTE_OPS or node.op_type in ("Add", "Concat") or node.op_type in POOL_OPS:
            for name in names:
                if g.is_activation(name) and name not in seen:
                    seen.add(name)
                    broad.append(name)
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    shapes.update({o: () for n in model.graph.node if n.op_type == "Constant" for o in n.output})
    planned = plan_qdq(model, dict.fromkeys(broad, 1.0), shapes=shapes).activations
    return [name for name in broad if name in planned]


@dataclass
class Plan:
    """Where Q/DQ go: activation tensor -> amax, (node, slot) edges to rewire, weights to quantize."""

    activations: dict[str, float] = field(default_factory=dict)
    edges: dict[tuple[int, int], str] = field(default_factory=dict)      # (node, slot) -> tensor
    weights: dict[tuple[int, int], int | None] = field(default_factory=dict)  # (node, slot) -> axis (None: per-tensor)
    quantized_nodes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)               # node name -> reason


class _Groups:
    """Union-find over tensors that must share one scale."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _weight_axis(g: _Graph, node: onnx.NodeProto, slot: int, shape: tuple[int, ...], per_channel: bool) -> int | None:
    if not per_channel or len(shape) < 2:
        return None
    if node.op_type == "Conv":
        return 0 if slot == 1 else None
    if node.op_type == "ConvTranspose":  # weights [Cin, Cout/group, ...]: per-axis only without groups
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return 1 if slot == 1 and group == 1 else None
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        if slot == 1:
            return 0 if attrs.get("transB", 0) else 1
        return None
    if node.op_type == "MatMul":
        return 1 if slot == 1 and len(shape) == 2 else None
    return None


def plan_qdq(
    model: onnx.ModelProto,
    scales: Mapping[str, float],
    exclude: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    per_channel: bool = True,
    concat_max_ratio: float = 32.0,
    quantize_bmm: bool = False,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Plan:
    """Decide placement (no graph changes). `shapes`: initializer name -> shape."""
    g = _Graph.of(model)
    nodes = model.graph.node
    exclude = set(exclude)
    exclude_types = set(exclude_op_types)
    shapes = dict(shapes or {})
    plan = Plan()
    quantized: dict[str, set[tuple[int, int]]] = {}   # tensor -> quantized consumer edges
    groups = _Groups()

    def name_of(index: int) -> str:
        return nodes[index].name or f"{nodes[index].op_type}_{index}"

    def allowed(index: int) -> bool:
        node = nodes[index]
        if name_of(index) in exclude:
            plan.skipped[name_of(index)] = "excluded by name"
            return False
        if node.op_type in exclude_types:
            plan.skipped[name_of(index)] = f"op type {node.op_type} excluded"
            return False
        return True

    def mark(index: int, slot: int) -> None:
        tensor = nodes[index].input[slot]
        quantized.setdefault(tensor, set()).add((index, slot))

    compute_done: set[int] = set()
    for index, node in enumerate(nodes):
        if node.op_type not in COMPUTE_OPS or not allowed(index):
            continue
        slots = _compute_inputs(node)
        activations = [s for s in slots if g.is_activation(node.input[s])]
        weights = [s for s in slots if not g.is_activation(node.input[s]) and node.input[s] in shapes]
        if node.op_type == "MatMul" and len(activations) == 2 and not quantize_bmm:
            plan.skipped[name_of(index)] = "activation x activation MatMul (attention path) left float"
            continue
        if not activations and not weights:
            continue
        missing = [node.input[s] for s in activations if node.input[s] not in scales]
        if missing:
            plan.skipped[name_of(index)] = f"no scale for input '{missing[0]}'"
            continue
        if len(activations) + len(weights) < len(slots):
            plan.skipped[name_of(index)] = "weight is not a constant initializer"
            continue
        for slot in activations:
            mark(index, slot)
        for slot in weights:
            plan.weights[(index, slot)] = _weight_axis(g, node, slot, shapes[node.input[slot]], per_channel)
        compute_done.add(index)
        plan.quantized_nodes.append(name_of(index))

    # Residual Add: quantize the skip branch only (the other branch comes from the Conv TensorRT fuses it into).
    for index, node in enumerate(nodes):
        if node.op_type != "Add" or len(node.input) != 2 or not allowed(index):
            continue
        a, b = node.input
        if not (g.is_activation(a) and g.is_activation(b)):
            continue

        def fusable(name: str, add_index: int = index) -> bool:
            producer = g.producer.get(name)
            return (producer is not None and producer in compute_done and name not in g.outputs
                    and len(g.consumers.get(name, [])) == 1 and g.consumers[name][0][0] == add_index)

        fa, fb = fusable(a), fusable(b)
        if not (fa or fb):
            continue
        # both from convs: fuse with the later one, quantize the earlier
        skip_slot = (0 if g.producer[a] < g.producer[b] else 1) if fa and fb else (1 if fa else 0)
        skip = node.input[skip_slot]
        if skip not in scales:
            plan.skipped[name_of(index)] = f"no scale for residual input '{skip}'"
            continue
        mark(index, skip_slot)
        plan.quantized_nodes.append(name_of(index))

    # Concat and pooling: only next to quantized neighbours; propagate until nothing changes.
    for _ in range(4):
        changed = False
        for index, node in enumerate(nodes):
            op = node.op_type
            if op != "Concat" and op not in POOL_OPS:
                continue
            if name_of(index) in exclude or op in exclude_types:
                plan.skipped.setdefault(name_of(index), "excluded")
                continue
            out = node.output[0]
            if op == "Concat":
                if out not in quantized or out in g.outputs:
                    continue
                inputs = [(s, n) for s, n in enumerate(node.input) if g.is_activation(n)]
                if any(n not in scales for _, n in inputs) or out not in scales:
                    plan.skipped[name_of(index)] = "no scale for an input"
                    continue
                ranges = [scales[n] for _, n in inputs]
                if ranges and max(ranges) > concat_max_ratio * min(ranges):
                    plan.skipped[name_of(index)] = (
                        f"input ranges differ {max(ranges) / min(ranges):.0f}x (> {concat_max_ratio:g}): no shared scale"
                    )
                    continue
                for slot, name in inputs:
                    if (index, slot) not in quantized.get(name, set()):
                        mark(index, slot)
                        changed = True
                    groups.union(name, out)
            else:
                source = node.input[0]
                if not g.is_activation(source) or out in g.outputs:
                    continue
                if out not in quantized and source not in quantized:
                    continue
                if source not in scales:
                    continue
                if (index, 0) not in quantized.get(source, set()):
                    mark(index, 0)
                    changed = True
                if op in MAX_POOL_OPS and out in quantized:
                    groups.union(source, out)
            if name_of(index) not in plan.quantized_nodes:
                plan.quantized_nodes.append(name_of(index))
        if not changed:
            break

    # One amax per shared-scale group: the largest member (nothing is clipped that was not before).
    group_amax: dict[str, float] = {}
    for tensor in quantized:
        root = groups.find(tensor)
        group_amax[root] = max(group_amax.get(root, 0.0), float(scales[tensor]))
    for tensor, edges in quantized.items():
        plan.activations[tensor] = group_amax[groups.find(tensor)]
        for edge in edges:
            plan.edges[edge] = tensor
    return plan


# ---- rewriting ---------------------------------------------------------------------------------------------

def fold_constants(model: onnx.ModelProto) -> int:
    """Turn `Constant` nodes (value tensors) into initializers, in place. Returns how many were folded."""
    from onnx import numpy_helper

    kept = []
    folded = 0
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            folded += 1
        else:
            kept.append(node)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return folded


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


class _Names:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.used = ({v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
                     | {o for n in graph.node for o in n.output} | {n.name for n in graph.node})

    def new(self, base: str) -> str:
        base = re.sub(r"\s+", "_", base)
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _load_artifact(model: Any) -> ModelArtifact:
    from .model import ModelArtifact

    if isinstance(model, ModelArtifact):
        return model
    if isinstance(model, (str, os.PathLike)):
        return ModelArtifact.load(model)
    return ModelArtifact.from_model(model)


def quantize(
    model: Any,
    scales: Scales | Mapping[str, float] | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    exclude: Iterable[str] = (),
    exclude_op_types: Iterable[str] = (),
    per_channel: bool = True,
    reduce_range: bool = False,
    concat_max_ratio: float = 32.0,
    quantize_bmm: bool = False,
    strict_names: bool = True,
) -> ModelArtifact:
    """Insert Q/DQ into a copy of `model` using `scales` (tensor -> amax); save to `output` if given.

    reduce_range: 7-bit weights ([-63, 63]) for onnxruntime's int8 kernels on CPUs without VNNI; TensorRT
    wants the default full range ([-127, 127]).
    strict_names: unknown `exclude` node names / op types and scales naming tensors the model lacks are errors
    (with close matches); False ignores them (e.g. scales of a larger model).
    """
    import onnx
    from onnx import helper, numpy_helper

    from .scales import as_scales

    source = _load_artifact(model)
    scale_map = as_scales(scales)
    artifact = source.copy()
    m = artifact.model
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node):
        raise OptionError(f"{source.source or 'model'}: already has Q/DQ nodes; quantize the FP32 model")
    node_names = {n.name for n in m.graph.node if n.name}
    exclude = list(exclude)
    exclude_op_types = list(exclude_op_types)
    if strict_names:
        for name in exclude:
            if name not in node_names:
                raise unknown_name("node", name, node_names)
        op_types = {n.op_type for n in m.graph.node}
        for op in exclude_op_types:
            if op not in op_types and op not in COMPUTE_OPS + POOL_OPS + ("Add", "Concat"):
                raise unknown_name("op type", op, op_types | set(COMPUTE_OPS + POOL_OPS + ("Add", "Concat")))
    if _opset(m) < MIN_OPSET:
        from onnx import version_converter

        try:
            m = version_converter.convert_version(m, MIN_OPSET)
        except Exception as exc:
            raise OptionError(f"model opset {_opset(artifact.model)} < {MIN_OPSET} and conversion failed: {exc}") from None
        artifact.model = m
    folded = fold_constants(m)
    from .scales import model_fingerprint, tensor_names

    known = tensor_names(m)
    if len(scale_map) and not any(name in known for name in scale_map):
        example = next(iter(scale_map))
        raise OptionError(f"none of the {len(scale_map)} tensors in the scales exist in this model "
                          f"(e.g. '{example}'): were they calibrated on another model?")
    if strict_names:
        where = str(scales) if isinstance(scales, (str, os.PathLike)) else "scales"
        for name in scale_map:
            if name not in known:
                raise UnknownNameError(f"{where}: {unknown_name('tensor', name, known)}")
    calibrated_on = getattr(scale_map, "model", {}).get("sha256")
    fingerprint_match = None if not calibrated_on else calibrated_on == model_fingerprint(source.model)
    if fingerprint_match is False:
        from .ui import console

        console.print("[yellow]warning:[/yellow] the scales were calibrated on a different model graph "
                      "(fingerprint differs); tensors are matched by name")

    init_by_name = {t.name: t for t in m.graph.initializer}
    shapes = {name: tuple(int(d) for d in t.dims) for name, t in init_by_name.items()
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    plan = plan_qdq(m, scale_map, exclude, exclude_op_types, per_channel, concat_max_ratio, quantize_bmm, shapes)

    names = _Names(m)
    qmax = 63 if reduce_range else 127
    new_inits: list[onnx.TensorProto] = []
    act_out: dict[str, str] = {}
    act_nodes: dict[str, list[onnx.NodeProto]] = {}
    for tensor, amax in plan.activations.items():
        base = re.sub(r"[^A-Za-z0-9_.:/-]", "_", tensor)
        scale_name, zp_name = names.new(f"{base}_scale"), names.new(f"{base}_zero_point")
        q_out, dq_out = names.new(f"{base}_quantized"), names.new(f"{base}_dequantized")
        new_inits.append(numpy_helper.from_array(np.array(amax / 127.0, dtype=np.float32), scale_name))
        new_inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp_name))
        act_nodes[tensor] = [
            helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_out], name=names.new(f"{base}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out], name=names.new(f"{base}_DequantizeLinear")),
        ]
        act_out[tensor] = dq_out

    weight_out: dict[tuple[str, int | None], str] = {}
    weight_nodes: dict[tuple[str, int | None], onnx.NodeProto] = {}
    weight_info: dict[str, Any] = {}
    for (index, slot), axis in sorted(plan.weights.items()):
        wname = m.graph.node[index].input[slot]
        key = (wname, axis)
        if key in weight_out:
            continue
        w = artifact.tensor(init_by_name[wname]).astype(np.float32)
        if axis is None:
            w_amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
            w_amax = np.where(w_amax > 0, w_amax, 1.0).astype(np.float32)
            scale = (w_amax / qmax).astype(np.float32)
            q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
        else:
            reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
            w_amax = np.abs(w).max(axis=reduce_axes).astype(np.float32)
            w_amax = np.where(w_amax > 0, w_amax, 1.0).astype(np.float32)
            scale = (w_amax / qmax).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
        base = re.sub(r"[^A-Za-z0-9_.:/-]", "_", wname)
        q_name, s_name = names.new(f"{base}_quantized"), names.new(f"{base}_scale")
        z_name, out = names.new(f"{base}_zero_point"), names.new(f"{base}_dequantized")
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name),
                      numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), z_name)]
        node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                name=names.new(f"{base}_DequantizeLinear"))
        if axis is not None:
            node.attribute.append(helper.make_attribute("axis", axis))
        weight_nodes[key] = node
        weight_out[key] = out
        weight_info[wname] = {"axis": axis, "channels": int(scale.size)}

    # Rebuild the node list: Q/DQ right before the first consumer that needs them (keeps topological order).
    emitted: set[Any] = set()
    rebuilt: list[onnx.NodeProto] = []
    for index, node in enumerate(m.graph.node):
        new_node = onnx.NodeProto()
        new_node.CopyFrom(node)
        for slot, name in enumerate(node.input):
            if (index, slot) in plan.edges:
                tensor = plan.edges[(index, slot)]
                if ("a", tensor) not in emitted:
                    rebuilt.extend(act_nodes[tensor])
                    emitted.add(("a", tensor))
                new_node.input[slot] = act_out[tensor]
            elif (index, slot) in plan.weights:
                key = (name, plan.weights[(index, slot)])
                if ("w", key) not in emitted:
                    rebuilt.append(weight_nodes[key])
                    emitted.add(("w", key))
                new_node.input[slot] = weight_out[key]
        rebuilt.append(new_node)
    del m.graph.node[:]
    m.graph.node.extend(rebuilt)

    # Drop float weights nothing reads any more; add the new initializers.
    still_used = {name for node in m.graph.node for name in node.input} | {o.name for o in m.graph.output}
    kept = [t for t in m.graph.initializer if t.name in still_used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept + new_inits)
    graph_inputs = [v for v in m.graph.input if v.name in still_used or v.name not in init_by_name]
    del m.graph.input[:]
    m.graph.input.extend(graph_inputs)

    artifact.metadata = dict(artifact.metadata)
    artifact.metadata["quantization"] = {
        "format": "qdq-int8",
        "method": getattr(scale_map, "method", "custom"),
        "calibration": {"model": getattr(scale_map, "model", {}), "data": getattr(scale_map, "data", {}),
                        "model_matches": fingerprint_match},
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "weight_qmax": qmax,
        "activation_amax": {k: plan.activations[k] for k in sorted(plan.activations)},
        "weights": {k: weight_info[k] for k in sorted(weight_info)},
        "quantized_nodes": plan.quantized_nodes,
        "skipped": dict(sorted(plan.skipped.items())),
        "exclude": sorted(exclude),
        "exclude_op_types": sorted(exclude_op_types),
        "constants_folded": folded,
    }
    if output is not None:
        from .fileio import check_output_path

        check_output_path(output, source.source)
        artifact.save(output)
    return artifact
