"""The `simplify` pass: shape inference, constant folding (onnxruntime-evaluated, shape subgraphs included),
no-op removal, static Reshape shapes, common-subexpression elimination and dead-node removal, repeated
until nothing changes; optionally fixes dynamic input shapes first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from trtkit.errors import OptionError, unknown_name
from trtkit.graph import (
    bypass,
    constant_value,
    editable,
    fold_and_clean,
    fresh_name,
    infer_shapes,
    is_graph_output,
    new_constant,
    redirect_consumers,
    rewrite,
    static_shape,
)

from .common import same_dtype

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


_NOOP_UNARY = {"Identity", "Dropout"}
_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Slice", "Tile", "Resize", "Pad"}
_IMPURE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _volume(shape: Any) -> float:
    """Element count of a static shape (inf when unknown)."""
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return math.inf
    return math.prod(shape)


def fix_input_shapes(model: Any, shapes: dict[str, Any]) -> Any:
    """Set static input shapes (name -> list of ints) and drop stale inferred shapes so inference redoes them."""
    inputs = {value.name: value for value in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise unknown_name("input", name, inputs)
        if isinstance(dims, str):
            dims = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        value = inputs[name]
        current = value.type.tensor_type.shape.dim
        if len(current) and len(current) != len(dims):
            raise OptionError(f"input_shapes: input '{name}' has rank {len(current)}, got shape {list(dims)}")
        for index, dim in enumerate(current):
            # dim_value -1 (Paddle2ONNX writes it for a dynamic batch) is dynamic, not a size
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != int(dims[index]):
                raise OptionError(
                    f"input_shapes: input '{name}' has static shape {[d.dim_value for d in current]}, "
                    f"cannot set {list(dims)}"
                )
        value.type.tensor_type.shape.ClearField("dim")
        for d in dims:
            value.type.tensor_type.shape.dim.add().dim_value = int(d)
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    return model


def _eliminate_noops(graph: Any) -> int:
    """Remove nodes that provably do nothing (Identity, inference Dropout, same-type Cast, identity Transpose,
    shape ops whose output shape equals the input's, x*1, x/1, x+0, x-0, single-input Concat, zero Pad)."""
    import numpy as np

    removed = 0
    for node in list(graph.nodes):
        if not node.inputs or not node.outputs or len(node.outputs) < 1:
            continue
        used_outputs = [out for out in node.outputs if out.outputs or is_graph_output(out, graph)]
        if len(used_outputs) != 1 or used_outputs[0] is not node.outputs[0]:
            continue
        x, y = node.inputs[0], node.outputs[0]
        op = node.op
        noop = False
        if op in _NOOP_UNARY:
            noop = op == "Identity" or (len(node.inputs) < 3 or constant_value(node.inputs[2]) is not None
                                        and not bool(np.asarray(constant_value(node.inputs[2])).any()))
        elif op == "Cast":
            noop = x.dtype is not None and y.dtype is not None and same_dtype(x.dtype, y.dtype)
        elif op == "Transpose":
            perm = node.attrs.get("perm")
            noop = perm is not None and list(perm) == list(range(len(perm)))
        elif op in _SHAPE_OPS:
            xs, ys = static_shape(x), static_shape(y)
            noop = xs is not None and xs == ys and (op != "Pad" or _zero_pad(graph, node))
            if op == "Resize":
                noop = False  # a same-size Resize can still resample (e.g. align_corners); leave it
        elif op == "Concat":
            noop = len(node.inputs) == 1
        elif op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
            neutral = 1.0 if op in ("Mul", "Div") else 0.0
            value = constant_value(node.inputs[1])
            other = node.inputs[0]
            if value is None and op in ("Mul", "Add"):
                value, other = constant_value(node.inputs[0]), node.inputs[1]
            if value is not None and np.asarray(value).dtype.kind in "fiu" and bool(np.all(np.asarray(value) == neutral)):
                xs, ys = static_shape(other), static_shape(y)
                dtypes_match = other.dtype is None or y.dtype is None or same_dtype(other.dtype, y.dtype)
                # a neutral scalar cannot broadcast the other operand to a new shape: no shapes needed
                if dtypes_match and ((xs is not None and xs == ys) or np.asarray(value).ndim == 0):
                    noop, x = True, other
        if noop and bypass(node, graph, keep=x):
            removed += 1
    return removed


def _shape_pieces(tensor: Any, graph: Any) -> list[Any] | None:
    """The 1-D int64 tensor `tensor` as a list of entries: ints (constants) or (source tensor, axis) pairs for
    values read from Shape(source); None when some entry is neither."""
    import numpy as np

    value = constant_value(tensor)
    if value is not None:
        value = np.asarray(value)
        return [int(v) for v in value.reshape(-1)] if value.ndim <= 1 else None
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "Shape":
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if rank is None:
            return None
        start = int(node.attrs.get("start", 0))
        end = int(node.attrs.get("end", rank))
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        return [(node.inputs[0], axis) for axis in range(max(start, 0), min(end, rank))]
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        pieces: list[Any] = []
        for inp in node.inputs:
            part = _shape_pieces(inp, graph)
            if part is None:
                return None
            pieces.extend(part)
        return pieces
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _shape_pieces(node.inputs[0], graph)
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        source = _shape_pieces(node.inputs[0], graph)
        index = constant_value(node.inputs[1])
        if source is None or index is None:
            return None
        indices = [int(i) for i in np.asarray(index).reshape(-1)]
        if any(not -len(source) <= i < len(source) for i in indices):
            return None
        return [source[i] for i in indices]
    if node.op == "Slice" and len(node.inputs) >= 3:
        source = _shape_pieces(node.inputs[0], graph)
        bounds = [constant_value(t) for t in node.inputs[1:]]
        if source is None or any(b is None for b in bounds):
            return None
        starts, ends = (int(np.asarray(b).reshape(-1)[0]) for b in bounds[:2])
        axes = int(np.asarray(bounds[2]).reshape(-1)[0]) if len(bounds) > 2 else 0
        steps = int(np.asarray(bounds[3]).reshape(-1)[0]) if len(bounds) > 3 else 1
        if axes not in (0, -1) or steps != 1:
            return None
        return source[slice(max(min(starts, len(source)), -len(source)), max(min(ends, len(source)), -len(source)))]
    return None


def _static_reshape_shapes(graph: Any) -> int:
    """Reshape(x, Concat(Shape(x)[i], consts)) -> Reshape(x, [0, consts]): the shape subgraph goes away.

    A value read from Shape(s)[k] becomes 0 ("copy") at position i when it is provably x's dim i (s is x and
    k == i, or both dims carry the same symbolic name); one remaining unknown becomes -1, which is exact
    because the other dims are then all fixed.
    """
    import numpy as np

    changed = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) != 2 or int(node.attrs.get("allowzero", 0)):
            continue
        if constant_value(node.inputs[1]) is not None:
            continue
        pieces = _shape_pieces(node.inputs[1], graph)
        data = node.inputs[0]
        if not pieces:
            continue
        data_shape = list(data.shape) if data.shape is not None else []
        resolved: list[int | None] = []
        for position, piece in enumerate(pieces):
            if isinstance(piece, int):
                resolved.append(piece)
                continue
            source, axis = piece
            source_shape = list(source.shape) if source.shape is not None else []
            src_dim = source_shape[axis] if axis < len(source_shape) else None
            if isinstance(src_dim, int) and src_dim >= 0:
                resolved.append(src_dim)
            elif position < len(data_shape) and (
                (source is data and axis == position)
                or (isinstance(src_dim, str) and src_dim and data_shape[position] == src_dim)
            ):
                resolved.append(0)
            else:
                resolved.append(None)
        unknown = [i for i, v in enumerate(resolved) if v is None]
        if len(unknown) > 1 or (unknown and -1 in resolved):
            continue
        if unknown:
            resolved[unknown[0]] = -1
        node.inputs[1] = new_constant(fresh_name(graph, (node.name or "reshape") + "_shape"),
                                    np.asarray(resolved, np.int64))
        changed += 1
    return changed



def _zero_pad(graph: Any, node: Any) -> bool:
    import numpy as np

    pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
    return pads is not None and not np.asarray(pads).any()


def _dedupe(graph: Any) -> int:
    """Merge identical nodes (same op, same inputs, same attributes): common subexpression elimination."""
    import numpy as np
    import onnx_graphsurgeon as gs

    def attr_key(value: Any) -> Any:
        if isinstance(value, (gs.Graph, gs.Function)):
            return None  # nodes carrying subgraphs are never merged
        if isinstance(value, gs.Constant):
            return ("const", value.values.dtype.str, value.values.shape, value.values.tobytes())
        if isinstance(value, np.ndarray):
            return ("array", value.dtype.str, value.shape, value.tobytes())
        if isinstance(value, (list, tuple)):
            return tuple(attr_key(v) for v in value)
        return repr(value)

    # identical small constants first, so nodes consuming equal values compare equal
    canonical: dict[Any, Any] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            # the size from the shape first: big (lazy, external) weights are never read for this
            if isinstance(tensor, gs.Constant) and _volume(tensor.shape) <= 4096:
                values = tensor.values
                key = (values.dtype.str, values.shape, values.tobytes())
                canonical.setdefault(key, tensor)
                node.inputs[i] = canonical[key]
    merged = 0
    graph.toposort()
    seen: dict[Any, Any] = {}
    for node in list(graph.nodes):
        if node.op in _IMPURE or node.domain not in (None, "", "ai.onnx") or not node.outputs:
            continue
        attrs = tuple(sorted((k, attr_key(v)) for k, v in node.attrs.items()))
        if any(v is None for _, v in attrs):
            continue
        node_key = (node.op, tuple(id(t) for t in node.inputs), attrs, len(node.outputs))
        if node_key not in seen:
            seen[node_key] = node
            continue
        keep = seen[node_key]
        if any(is_graph_output(out, graph) for out in node.outputs):
            continue
        for mine, theirs in zip(node.outputs, keep.outputs, strict=True):
            redirect_consumers(mine, theirs)
        node.inputs.clear()
        node.outputs.clear()
        merged += 1
    return merged


def simplify(artifact: ModelArtifact, fold: bool = True, input_shapes: dict[str, Any] | None = None,
             remove_noops: bool = True, dedupe: bool = True, infer: bool = True) -> ModelArtifact:
    """Shape inference, constant folding, no-op elimination, CSE, dead-node removal; optional static shapes."""
    model = editable(artifact)
    if input_shapes:
        model = fix_input_shapes(model, input_shapes)
    if infer:
        model = infer_shapes(model)

    def edit(graph: Any) -> None:
        for _ in range(4):  # each round can expose more: folding -> no-ops -> equal nodes -> folding
            before = len(graph.nodes)
            fold_and_clean(graph, fold=fold)
            changed = 0
            if remove_noops:
                changed += _eliminate_noops(graph)
                changed += _static_reshape_shapes(graph)
            if dedupe:
                changed += _dedupe(graph)
            fold_and_clean(graph, fold=False)
            if not changed and len(graph.nodes) == before:
                break

    result = rewrite(artifact, edit, fold=False, model=model)
    del model
    if infer:
        result.model = infer_shapes(result.model)
    if input_shapes:
        result.metadata["input_shapes"] = {name: [int(d) for d in dims] for name, dims in input_shapes.items()
                                           if not isinstance(dims, str)}
    return result
