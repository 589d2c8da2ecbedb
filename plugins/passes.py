"""Built-in graph passes: simplify, optimize, fuse-preprocess, remove-sigmoid (plus their fine-grained parts).

Every pass takes a ModelArtifact and returns a new one (the input is never modified). Passes work on the main
graph through onnx-graphsurgeon, rewrite only patterns they fully understand (constant operands, known
shapes, single consumers) and leave everything else alone, so models with control flow (If/Loop/Scan) or
recurrent ops (LSTM/GRU) keep running. Constant folding is onnxruntime-evaluated (graphsurgeon
`fold_constants`), shape-aware, and refolded after every rewrite.

Heavy imports (numpy, onnx, onnx_graphsurgeon, onnxruntime) happen inside functions: this module is loaded at
CLI start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trtkit import hookimpl
from trtkit.errors import DataError, NumericalCheckError, OptionError
from trtkit.stages import GraphPass, Option

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


# ---- plumbing ----------------------------------------------------------------------------------------------
def _rewrite(artifact: ModelArtifact, rewrite: Callable[[Any], Any], fold: bool = True,
             model: Any = None) -> ModelArtifact:
    """Run `rewrite(graph)` on a graphsurgeon copy of the model (or of `model`, an editable copy of it made by
    the caller), refold, and wrap the result as a new artefact."""
    from trtkit.graph import editable, fold_and_clean, from_gs, to_gs
    from trtkit.model import ModelArtifact

    if model is None:
        model = editable(artifact)  # big external weights stay on disk unless the rewrite reads them
    graph = to_gs(model, artifact.base_dir)
    rewrite(graph)
    fold_and_clean(graph, fold=fold)
    new_model = from_gs(graph, model, move_big=True)
    return ModelArtifact(new_model, artifact.base_dir, dict(artifact.metadata), artifact.source)


def _const(graph: Any, tensor: Any) -> Any:
    from trtkit.graph import constant_value

    return constant_value(tensor)


def _new_const(name: str, array: Any) -> Any:
    import numpy as np
    import onnx_graphsurgeon as gs

    return gs.Constant(name, np.ascontiguousarray(array))


def _unique(graph: Any, base: str) -> str:
    names = set(graph.tensors().keys()) | {node.name for node in graph.nodes}
    name, index = base, 0
    while name in names:
        index += 1
        name = f"{base}_{index}"
    return name


def _static_shape(tensor: Any) -> tuple[int, ...] | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return tuple(shape)


def _volume(shape: Any) -> float:
    """Element count of a static shape (inf when unknown)."""
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return math.inf
    return math.prod(shape)


def _is_output(tensor: Any, graph: Any) -> bool:
    return any(out is tensor for out in graph.outputs)


def _sole_consumer(tensor: Any, graph: Any) -> Any:
    if len(tensor.outputs) != 1 or _is_output(tensor, graph):
        return None
    return tensor.outputs[0]


def _channel_permutation(node: Any, tensor: Any, graph: Any, channels: int | None) -> Any:
    """The channel order `node` gives `tensor` ([N, C, H, W]) when it only permutes channels: a Gather on
    axis 1 with constant indices, or a Slice on axis 1 with constant bounds (x[:, ::-1]) that keeps every
    channel; else None. new[:, i] = old[:, order[i]]."""
    import numpy as np

    if channels is None or not node.inputs or node.inputs[0] is not tensor:
        return None
    if node.op == "Gather" and len(node.inputs) == 2 and int(node.attrs.get("axis", 0)) in (1, -3):
        indices = _const(graph, node.inputs[1])
        if indices is None or np.asarray(indices).ndim != 1 or np.asarray(indices).dtype.kind not in "iu":
            return None
        order = np.asarray(indices, np.int64) % channels
    elif node.op == "Slice" and 3 <= len(node.inputs) <= 5:
        bounds = [_const(graph, t) for t in node.inputs[1:]]
        if any(value is None for value in bounds):
            return None
        starts, ends, *rest = (np.asarray(value, np.int64).reshape(-1) for value in bounds)
        axes = rest[0] if rest else np.arange(len(starts))
        steps = rest[1] if len(rest) > 1 else np.ones(len(starts), np.int64)
        if len(starts) != 1 or int(axes[0]) not in (1, -3):
            return None
        end = int(ends[0])
        order = np.arange(channels)[slice(int(starts[0]), end, int(steps[0]))]  # ONNX clamps like Python
    else:
        return None
    if sorted(order.tolist()) != list(range(channels)):
        return None
    return order


def _channel_vector(value: Any, channels: int, ndim: int, axis: int = 1) -> Any:
    """A constant broadcast over a [N, C, ...] tensor as a per-channel vector of length C, or None if it is not."""
    import numpy as np

    value = np.asarray(value)
    if value.ndim > ndim:
        return None
    shape = (1,) * (ndim - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    if shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


# ---- simplify ----------------------------------------------------------------------------------------------
_NOOP_UNARY = {"Identity", "Dropout"}
_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Slice", "Tile", "Resize", "Pad"}
_IMPURE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fix_input_shapes(model: Any, shapes: dict[str, Any]) -> Any:
    """Set static input shapes (name -> list of ints) and drop stale inferred shapes so inference redoes them."""
    from trtkit.errors import unknown_name

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
            if dim.HasField("dim_value") and dim.dim_value != int(dims[index]):
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

    from trtkit.graph import bypass

    removed = 0
    for node in list(graph.nodes):
        if not node.inputs or not node.outputs or len(node.outputs) < 1:
            continue
        used_outputs = [out for out in node.outputs if out.outputs or _is_output(out, graph)]
        if len(used_outputs) != 1 or used_outputs[0] is not node.outputs[0]:
            continue
        x, y = node.inputs[0], node.outputs[0]
        op = node.op
        noop = False
        if op in _NOOP_UNARY:
            noop = op == "Identity" or (len(node.inputs) < 3 or _const(graph, node.inputs[2]) is not None
                                        and not bool(np.asarray(_const(graph, node.inputs[2])).any()))
        elif op == "Cast":
            noop = x.dtype is not None and y.dtype is not None and _same_dtype(x.dtype, y.dtype)
        elif op == "Transpose":
            perm = node.attrs.get("perm")
            noop = perm is not None and list(perm) == list(range(len(perm)))
        elif op in _SHAPE_OPS:
            xs, ys = _static_shape(x), _static_shape(y)
            noop = xs is not None and xs == ys and (op != "Pad" or _zero_pad(graph, node))
            if op == "Resize":
                noop = False  # a same-size Resize can still resample (e.g. align_corners); leave it
        elif op == "Concat":
            noop = len(node.inputs) == 1
        elif op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
            neutral = 1.0 if op in ("Mul", "Div") else 0.0
            value = _const(graph, node.inputs[1])
            other = node.inputs[0]
            if value is None and op in ("Mul", "Add"):
                value, other = _const(graph, node.inputs[0]), node.inputs[1]
            if value is not None and np.asarray(value).dtype.kind in "fiu" and bool(np.all(np.asarray(value) == neutral)):
                xs, ys = _static_shape(other), _static_shape(y)
                same_dtype = other.dtype is None or y.dtype is None or _same_dtype(other.dtype, y.dtype)
                if xs is not None and xs == ys and same_dtype:
                    noop, x = True, other
        if noop and bypass(node, graph, keep=x):
            removed += 1
    return removed


def _shape_pieces(tensor: Any, graph: Any) -> list[Any] | None:
    """The 1-D int64 tensor `tensor` as a list of entries: ints (constants) or (source tensor, axis) pairs for
    values read from Shape(source); None when some entry is neither."""
    import numpy as np

    value = _const(graph, tensor)
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
        index = _const(graph, node.inputs[1])
        if source is None or index is None:
            return None
        indices = [int(i) for i in np.asarray(index).reshape(-1)]
        if any(not -len(source) <= i < len(source) for i in indices):
            return None
        return [source[i] for i in indices]
    if node.op == "Slice" and len(node.inputs) >= 3:
        source = _shape_pieces(node.inputs[0], graph)
        bounds = [_const(graph, t) for t in node.inputs[1:]]
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
        if _const(graph, node.inputs[1]) is not None:
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
        node.inputs[1] = _new_const(_unique(graph, (node.name or "reshape") + "_shape"),
                                    np.asarray(resolved, np.int64))
        changed += 1
    return changed


def _same_dtype(a: Any, b: Any) -> bool:
    """dtype equality that also copes with graphsurgeon's non-numpy dtypes (bfloat16, float8: onnx enums)."""
    import numpy as np

    try:
        return bool(np.dtype(a) == np.dtype(b))
    except TypeError:
        return bool(a == b)


def _is_float(dtype: Any) -> bool:
    import numpy as np

    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:
        return False


def _zero_pad(graph: Any, node: Any) -> bool:
    import numpy as np

    pads = _const(graph, node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("pads")
    return pads is not None and not np.asarray(pads).any()


def _dedupe(graph: Any) -> int:
    """Merge identical nodes (same op, same inputs, same attributes): common subexpression elimination."""
    import numpy as np
    import onnx_graphsurgeon as gs

    from trtkit.graph import redirect_consumers

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
        if any(_is_output(out, graph) for out in node.outputs):
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
    from trtkit.graph import editable, fold_and_clean, from_gs, infer_shapes, to_gs
    from trtkit.model import ModelArtifact

    model = editable(artifact)
    if input_shapes:
        model = fix_input_shapes(model, input_shapes)
    if infer:
        model = infer_shapes(model)
    graph = to_gs(model, artifact.base_dir)
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
    new_model = from_gs(graph, model, move_big=True)
    if infer:
        new_model = infer_shapes(new_model)
    metadata = dict(artifact.metadata)
    if input_shapes:
        metadata["input_shapes"] = {name: [int(d) for d in dims] for name, dims in input_shapes.items()
                                    if not isinstance(dims, str)}
    return ModelArtifact(new_model, artifact.base_dir, metadata, artifact.source)


# ---- optimize ----------------------------------------------------------------------------------------------

def _set_weight_and_bias(graph: Any, layer: Any, weight: Any, bias: Any, tag: str) -> None:
    """Give a Conv/ConvTranspose/Gemm new weight and bias constants (fresh names: others may share the old)."""
    layer.inputs[1] = _new_const(_unique(graph, f"{layer.inputs[1].name}_{tag}"), weight)
    bias_const = _new_const(_unique(graph, f"{layer.name or 'layer'}_bias_{tag}"), bias)
    if len(layer.inputs) > 2:
        layer.inputs[2] = bias_const
    else:
        layer.inputs.append(bias_const)

def _fold_batchnorm(graph: Any) -> int:
    """Conv/ConvTranspose/Gemm followed by BatchNormalization (inference) -> one layer with scaled weights."""
    import numpy as np

    from trtkit.graph import bypass

    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.inputs) != 5 or bn.attrs.get("training_mode", 0):
            continue
        if any(out.outputs or _is_output(out, graph) for out in bn.outputs[1:]):
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1:
            continue
        layer = x.inputs[0]
        if layer.op not in ("Conv", "ConvTranspose", "Gemm") or _sole_consumer(x, graph) is not bn:
            continue
        params = [_const(graph, t) for t in bn.inputs[1:]]
        weight = _const(graph, layer.inputs[1]) if len(layer.inputs) > 1 else None
        bias = _const(graph, layer.inputs[2]) if len(layer.inputs) > 2 else np.zeros(1)
        if any(p is None for p in params) or weight is None or bias is None or weight.dtype.kind != "f":
            continue
        gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        channels = scale.size
        w = weight.astype(np.float64)
        if layer.op == "Conv":
            if w.shape[0] != channels:
                continue
            w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        elif layer.op == "ConvTranspose":
            if int(layer.attrs.get("group", 1)) != 1 or w.shape[1] != channels:
                continue
            w = w * scale.reshape(1, -1, *([1] * (w.ndim - 2)))
        else:  # Gemm: y = alpha * A' B' + beta * C, out [N, M]
            if x.shape is None or len(x.shape) != 2 or int(layer.attrs.get("transA", 0)):
                continue
            trans_b = int(layer.attrs.get("transB", 0))
            if w.shape[0 if trans_b else 1] != channels:
                continue
            w = w * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
            gemm_beta = float(layer.attrs.get("beta", 1.0))
            if len(layer.inputs) > 2 and np.asarray(bias).size not in (1, channels):
                continue
            bias = np.asarray(bias, np.float64) * gemm_beta
            layer.attrs["beta"] = 1.0
        b = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (channels,))
        new_bias = (b - mean) * scale + beta
        _set_weight_and_bias(graph, layer, w.astype(weight.dtype), new_bias.astype(weight.dtype), "bnfold")
        if bypass(bn, graph, keep=x):
            folded += 1
    return folded


def _fold_affine_into_conv(graph: Any) -> int:
    """Conv followed by Mul/Div/Add/Sub with a per-output-channel constant -> folded into weights and bias."""
    import numpy as np

    from trtkit.graph import bypass

    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2 or not node.outputs:
                continue
            first, second = node.inputs
            x, value = first, _const(graph, second)
            if value is None and node.op in ("Mul", "Add"):
                x, value = second, _const(graph, first)
            if value is None or len(x.inputs) != 1 or x.inputs[0].op != "Conv":
                continue
            conv = x.inputs[0]
            if _sole_consumer(x, graph) is not node or len(conv.inputs) < 2:
                continue
            weight = _const(graph, conv.inputs[1])
            bias = _const(graph, conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0] if
                                                                                         weight is not None else 1)
            if weight is None or bias is None or weight.dtype.kind != "f" or np.asarray(value).dtype.kind != "f":
                continue
            out_shape, x_shape = _static_shape(node.outputs[0]), _static_shape(x)
            if x.shape is None or (out_shape is not None and x_shape is not None and out_shape != x_shape):
                continue
            ndim = len(x.shape)
            if np.asarray(value).ndim > ndim:
                continue
            vector = _channel_vector(value, weight.shape[0], ndim)
            if vector is None:
                continue
            w = weight.astype(np.float64)
            b = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (weight.shape[0],)).copy()
            if node.op == "Mul":
                w, b = w * vector.reshape(-1, *([1] * (w.ndim - 1))), b * vector
            elif node.op == "Div":
                if not np.all(vector != 0):
                    continue
                w, b = w / vector.reshape(-1, *([1] * (w.ndim - 1))), b / vector
            elif node.op == "Add":
                b = b + vector
            else:  # Sub: only conv - c
                if x is not first:
                    continue
                b = b - vector
            _set_weight_and_bias(graph, conv, w.astype(weight.dtype), b.astype(weight.dtype), "affine")
            if bypass(node, graph, keep=x):
                folded += 1
                changed = True
    return folded


def _merge_transposes(graph: Any) -> int:
    """Transpose -> Transpose becomes one Transpose (or nothing when the composed permutation is the identity)."""
    from trtkit.graph import bypass

    merged = 0
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs or "perm" not in node.attrs:
            continue
        x = node.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Transpose" or "perm" not in x.inputs[0].attrs:
            continue
        first = x.inputs[0]
        p1, p2 = list(first.attrs["perm"]), list(node.attrs["perm"])
        if len(p1) != len(p2):
            continue
        composed = [p1[i] for i in p2]
        node.inputs[0] = first.inputs[0]
        node.attrs["perm"] = composed
        merged += 1
        if composed == list(range(len(composed))):
            bypass(node, graph)
    return merged


def _merge_reshapes(graph: Any) -> int:
    """Reshape/Flatten/Squeeze/Unsqueeze -> Reshape with a constant shape: the first one is skipped (exact:
    a Reshape only depends on the element order, which the shape ops keep)."""
    import numpy as np

    merged = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) != 2 or int(node.attrs.get("allowzero", 0)):
            continue
        shape = _const(graph, node.inputs[1])
        if shape is None or bool((np.asarray(shape) == 0).any()):
            continue
        x = node.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            continue
        node.inputs[0] = x.inputs[0].inputs[0]
        merged += 1
    return merged


def optimize(artifact: ModelArtifact, fold_bn: bool = True, fold_affine: bool = True,
             merge_transposes: bool = True, merge_reshapes: bool = True) -> ModelArtifact:
    """Fold BatchNorm and per-channel Mul/Add into the preceding layer, merge transposes/reshapes, refold."""
    from trtkit.graph import editable, infer_shapes

    counts: dict[str, int] = {}

    def rewrite(graph: Any) -> None:
        for _ in range(3):
            total = 0
            if fold_bn:
                counts["batchnorm"] = counts.get("batchnorm", 0) + (n := _fold_batchnorm(graph))
                total += n
            if fold_affine:
                counts["affine"] = counts.get("affine", 0) + (n := _fold_affine_into_conv(graph))
                total += n
            if merge_transposes:
                counts["transpose"] = counts.get("transpose", 0) + (n := _merge_transposes(graph))
                total += n
            if merge_reshapes:
                counts["reshape"] = counts.get("reshape", 0) + (n := _merge_reshapes(graph))
                total += n
            graph.cleanup()
            if not total:
                break

    model = editable(artifact)
    if any(not v.type.tensor_type.HasField("shape") for v in model.graph.value_info) or not len(
            model.graph.value_info):
        model = infer_shapes(model)
    result = _rewrite(artifact, rewrite, model=model)
    del model
    result.model = infer_shapes(result.model)
    return result


# ---- fuse-preprocess ---------------------------------------------------------------------------------------
def _floats(value: Any, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise OptionError(f"fuse-preprocess option '{name}' must be numbers, got {value!r}") from None


def fuse_preprocess(artifact: ModelArtifact, input: str | None = None, scale: Any = None, mean: Any = None,
                    std: Any = None, swap_rb: bool = False, raw_range: Any = None, verify: bool = True,
                    seed: int = 0, input_dtype: str = "float32") -> ModelArtifact:
    """Fold input scaling, mean/std normalisation and an RGB<->BGR swap into the first Conv(s).

    Folds what the model itself does first (Mul/Div/Add/Sub by per-channel constants on the input) and what
    the user declares the device would otherwise do: model_input = (raw[perm] * scale - mean) / std.
    The new model takes the raw input. Exactness: the bias absorbs the mean only for Convs without padding;
    a padded Conv gets an explicit Pad of the raw value that maps to 0 (exact) when that value is the same
    for every channel, otherwise the pass refuses.
    """
    import numpy as np

    from trtkit.graph import editable
    from trtkit.model import ModelArtifact

    scale_l, mean_l, std_l = _floats(scale, "scale"), _floats(mean, "mean"), _floats(std, "std")
    declared = scale_l is not None or mean_l is not None or std_l is not None or bool(swap_rb) or (
        input_dtype == "uint8")
    original = ModelArtifact(editable(artifact), artifact.base_dir, dict(artifact.metadata), artifact.source)
    info: dict[str, Any] = {}

    def rewrite(graph: Any) -> None:
        float_inputs = [t for t in graph.inputs if t.dtype is not None and _is_float(t.dtype)
                        and t.shape is not None and len(t.shape) == 4]
        if input is not None:
            named = [t for t in graph.inputs if t.name == input]
            if not named:
                from trtkit.errors import unknown_name

                raise unknown_name("input", input, [t.name for t in graph.inputs])
            x = named[0]
        elif len(float_inputs) == 1:
            x = float_inputs[0]
        else:
            raise OptionError(
                "fuse-preprocess: cannot tell which input is the image "
                f"({len(float_inputs)} float 4-D inputs); set option 'input'"
            )
        channels = x.shape[1] if isinstance(x.shape[1], int) and x.shape[1] > 0 else None
        # 1. the model's own leading chain of per-channel affine ops and channel permutations (BGR<->RGB as
        # Gather or reversing Slice): after it, channel i is a_g[i] * x[:, order[i]] + b_g[i]
        a_g: Any = np.ones(1)
        b_g: Any = np.zeros(1)
        order = np.arange(channels or 1)
        chain: list[Any] = []
        tensor = x
        while True:
            node = _sole_consumer(tensor, graph)
            picked = _channel_permutation(node, tensor, graph, channels) if node is not None else None
            if picked is not None:
                a_g, b_g = np.broadcast_to(a_g, (len(picked),))[picked], np.broadcast_to(b_g, (len(picked),))[picked]
                order = order[picked]
                chain.append(node)
                tensor = node.outputs[0]
                continue
            if node is None or node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
                break
            operand = 1 if node.inputs[0] is tensor else 0
            value = _const(graph, node.inputs[operand])
            if value is None or np.asarray(value).dtype.kind != "f" or channels is None:
                break
            vector = _channel_vector(value, channels, 4)
            if vector is None or (node.op == "Div" and (operand == 0 or not np.all(vector != 0))):
                break
            if node.op == "Mul":
                a_g, b_g = a_g * vector, b_g * vector
            elif node.op == "Div":
                a_g, b_g = a_g / vector, b_g / vector
            elif node.op == "Add":
                b_g = b_g + vector
            elif operand == 1:  # t - c
                b_g = b_g - vector
            else:  # c - t
                a_g, b_g = -a_g, vector - b_g
            chain.append(node)
            tensor = node.outputs[0]
        if not chain and not declared:
            info["nothing"] = True
            return
        if channels is None:
            raise OptionError(f"fuse-preprocess: input '{x.name}' needs a static channel count (axis 1)")
        # 2. the declared preprocessing: y = (raw[perm] * s - m) / d
        s = np.broadcast_to(np.asarray(scale_l or [1.0], np.float64), (channels,))
        m = np.broadcast_to(np.asarray(mean_l or [0.0], np.float64), (channels,))
        d = np.broadcast_to(np.asarray(std_l or [1.0], np.float64), (channels,))
        for name, vec in (("scale", scale_l), ("mean", mean_l), ("std", std_l)):
            if vec is not None and len(vec) not in (1, channels):
                raise OptionError(
                    f"fuse-preprocess option '{name}' has {len(vec)} values, input '{x.name}' has {channels} channels"
                )
        if np.any(d == 0) or np.any(s == 0):
            raise OptionError("fuse-preprocess: 'scale' and 'std' must be non-zero")
        if swap_rb and channels != 3:
            raise OptionError(f"fuse-preprocess: swap_rb needs 3 channels, input '{x.name}' has {channels}")
        perm = (np.array([2, 1, 0]) if swap_rb else np.arange(channels))[order]  # raw channel of each input
        a = np.broadcast_to(a_g, (channels,)) * (s / d)[order]
        b = np.broadcast_to(a_g, (channels,)) * (-m / d)[order] + np.broadcast_to(b_g, (channels,))
        if np.any(a == 0):
            raise OptionError("fuse-preprocess: the preprocessing multiplies a channel by 0; nothing to fold")
        consumers = list(tensor.outputs)
        if _is_output(tensor, graph) or not consumers:
            raise OptionError(f"fuse-preprocess: input '{x.name}' does not feed a Conv; nothing to fold into")
        plans = []
        for conv in consumers:
            if conv.op != "Conv" or conv.inputs[0] is not tensor:
                raise OptionError(
                    f"fuse-preprocess: input '{x.name}' (after {len(chain)} preprocessing ops) feeds "
                    f"{conv.op} '{conv.name}', not only Convs; cannot fold"
                )
            weight = _const(graph, conv.inputs[1])
            if weight is None or int(conv.attrs.get("group", 1)) != 1 or weight.shape[1] != channels:
                raise OptionError(
                    f"fuse-preprocess: Conv '{conv.name}' has non-constant or grouped weights; cannot fold"
                )
            auto_pad = conv.attrs.get("auto_pad", "NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            pads = list(conv.attrs.get("pads", [0] * (2 * (weight.ndim - 2))))
            padded = any(pads) or auto_pad not in ("NOTSET", "VALID")
            pad_value = None
            if padded and np.any(b != 0):
                if auto_pad not in ("NOTSET", "VALID"):
                    raise OptionError(
                        f"fuse-preprocess: Conv '{conv.name}' uses auto_pad={auto_pad}; folding the mean into its "
                        "bias would not be exact at the borders"
                    )
                values = -b / a
                if not np.allclose(values, values[0], rtol=1e-6, atol=1e-9):
                    raise OptionError(
                        f"fuse-preprocess: Conv '{conv.name}' zero-pads its input, and the mean folded into the "
                        "bias differs per channel (raw pad values " + ", ".join(f"{v:.4g}" for v in values) +
                        "): not exact at the borders; fold only scale/std or remove the padding"
                    )
                pad_value = float(values[0])
            plans.append((conv, weight, pads, pad_value))
        folded = []
        feed = x
        if input_dtype == "uint8":  # the device hands over camera bytes; the Cast runs on the accelerator
            import onnx_graphsurgeon as gs

            feed = gs.Variable(_unique(graph, x.name + "_float"), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Cast", _unique(graph, x.name + "_to_float"),
                                       attrs={"to": _onnx_dtype(x.dtype)}, inputs=[x], outputs=[feed]))
            x.dtype = np.uint8
        for conv, weight, pads, pad_value in plans:
            w = weight.astype(np.float64)
            bias = _const(graph, conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(w.shape[0])
            if bias is None:
                raise OptionError(f"fuse-preprocess: Conv '{conv.name}' has a non-constant bias; cannot fold")
            new_bias = np.asarray(bias, np.float64).reshape(-1) + w.sum(axis=tuple(range(2, w.ndim))) @ b
            scaled = w * a.reshape(1, -1, *([1] * (w.ndim - 2)))
            new_w = np.empty_like(scaled)
            new_w[:, perm] = scaled
            conv.inputs[1] = _new_const(_unique(graph, conv.inputs[1].name + "_preproc"), new_w.astype(weight.dtype))
            bias_const = _new_const(_unique(graph, (conv.name or "conv") + "_bias_preproc"),
                                    new_bias.astype(weight.dtype))
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias_const
            else:
                conv.inputs.append(bias_const)
            source = feed
            if pad_value is not None:
                import onnx_graphsurgeon as gs

                spatial = len(pads) // 2
                onnx_pads = [0, 0, *pads[:spatial], 0, 0, *pads[spatial:]]
                padded_t = gs.Variable(_unique(graph, x.name + "_padded"), dtype=feed.dtype)
                graph.nodes.append(gs.Node(
                    "Pad", _unique(graph, (conv.name or "conv") + "_raw_pad"), attrs={"mode": "constant"},
                    inputs=[feed, _new_const(_unique(graph, "pads"), np.asarray(onnx_pads, np.int64)),
                            _new_const(_unique(graph, "pad_value"),
                                       np.asarray(pad_value, dtype=np.dtype(feed.dtype)))],
                    outputs=[padded_t],
                ))
                conv.attrs["pads"] = [0] * len(pads)
                source = padded_t
            conv.inputs[0] = source
            folded.append({"conv": conv.name, "raw_pad_value": pad_value})
        for node in chain:
            node.inputs.clear()
            node.outputs.clear()
        info.update({
            "input": x.name, "channels": int(channels), "graph_ops": [n.op for n in chain],
            "scale": [float(v) for v in s], "mean": [float(v) for v in m], "std": [float(v) for v in d],
            "swap_rb": bool(swap_rb), "folded_into": folded, "input_dtype": input_dtype,
            "graph_channel_order": [int(v) for v in order],
            "raw_to_model_scale": [float(v) for v in a], "raw_to_model_offset": [float(v) for v in b],
        })

    result = _rewrite(original, rewrite)
    if info.get("nothing"):
        return ModelArtifact(original.model, original.base_dir, dict(artifact.metadata), artifact.source)
    info["declared"] = declared
    result.metadata["preprocess"] = info
    lo, hi = (_floats(raw_range, "raw_range") or ([0.0, 255.0] if declared else [-1.0, 1.0]))[:2]
    info["raw_range"] = [lo, hi]
    if verify:
        info["max_abs_diff"] = _verify_preprocess(original, result, info, declared, (lo, hi), seed)
    return result


def _onnx_dtype(dtype: Any) -> int:
    import numpy as np
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _verify_preprocess(original: ModelArtifact, result: ModelArtifact, info: dict[str, Any], declared: bool,
                       raw_range: tuple[float, float], seed: int) -> float:
    """Prove new(raw) == old(preprocess(raw)) on random raw inputs; returns the max abs difference."""
    import numpy as np

    from trtkit.runtime import input_specs, random_inputs, run, session

    name = info["input"]
    model_dtype = next(spec.dtype for spec in input_specs(original.model) if spec.name == name)
    feeds = random_inputs(result.model, seed=seed, ranges={name: raw_range})
    old_feeds = dict(feeds)
    raw = feeds[name].astype(np.float64)
    old_feeds[name] = raw.astype(model_dtype)
    if declared:
        perm = [2, 1, 0] if info["swap_rb"] else list(range(info["channels"]))
        shape = (1, -1, 1, 1)
        s, m, d = (np.asarray(info[k]).reshape(shape) for k in ("scale", "mean", "std"))
        old_feeds[name] = ((raw[:, perm] * s - m) / d).astype(model_dtype)
    old = run(session(original, optimization="disable"), old_feeds)
    new = run(session(result, optimization="disable"), feeds)
    worst = 0.0
    for key, ref in old.items():
        diff = float(np.max(np.abs(new[key].astype(np.float64) - ref))) if ref.size else 0.0
        bound = 1e-4 + 1e-3 * float(np.max(np.abs(ref))) if ref.size else 0.0
        if not diff <= bound:
            raise NumericalCheckError(
                f"pass 'fuse-preprocess': output '{key}' differs by {diff:.3g} (> {bound:.3g}) from the original "
                "model fed with the preprocessed input"
            )
        worst = max(worst, diff)
    return worst


# ---- remove-sigmoid ----------------------------------------------------------------------------------------
_LAYOUT_OPS = ("Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise OptionError(f"remove-sigmoid: threshold {p!r} must be a probability strictly between 0 and 1")
    return math.log(p / (1.0 - p))


def remove_sigmoid(artifact: ModelArtifact, thresholds: dict[str, Any] | None = None,
                   threshold: float | None = None, verify: bool = True, seed: int = 0) -> ModelArtifact:
    """Remove Sigmoids feeding graph outputs (directly or through Concat/Reshape/Transpose/... chains).

    Consumers of a Sigmoid that are not on such a chain keep their Sigmoid. Probability thresholds become logit
    thresholds ln(p / (1 - p)) in metadata["thresholds"].
    """
    from trtkit.graph import editable
    from trtkit.model import ModelArtifact

    original = ModelArtifact(editable(artifact), artifact.base_dir, dict(artifact.metadata), artifact.source)
    removed: list[dict[str, Any]] = []

    def on_output_chain(tensor: Any, graph: Any, depth: int = 0) -> bool:
        """True if every path from tensor leads to graph outputs through layout ops only."""
        if depth > 32:
            return False
        if _is_output(tensor, graph):
            return not tensor.outputs  # an output also consumed inside the graph is not a pure output
        if not tensor.outputs:
            return False
        for node in tensor.outputs:
            if node.op not in _LAYOUT_OPS or node.inputs[0] is not tensor and node.op != "Concat":
                return False
            if not all(on_output_chain(out, graph, depth + 1) for out in node.outputs):
                return False
        return True

    def rewrite(graph: Any) -> None:
        for node in list(graph.nodes):
            if node.op != "Sigmoid" or not node.outputs:
                continue
            y = node.outputs[0]
            chain_consumers = [c for c in y.outputs if c.op in _LAYOUT_OPS and all(
                on_output_chain(out, graph) for out in c.outputs)]
            direct = _is_output(y, graph)
            if direct and y.outputs:
                continue
            if direct:
                from trtkit.graph import bypass

                name = y.name
                if not bypass(node, graph):  # input -> Sigmoid -> output: keep the names with an Identity
                    node.op, node.attrs = "Identity", {}
                removed.append({"node": node.name, "outputs": [name]})
                continue
            if not chain_consumers:
                continue
            for consumer in chain_consumers:
                for i, inp in enumerate(consumer.inputs):
                    if inp is y:
                        consumer.inputs[i] = node.inputs[0]
            removed.append({"node": node.name})

    result = _rewrite(original, rewrite, fold=False)
    if not removed:
        return ModelArtifact(original.model, original.base_dir, dict(artifact.metadata), artifact.source)
    affected = _sigmoid_masks(original, result, seed, verify)
    probabilities: dict[str, float] = {}
    if threshold is not None:
        probabilities.update({name: float(threshold) for name in affected})
    for name, p in (thresholds or {}).items():
        probabilities[str(name)] = float(p)
    result.metadata["sigmoid_removed"] = {"nodes": [r["node"] for r in removed], "outputs": affected}
    if probabilities:
        converted = {name: {"probability": p, "logit": _logit(p)} for name, p in sorted(probabilities.items())}
        result.metadata["thresholds"] = {**result.metadata.get("thresholds", {}), **converted}
    return result


def _sigmoid_masks(original: ModelArtifact, result: ModelArtifact, seed: int, verify: bool) -> dict[str, Any]:
    """Per output: which elements became logits (channels along the last axis when it is a channel split).

    Proves the relation on random inputs: sigmoid(new) == old on the affected elements, new == old elsewhere.
    Which elements are affected is decided from the data: an element is a logit if sigmoid(new) matches old
    and new does not; the check then demands that every other element is identical.
    """
    import numpy as np

    from trtkit.runtime import random_inputs, run, session

    feeds = random_inputs(result.model, seed=seed, low=-3.0, high=3.0)
    old = run(session(original, optimization="disable"), feeds)
    new = run(session(result, optimization="disable"), feeds)
    report: dict[str, Any] = {}
    for name, ref in old.items():
        got = new[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        same = np.abs(got - ref64) <= 1e-6 + 1e-5 * np.abs(ref64)
        sig = 1.0 / (1.0 + np.exp(-got))
        logit_match = np.abs(sig - ref64) <= 1e-5 + 1e-4 * np.abs(ref64)
        mask = ~same
        if verify and not bool(np.all(same | logit_match)):
            bad = int(np.count_nonzero(~(same | logit_match)))
            raise NumericalCheckError(
                f"pass 'remove-sigmoid': output '{name}' has {bad} elements that are neither unchanged nor the "
                "logit of the original"
            )
        if not mask.any():
            continue
        entry: dict[str, Any] = {"elements": int(mask.sum()), "of": int(mask.size)}
        # Describe the changed elements as channels of one axis when they are (e.g. YOLO score columns).
        for axis in reversed(range(mask.ndim)):
            others = tuple(i for i in range(mask.ndim) if i != axis)
            cols = mask.any(axis=others)
            selector = [slice(None)] * mask.ndim
            selector[axis] = cols
            rest = [slice(None)] * mask.ndim
            rest[axis] = ~cols
            if bool(logit_match[tuple(selector)].all()) and bool(same[tuple(rest)].all()):
                entry["axis"] = axis - mask.ndim
                entry["channels"] = [int(i) for i in np.nonzero(cols)[0]]
                break
        report[name] = entry
    return report


# ---- registration ------------------------------------------------------------------------------------------
def _simplify_apply(artifact: ModelArtifact, **options: Any) -> ModelArtifact:
    return simplify(artifact, **options)


def _check_thresholds(options: dict[str, Any]) -> None:
    for name, value in (options.get("thresholds") or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(f"remove-sigmoid: threshold for '{name}' must be a number, got {value!r}")


def _remove_sigmoid_apply(artifact: ModelArtifact, **options: Any) -> ModelArtifact:
    _check_thresholds(options)
    return remove_sigmoid(artifact, **options)


PASSES = [
    GraphPass(
        name="simplify",
        description="Shape inference, constant folding, no-op/duplicate/dead node removal; optional static shapes",
        options={
            "fold": Option("bool", True, "constant-fold (onnxruntime-evaluated, shape subgraphs included)"),
            "input_shapes": Option("dict", None, 'fix dynamic inputs to static shapes, e.g. {"image": [1,3,64,64]}'),
            "remove_noops": Option("bool", True, "remove Identity, Dropout, same-type Cast, x*1, x+0, ..."),
            "dedupe": Option("bool", True, "merge identical nodes (common subexpressions)"),
            "infer": Option("bool", True, "run onnx shape inference before and after"),
        },
        apply=_simplify_apply,
    ),
    GraphPass(
        name="optimize",
        description="Fold BatchNorm and per-channel Mul/Add into Conv/Gemm, merge transposes and reshapes, refold",
        options={
            "fold_bn": Option("bool", True, "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"),
            "fold_affine": Option("bool", True, "fold per-channel Mul/Div/Add/Sub by constants into the Conv"),
            "merge_transposes": Option("bool", True, "compose consecutive Transposes"),
            "merge_reshapes": Option("bool", True, "skip a Reshape/Flatten/Squeeze/Unsqueeze feeding a Reshape"),
        },
        apply=lambda artifact, **options: optimize(artifact, **options),
    ),
    GraphPass(
        name="fold-batchnorm",
        description="Only the BatchNorm folding part of 'optimize'",
        options={},
        apply=lambda artifact: optimize(artifact, fold_affine=False, merge_transposes=False, merge_reshapes=False),
    ),
    GraphPass(
        name="fuse-preprocess",
        description="Fold input scaling, mean/std and RGB<->BGR swap into the first Conv (model takes raw input)",
        options={
            "input": Option("str", None, "the image input (default: the only float 4-D input)"),
            "scale": Option("list", None, "declared raw-input scale, e.g. 0.00392156862745098 (=1/255)"),
            "mean": Option("list", None, "declared mean per channel (after scaling)"),
            "std": Option("list", None, "declared std per channel (after scaling)"),
            "swap_rb": Option("bool", False, "the device feeds BGR to an RGB model (or the reverse)"),
            "input_dtype": Option("str", "float32", "type of the new raw input: float32, or uint8 (camera bytes; "
                                  "a Cast is added)", choices=("float32", "uint8")),
            "raw_range": Option("list", None, "low,high of the raw input for the check (default 0,255 if declared)"),
            "verify": Option("bool", True, "prove new(raw) == old(preprocess(raw)) with onnxruntime"),
            "seed": Option("int", 0, "seed of the verification inputs"),
        },
        apply=lambda artifact, **options: fuse_preprocess(artifact, **options),
        exact=False,
    ),
    GraphPass(
        name="remove-sigmoid",
        description="Remove Sigmoids feeding outputs (scores become logits); thresholds converted to logits",
        options={
            "thresholds": Option("dict", None, 'probability thresholds per name, e.g. {"score": 0.25}'),
            "threshold": Option("float", None, "one probability threshold for every affected output"),
            "verify": Option("bool", True, "prove sigmoid(new) == old on changed elements, identical elsewhere"),
            "seed": Option("int", 0, "seed of the verification inputs"),
        },
        apply=_remove_sigmoid_apply,
        exact=False,
    ),
]


@hookimpl
def register_passes(register: Callable[[GraphPass], None]) -> None:
    for graph_pass in PASSES:
        register(graph_pass)
