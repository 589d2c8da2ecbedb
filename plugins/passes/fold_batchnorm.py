"""The `fold-batchnorm` rewrite: Conv/ConvTranspose/Gemm followed by an inference BatchNormalization becomes
one layer with scaled weights and a new bias. Part of the `optimize` pass, and a pass of its own.
"""

from __future__ import annotations

from typing import Any

from trtkit.graph import bypass, constant_value, fresh_name, is_graph_output, new_constant, single_consumer


def set_weight_and_bias(graph: Any, layer: Any, weight: Any, bias: Any, tag: str) -> None:
    """Give a Conv/ConvTranspose/Gemm new weight and bias constants (fresh names: others may share the old)."""
    layer.inputs[1] = new_constant(fresh_name(graph, f"{layer.inputs[1].name}_{tag}"), weight)
    bias_const = new_constant(fresh_name(graph, f"{layer.name or 'layer'}_bias_{tag}"), bias)
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
        bias = constant_value(layer.inputs[2]) if len(layer.inputs) > 2 else np.zeros(1)
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
        set_weight_and_bias(graph, layer, w.astype(weight.dtype), new_bias.astype(weight.dtype), "bnfold")
        if bypass(bn, graph, keep=x):
            folded += 1
    return folded
