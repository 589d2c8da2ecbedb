"""Where the QDQ builder puts QuantizeLinear/DequantizeLinear: the placement TensorRT's explicit quantization
fuses best. `plan_qdq` decides without changing the graph; `activation_candidates` lists what calibration must
observe (the builder's `scale_tensors`); trtkit.plugins.qdq.insert rewrites the graph.

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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trtkit.graph import GraphIndex

if TYPE_CHECKING:
    import onnx

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
MAX_POOL_OPS = ("MaxPool", "GlobalMaxPool")


# ---- analysis ----------------------------------------------------------------------------------------------

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
    g = GraphIndex(model.graph)
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


def _weight_axis(node: onnx.NodeProto, slot: int, shape: tuple[int, ...], per_channel: bool) -> int | None:
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
    g = GraphIndex(model.graph)
    nodes = list(g.graph.node)
    position = {id(node): index for index, node in enumerate(nodes)}  # node protos are not hashable
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
            plan.weights[(index, slot)] = _weight_axis(node, slot, shapes[node.input[slot]], per_channel)
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
            return (producer is not None and position[id(producer)] in compute_done and g.single_use(name)
                    and position[id(g.consumers[name][0][0])] == add_index)

        fa, fb = fusable(a), fusable(b)
        if not (fa or fb):
            continue
        # both from convs: fuse with the later one, quantize the earlier
        skip_slot = (0 if position[id(g.producer[a])] < position[id(g.producer[b])] else 1) if fa and fb else (1 if fa else 0)
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
