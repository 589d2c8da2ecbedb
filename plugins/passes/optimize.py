"""The `optimize` pass: fold BatchNorm and per-channel Mul/Div/Add/Sub by constants into the preceding layer,
compose consecutive Transposes, skip shape ops feeding a Reshape, refold. Every rewrite is exact (the
generic numerical check of `trtkit optimize` confirms it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trtkit.graph import (
    bypass,
    constant_value,
    editable,
    fresh_name,
    infer_shapes,
    new_constant,
    rewrite,
    single_consumer,
    static_shape,
)

from .common import channel_vector
from .fold_batchnorm import exact_value, fold_batchnorm, set_weight_and_bias

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


def _fold_affine_into_conv(graph: Any) -> int:
    """Conv followed by Mul/Div/Add/Sub with a per-output-channel constant -> folded into weights and bias."""
    import numpy as np

    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2 or not node.outputs:
                continue
            first, second = node.inputs
            x, value = first, constant_value(second)
            if value is None and node.op in ("Mul", "Add"):
                x, value = second, constant_value(first)
            if value is None or len(x.inputs) != 1 or x.inputs[0].op != "Conv":
                continue
            conv = x.inputs[0]
            if single_consumer(x, graph) is not node or len(conv.inputs) < 2:
                continue
            weight = constant_value(conv.inputs[1])
            bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0] if
                                                                                         weight is not None else 1)
            if weight is None or bias is None or weight.dtype.kind != "f" or np.asarray(value).dtype.kind != "f":
                continue
            out_shape, x_shape = static_shape(node.outputs[0]), static_shape(x)
            if x.shape is None or (out_shape is not None and x_shape is not None and out_shape != x_shape):
                continue
            ndim = len(x.shape)
            if np.asarray(value).ndim > ndim:
                continue
            vector = channel_vector(value, weight.shape[0], ndim)
            if vector is None:
                continue
            # float64, unrounded where an earlier fold made them: a chain is rounded once
            w = exact_value(conv.inputs[1])
            b = exact_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
            b = np.broadcast_to(b.reshape(-1), (weight.shape[0],)).copy()
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
            set_weight_and_bias(graph, conv, w, b, weight.dtype, "affine")
            if bypass(node, graph, keep=x):
                folded += 1
                changed = True
    return folded


def _matmul_add_to_gemm(graph: Any) -> int:
    """MatMul of a 2-D input by a constant 2-D weight, then Add of a constant bias broadcast over the rows
    ([N] or [1, N]) -> one Gemm (what onnxslim does; the bias is added to the same products, so the result
    is the same up to float round-off, which the numerical check confirms)."""
    import numpy as np

    fused = 0
    for add in list(graph.nodes):
        if add.op != "Add" or len(add.inputs) != 2 or not add.outputs:
            continue
        for product, bias_tensor in (add.inputs, add.inputs[::-1]):
            bias = constant_value(bias_tensor)
            if bias is None or len(product.inputs) != 1 or product.inputs[0].op != "MatMul":
                continue
            matmul = product.inputs[0]
            weight = constant_value(matmul.inputs[1])
            a_shape = static_shape(matmul.inputs[0])
            if weight is None or weight.ndim != 2 or a_shape is None or len(a_shape) != 2:
                continue
            bias = np.asarray(bias)
            if (single_consumer(product, graph) is not add or weight.dtype.kind != "f" or bias.dtype != weight.dtype
                    or bias.shape not in ((weight.shape[1],), (1, weight.shape[1]))):
                continue
            matmul.op = "Gemm"
            matmul.attrs = {}
            matmul.inputs.append(bias_tensor)
            if bypass(add, graph, keep=product):
                fused += 1
            break
    return fused


def _merge_unsqueezes(graph: Any) -> int:
    """Unsqueeze feeding an Unsqueeze -> one Unsqueeze with the combined axes (inserting size-1 dims in two
    steps or in one is the same reshape)."""
    import numpy as np

    merged = 0
    for node in list(graph.nodes):
        if node.op != "Unsqueeze" or not node.inputs:
            continue
        x = node.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Unsqueeze" or single_consumer(x, graph) is not node:
            continue
        first = x.inputs[0]
        axes_first, axes_second = _unsqueeze_axes(first), _unsqueeze_axes(node)
        rank = len(first.inputs[0].shape) if first.inputs[0].shape is not None else None
        if axes_first is None or axes_second is None or rank is None:
            continue
        layout = _insert_ones(["x"] * rank, axes_first)
        layout = _insert_ones(layout, axes_second) if layout is not None else None
        if layout is None:
            continue
        combined = np.array([i for i, d in enumerate(layout) if d == "1"], np.int64)
        node.inputs[0] = first.inputs[0]
        if "axes" in node.attrs:  # opset < 13
            node.attrs["axes"] = [int(a) for a in combined]
        else:
            node.inputs[1] = new_constant(fresh_name(graph, f"{node.name or 'unsqueeze'}_axes"), combined)
        merged += 1
    return merged


def _unsqueeze_axes(node: Any) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if value is None else [int(a) for a in value.reshape(-1)]


def _insert_ones(layout: list[str], axes: list[int]) -> list[str] | None:
    """The dims after Unsqueeze(axes): "1" at the (normalised) axes, the input's dims in order elsewhere."""
    rank = len(layout) + len(axes)
    normal = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(normal)) != len(normal) or any(not 0 <= a < rank for a in normal):
        return None
    rest = iter(layout)
    return ["1" if i in normal else next(rest) for i in range(rank)]


def _merge_transposes(graph: Any) -> int:
    """Transpose -> Transpose becomes one Transpose (or nothing when the composed permutation is the identity)."""
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
        shape = constant_value(node.inputs[1])
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
    counts: dict[str, int] = {}

    def edit(graph: Any) -> None:
        for _ in range(3):
            total = 0
            if fold_bn:
                counts["batchnorm"] = counts.get("batchnorm", 0) + (n := fold_batchnorm(graph))
                total += n
            if fold_affine:
                counts["affine"] = counts.get("affine", 0) + (n := _fold_affine_into_conv(graph))
                total += n
            if merge_transposes:
                counts["transpose"] = counts.get("transpose", 0) + (n := _merge_transposes(graph))
                total += n
            if merge_reshapes:
                counts["reshape"] = counts.get("reshape", 0) + (n := _merge_reshapes(graph) + _merge_unsqueezes(graph))
                total += n
            if fold_affine:
                counts["gemm"] = counts.get("gemm", 0) + (n := _matmul_add_to_gemm(graph))
                total += n
            graph.cleanup()
            if not total:
                break

    model = editable(artifact)
    if any(not v.type.tensor_type.HasField("shape") for v in model.graph.value_info) or not len(
            model.graph.value_info):
        model = infer_shapes(model)
    result = rewrite(artifact, edit, model=model)
    del model
    result.model = infer_shapes(result.model)
    return result
