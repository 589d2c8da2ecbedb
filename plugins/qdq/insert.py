"""The QDQ builder's rewrite: a copy of an FP32 model with int8 Q/DQ inserted where `plan_qdq` says.

    artifact = trtkit.quantize("model.onnx", "scales.json", output="model.int8.onnx")

Activations get one per-tensor QuantizeLinear -> DequantizeLinear pair shared by all their quantized consumers;
weights are stored as int8 initializers (symmetric, per output channel) followed by a DequantizeLinear; zero
points are 0. Constant-node weights are folded into initializers first. The input model is never modified;
what was done is recorded in `artifact.metadata["quantization"]`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from trtkit.errors import OptionError, UnknownNameError, unknown_name
from trtkit.graph import GraphIndex

from .placement import COMPUTE_OPS, POOL_OPS, plan_qdq

if TYPE_CHECKING:
    import onnx

    from trtkit.model import ModelArtifact
    from trtkit.scales import Scales

MIN_OPSET = 13  # per-axis DequantizeLinear


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

    from trtkit.model import as_artifact
    from trtkit.scales import as_scales

    source = as_artifact(model)
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
    from trtkit.scales import model_fingerprint, tensor_names

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
        from trtkit.ui import console

        console.print("[yellow]warning:[/yellow] the scales were calibrated on a different model graph "
                      "(fingerprint differs); tensors are matched by name")

    init_by_name = {t.name: t for t in m.graph.initializer}
    shapes = {name: tuple(int(d) for d in t.dims) for name, t in init_by_name.items()
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    plan = plan_qdq(m, scale_map, exclude, exclude_op_types, per_channel, concat_max_ratio, quantize_bmm, shapes)

    names = GraphIndex(m.graph)  # fresh tensor and node names
    qmax = 63 if reduce_range else 127
    new_inits: list[onnx.TensorProto] = []
    act_out: dict[str, str] = {}
    act_nodes: dict[str, list[onnx.NodeProto]] = {}
    for tensor, amax in plan.activations.items():
        base = re.sub(r"[^A-Za-z0-9_.:/-]", "_", tensor)
        scale_name, zp_name = names.fresh_name(f"{base}_scale"), names.fresh_name(f"{base}_zero_point")
        q_out, dq_out = names.fresh_name(f"{base}_quantized"), names.fresh_name(f"{base}_dequantized")
        new_inits.append(numpy_helper.from_array(np.array(amax / 127.0, dtype=np.float32), scale_name))
        new_inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zp_name))
        act_nodes[tensor] = [
            helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_out], name=names.fresh_name(f"{base}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out], name=names.fresh_name(f"{base}_DequantizeLinear")),
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
        q_name, s_name = names.fresh_name(f"{base}_quantized"), names.fresh_name(f"{base}_scale")
        z_name, out = names.fresh_name(f"{base}_zero_point"), names.fresh_name(f"{base}_dequantized")
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name),
                      numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), z_name)]
        node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                name=names.fresh_name(f"{base}_DequantizeLinear"))
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
        from trtkit.fileio import check_output_path

        check_output_path(output, source.source)
        artifact.save(output)
    return artifact
