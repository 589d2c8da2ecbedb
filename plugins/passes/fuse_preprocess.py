"""The `fuse-preprocess` pass: fold input scaling, mean/std normalisation and an RGB<->BGR swap into the
first Conv(s), so the model takes the raw input (camera bytes with input_dtype=uint8).

It changes the model's input by design (exact=False): it proves new(raw) == old(preprocess(raw)) itself with
onnxruntime and reports the difference it measured in metadata["preprocess"]["max_abs_diff"], which
`trtkit optimize` records as the pass's checked difference (GraphPass.measured_difference).
"""

from __future__ import annotations

from typing import Any

from trtkit.errors import NumericalCheckError, OptionError, unknown_name
from trtkit.graph import (
    constant_value,
    editable,
    fresh_name,
    is_graph_output,
    new_constant,
    rewrite,
    single_consumer,
)
from trtkit.model import ModelArtifact

from .common import channel_vector, is_float


def channel_permutation(node: Any, tensor: Any, graph: Any, channels: int | None) -> Any:
    """The channel order `node` gives `tensor` ([N, C, H, W]) when it only permutes channels: a Gather on
    axis 1 with constant indices, or a Slice on axis 1 with constant bounds (x[:, ::-1]) that keeps every
    channel; else None. new[:, i] = old[:, order[i]]."""
    import numpy as np

    if channels is None or not node.inputs or node.inputs[0] is not tensor:
        return None
    if node.op == "Gather" and len(node.inputs) == 2 and int(node.attrs.get("axis", 0)) in (1, -3):
        indices = constant_value(node.inputs[1])
        if indices is None or np.asarray(indices).ndim != 1 or np.asarray(indices).dtype.kind not in "iu":
            return None
        order = np.asarray(indices, np.int64) % channels
    elif node.op == "Slice" and 3 <= len(node.inputs) <= 5:
        bounds = [constant_value(t) for t in node.inputs[1:]]
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

    scale_l, mean_l, std_l = _floats(scale, "scale"), _floats(mean, "mean"), _floats(std, "std")
    declared = scale_l is not None or mean_l is not None or std_l is not None or bool(swap_rb) or (
        input_dtype == "uint8")
    original = ModelArtifact(editable(artifact), artifact.base_dir, dict(artifact.metadata), artifact.source)
    info: dict[str, Any] = {}

    def edit(graph: Any) -> None:
        float_inputs = [t for t in graph.inputs if t.dtype is not None and is_float(t.dtype)
                        and t.shape is not None and len(t.shape) == 4]
        if input is not None:
            named = [t for t in graph.inputs if t.name == input]
            if not named:
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
            node = single_consumer(tensor, graph)
            picked = channel_permutation(node, tensor, graph, channels) if node is not None else None
            if picked is not None:
                a_g, b_g = np.broadcast_to(a_g, (len(picked),))[picked], np.broadcast_to(b_g, (len(picked),))[picked]
                order = order[picked]
                chain.append(node)
                tensor = node.outputs[0]
                continue
            if node is None or node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
                break
            operand = 1 if node.inputs[0] is tensor else 0
            value = constant_value(node.inputs[operand])
            if value is None or np.asarray(value).dtype.kind != "f" or channels is None:
                break
            vector = channel_vector(value, channels, 4)
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
        if is_graph_output(tensor, graph) or not consumers:
            raise OptionError(f"fuse-preprocess: input '{x.name}' does not feed a Conv; nothing to fold into")
        plans = []
        for conv in consumers:
            if conv.op != "Conv" or conv.inputs[0] is not tensor:
                raise OptionError(
                    f"fuse-preprocess: input '{x.name}' (after {len(chain)} preprocessing ops) feeds "
                    f"{conv.op} '{conv.name}', not only Convs; cannot fold"
                )
            weight = constant_value(conv.inputs[1])
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

            feed = gs.Variable(fresh_name(graph, x.name + "_float"), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Cast", fresh_name(graph, x.name + "_to_float"),
                                       attrs={"to": _onnx_dtype(x.dtype)}, inputs=[x], outputs=[feed]))
            x.dtype = np.uint8
        for conv, weight, pads, pad_value in plans:
            w = weight.astype(np.float64)
            bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(w.shape[0])
            if bias is None:
                raise OptionError(f"fuse-preprocess: Conv '{conv.name}' has a non-constant bias; cannot fold")
            new_bias = np.asarray(bias, np.float64).reshape(-1) + w.sum(axis=tuple(range(2, w.ndim))) @ b
            scaled = w * a.reshape(1, -1, *([1] * (w.ndim - 2)))
            new_w = np.empty_like(scaled)
            new_w[:, perm] = scaled
            conv.inputs[1] = new_constant(fresh_name(graph, conv.inputs[1].name + "_preproc"), new_w.astype(weight.dtype))
            bias_const = new_constant(fresh_name(graph, (conv.name or "conv") + "_bias_preproc"),
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
                padded_t = gs.Variable(fresh_name(graph, x.name + "_padded"), dtype=feed.dtype)
                graph.nodes.append(gs.Node(
                    "Pad", fresh_name(graph, (conv.name or "conv") + "_raw_pad"), attrs={"mode": "constant"},
                    inputs=[feed, new_constant(fresh_name(graph, "pads"), np.asarray(onnx_pads, np.int64)),
                            new_constant(fresh_name(graph, "pad_value"),
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

    result = rewrite(original, edit)
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
