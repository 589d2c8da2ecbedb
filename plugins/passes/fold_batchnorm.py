"""The `fold-batchnorm` rewrite: Conv/ConvTranspose/Gemm followed by an inference BatchNormalization becomes
one layer with scaled weights and a new bias. Part of the `optimize` pass, and a pass of its own.

Folded values are computed in float64. The bias is rounded to the weight's dtype once: its float64 value
rides on the new constant, so a chain (Conv -> BatchNorm -> Mul -> Add, or Paddle's Conv -> Mul -> Add)
folded one node at a time still rounds it only once. On the PP-OCRv4 text detector, rounding the bias after
each fold cost 1.9e-5 of the output range (float64 evaluation) against 1.4e-5 for one rounding: a bias error
is the same for every output position of a channel, a weight's rounding error averages out over the taps.
The weight is rounded at each fold (within an ulp of rounding once): a float64 copy of every folded weight
would triple the memory of optimizing a large model.
"""

from __future__ import annotations

from typing import Any

from trtkit.graph import bypass, constant_value, fresh_name, is_graph_output, new_constant, single_consumer

_EXACT = "_trtkit_float64"  # attribute of a constant made here: its value before rounding


def exact_value(tensor: Any) -> Any:
    """A constant's value in float64: the unrounded value where an earlier fold made it, else the stored one
    (None when the tensor is not a constant)."""
    import numpy as np

    exact = getattr(tensor, _EXACT, None)
    if exact is not None:
        return exact
    value = constant_value(tensor)
    return None if value is None else np.asarray(value, np.float64)


def set_weight_and_bias(graph: Any, layer: Any, weight: Any, bias: Any, dtype: Any, tag: str) -> None:
    """Give a Conv/ConvTranspose/Gemm new weight and bias constants (fresh names: others may share the old),
    rounded from the float64 `weight` and `bias` to `dtype`; the float64 bias stays on its constant for the
    next fold into the same layer (a bias vector is small; a float64 weight would not be)."""
    weight_const = new_constant(fresh_name(graph, f"{layer.inputs[1].name}_{tag}"), weight.astype(dtype))
    bias_const = new_constant(fresh_name(graph, f"{layer.name or 'layer'}_bias_{tag}"), bias.astype(dtype))
    setattr(bias_const, _EXACT, bias)
    layer.inputs[1] = weight_const
    if len(layer.inputs) > 2:
        layer.inputs[2] = bias_const
    else:
        layer.inputs.append(bias_const)


def fold_batchnorm(graph: Any) -> int:
    """Conv/ConvTranspose/Gemm followed by BatchNormalization (inference) -> one layer with scaled weights."""
    import numpy as np

    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.inputs) != 5 or bn.attrs.get("training_mode", 0):
            continue
        if any(out.outputs or is_graph_output(out, graph) for out in bn.outputs[1:]):
            continue
        x = bn.inputs[0]
        if len(x.inputs) != 1:
            continue
        layer = x.inputs[0]
        if layer.op not in ("Conv", "ConvTranspose", "Gemm") or single_consumer(x, graph) is not bn:
            continue
        params = [constant_value(t) for t in bn.inputs[1:]]
        weight = constant_value(layer.inputs[1]) if len(layer.inputs) > 1 else None
        bias = exact_value(layer.inputs[2]) if len(layer.inputs) > 2 else np.zeros(1)
        if any(p is None for p in params) or weight is None or bias is None or weight.dtype.kind != "f":
            continue
        gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        channels = scale.size
        w = exact_value(layer.inputs[1])
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
        set_weight_and_bias(graph, layer, w, new_bias, weight.dtype, "bnfold")
        if bypass(bn, graph, keep=x):
            folded += 1
    return folded
