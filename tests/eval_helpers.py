"""Real ONNX models for the evaluator tests, built with onnx.helper, and a small max-calibrated QDQ quantizer
(symmetric int8, activations per tensor, weights per tensor) used until trtkit.quantize is available."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HOSTILE = "fc3"
MLP_LAYERS = ("fc1", "fc2", "fc3", "fc4")


def mlp_fp32(path: Path, seed: int = 0) -> Path:
    """x[N,16] -> 4 x (MatMul + Add [+ Relu]) -> y[N,10]. fc3's input carries a huge outlier channel (bias 2000
    on fc2's channel 0, whose fc3 weights are zero), so a per-tensor INT8 scale for fc3's input wipes out the
    normal channels: fc3 is the one INT8-hostile layer."""
    rng = np.random.default_rng(seed)
    sizes = [16, 32, 32, 32, 10]
    nodes, inits = [], []
    current = "x"
    for index, name in enumerate(MLP_LAYERS):
        fan_in, fan_out = sizes[index], sizes[index + 1]
        weight = rng.normal(0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
        bias = rng.normal(0, 0.1, fan_out).astype(np.float32) + (0.3 if index < 3 else 0.0)
        if name == "fc2":
            bias[0] = 2000.0
        if name == HOSTILE:
            weight[0, :] = 0.0
        inits += [numpy_helper.from_array(weight, f"{name}.weight"), numpy_helper.from_array(bias, f"{name}.bias")]
        nodes.append(helper.make_node("MatMul", [current, f"{name}.weight"], [f"{name}_mm"], name=name))
        nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [f"{name}_out"], name=f"{name}_bias"))
        current = f"{name}_out"
        if index < 3:
            nodes.append(helper.make_node("Relu", [current], [f"act{index + 1}"], name=f"relu{index + 1}"))
            current = f"act{index + 1}"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def quantize_max(fp32: Path, out: Path, feeds: dict[str, np.ndarray],
                 ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")) -> Path:
    """Insert Q/DQ on the activation input of every Conv/MatMul/Gemm (scale = max|x| / 127 over `feeds`) and
    int8 weights + DequantizeLinear for their initializer weights. Node and tensor names are kept."""
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    inits = {t.name: t for t in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type in ops]
    activations = sorted({n.input[0] for n in targets if n.input[0] not in inits})
    probe = onnx.load(str(fp32))
    known = {o.name for o in probe.graph.output}
    for name in activations:
        if name not in known and name not in {i.name for i in probe.graph.input}:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True))
    values.update(feeds)
    new_nodes = []
    new_inits = []
    for node in model.graph.node:
        if node in targets:
            act = node.input[0]
            if act not in inits:
                amax = float(np.abs(values[act]).max()) or 1.0
                scale = f"{node.name}.in_scale"
                new_inits += [numpy_helper.from_array(np.array(amax / 127, np.float32), scale),
                              numpy_helper.from_array(np.array(0, np.int8), f"{node.name}.in_zp")]
                new_nodes.append(helper.make_node("QuantizeLinear", [act, scale, f"{node.name}.in_zp"],
                                                  [f"{act}_q_{node.name}"], name=f"{node.name}_in_q"))
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{act}_q_{node.name}", scale,
                                                                       f"{node.name}.in_zp"],
                                                  [f"{act}_dq_{node.name}"], name=f"{node.name}_in_dq"))
                node.input[0] = f"{act}_dq_{node.name}"
            if len(node.input) > 1 and node.input[1] in inits:
                weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                w_scale = float(np.abs(weight).max()) / 127 or 1.0
                q = np.clip(np.round(weight / w_scale), -127, 127).astype(np.int8)
                base = node.input[1]
                new_inits += [numpy_helper.from_array(q, f"{base}_int8"),
                              numpy_helper.from_array(np.array(w_scale, np.float32), f"{base}_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), f"{base}_zp")]
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_scale", f"{base}_zp"],
                                                  [f"{base}_dq"], name=f"{node.name}_w_dq"))
                node.input[1] = f"{base}_dq"
        new_nodes.append(node)
    used = {i for n in new_nodes for i in n.input}
    kept_inits = [t for t in model.graph.initializer if t.name in used] + new_inits
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def mlp_inputs(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)


def run_float(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain onnxruntime with Q/DQ run in float (independent of trtkit's runtime helpers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def mean_logit_shift(reference: dict, candidate: dict, labels) -> dict:
    """A custom metric for `-O metric=eval_helpers:mean_logit_shift` (module:function)."""
    name = next(iter(reference))
    return {"shift": float(np.mean(candidate[name] - reference[name]))}
