"""The `qdq-tune` pass: Q/DQ placement tuning of a quantized model for TensorRT.

Removes redundant Q/DQ pairs (DQ->Q round trips with identical parameters, duplicate quantizers of one
tensor, Q/DQ on the Conv branch of a residual Add, Q/DQ feeding graph outputs) and aligns scales across
Concat (one shared scale) and MaxPool (output scale = input scale, after which the output pair is redundant)
so TensorRT need not insert requantize layers. Every change is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trtkit.errors import InputFileError, NumericalCheckError
from trtkit.graph import GraphIndex
from trtkit.model import as_artifact

from .common import add_initializer, attribute, constant_array, has_qdq

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


@dataclass
class TuneReport:
    changes: list[dict[str, Any]] = field(default_factory=list)
    sqnr_db: float | None = None  # tuned vs input model on random inputs (when verified)

    def add(self, action: str, where: str, detail: str) -> None:
        self.changes.append({"action": action, "where": where, "detail": detail})

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for change in self.changes:
            result[change["action"]] = result.get(change["action"], 0) + 1
        return dict(sorted(result.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "counts": self.counts(), "sqnr_db": self.sqnr_db}


def _qparams(artifact: ModelArtifact, index: GraphIndex, node: Any) -> tuple[Any, ...] | None:
    """(scale bytes, zero point bytes, zero point dtype, axis) of a Q/DQ node with constant parameters."""
    scale = constant_array(artifact, index, node.input[1])
    if scale is None:
        return None
    zero = constant_array(artifact, index, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    zero_key = (zero.tobytes(), str(zero.dtype)) if zero is not None else (b"", "uint8")
    axis = attribute(node, "axis", 1) if scale.size > 1 else None
    return (scale.astype("float32").tobytes(), *zero_key, axis)


def _per_tensor_scale(artifact: ModelArtifact, index: GraphIndex, node: Any) -> float | None:
    scale = constant_array(artifact, index, node.input[1])
    if scale is None or scale.size != 1:
        return None
    zero = constant_array(artifact, index, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and zero.reshape(-1)[0] != 0:
        return None
    return float(scale.reshape(-1)[0])


def _remove_nodes(index: GraphIndex, nodes: list[Any]) -> None:
    """Delete nodes from the graph and from the index's consumer lists."""
    for node in nodes:
        for name in node.input:
            if name and name in index.consumers:
                index.consumers[name] = [(n, s) for n, s in index.consumers[name] if n is not node]
        index.graph.node.remove(node)


def qdq_tune(
    artifact: ModelArtifact | str,
    align_concat: bool = True,
    align_pool: bool = True,
    residual: bool = True,
    outputs: bool = True,
    verify: bool = True,
) -> tuple[ModelArtifact, TuneReport]:
    """Tune Q/DQ placement of a quantized model for TensorRT. Returns (new artefact, report of every change).

    Exact rewrites (always): duplicate QuantizeLinear nodes of one tensor with identical parameters are
    merged; a DequantizeLinear -> QuantizeLinear round trip with identical parameters is removed.
    By design (options): Q/DQ feeding graph outputs are removed (`outputs`); on a residual Add whose two
    inputs are both dequantized, the pair on the branch coming straight from a Conv is removed so TensorRT
    can fuse the Add into that Conv (`residual`); Concat inputs and output share the largest scale
    (`align_concat`); a MaxPool's output quantizer takes its input's scale (`align_pool`), so no requantize
    layer is needed. verify: SQNR of the tuned model against the input model on random inputs must stay
    above 15 dB (NumericalCheckError otherwise: a sanity check, since aligned scales change outputs).
    """
    import numpy as np
    from onnx import helper

    source = as_artifact(artifact, "qdq-tune model")
    label = str(source.source or "model")
    if not has_qdq(source.model):
        raise InputFileError(f"{label}: has no Q/DQ nodes; qdq-tune applies to a quantized model")
    result = source.copy()
    report = TuneReport()

    def name_of(node: Any) -> str:
        return str(node.name or node.output[0])

    # 1. duplicate quantizers of one tensor (exact)
    index = GraphIndex(result.model.graph)
    seen: dict[tuple[Any, ...], Any] = {}
    dead: list[Any] = []
    for node in list(index.graph.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        params = _qparams(result, index, node)
        if params is None or node.output[0] in index.outputs:
            continue
        key = (node.op_type, node.input[0], params)
        if key in seen:
            index.rewire(node.output[0], seen[key].output[0])
            dead.append(node)
            report.add("merge-duplicate", name_of(node), f"same {node.op_type} as {name_of(seen[key])}")
        else:
            seen[key] = node
    _remove_nodes(index, dead)

    # 2. DQ -> Q round trips with identical parameters (exact)
    index = GraphIndex(result.model.graph)
    dead = []
    for node in list(index.graph.node):
        if node.op_type != "QuantizeLinear" or node.output[0] in index.outputs:
            continue
        producer = index.producer.get(node.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        params = _qparams(result, index, node)
        if params is None or _qparams(result, index, producer) != params:
            continue
        if producer.input[0] in index.initializers:
            continue
        index.rewire(node.output[0], producer.input[0])
        dead.append(node)
        report.add("remove-requantize", name_of(node), f"{name_of(producer)} -> {name_of(node)} is an identity")
    _remove_nodes(index, dead)
    index = GraphIndex(result.model.graph)
    dead = [n for n in index.graph.node if n.op_type == "DequantizeLinear" and not index.consumers.get(n.output[0])
            and n.output[0] not in index.outputs and n.input[0] not in index.initializers]
    _remove_nodes(index, dead)

    def activation_pair(tensor: str) -> tuple[Any, Any] | None:
        """(Q, DQ) when `tensor` is the output of DQ(Q(x)) on an activation with per-tensor parameters."""
        dq = index.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in index.initializers:
            return None
        q = index.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or _per_tensor_scale(result, index, q) is None:
            return None
        return q, dq

    # 3. Q/DQ on graph outputs
    if outputs:
        index = GraphIndex(result.model.graph)
        for output in list(index.outputs):
            pair = activation_pair(output)
            if pair is None:
                continue
            q, dq = pair
            if len(index.consumers.get(q.output[0], [])) != 1:
                continue
            position = list(index.graph.node).index(dq)
            index.graph.node.insert(position, helper.make_node("Identity", [q.input[0]], [output],
                                                        name=f"{name_of(dq)}_unquantized"))
            _remove_nodes(index, [dq, q])
            report.add("unquantize-output", output, "graph outputs are not quantized (TensorRT rule)")

    # 4. residual Add: keep Q/DQ on the skip branch only
    if residual:
        index = GraphIndex(result.model.graph)
        for node in list(index.graph.node):
            if node.op_type != "Add" or len(node.input) != 2:
                continue
            pairs = [activation_pair(name) for name in node.input]
            if any(p is None for p in pairs):
                continue
            for slot, (q, dq) in enumerate(pairs):  # type: ignore[misc]
                producer = index.producer.get(q.input[0])
                if producer is None or producer.op_type != "Conv":
                    continue
                if any(len(index.consumers.get(name, [])) != 1 for name in (q.input[0], q.output[0], dq.output[0])):
                    continue
                node.input[slot] = q.input[0]
                _remove_nodes(index, [dq, q])
                report.add("residual-branch", name_of(node),
                           f"removed Q/DQ between {name_of(producer)} and the Add (TensorRT fuses them)")
                break

    def set_pair_scale(q: Any, scale: float, tag: str) -> None:
        """Give Q and every DQ reading it a new scale initializer (unshared)."""
        new = add_initializer(index, f"{q.input[0]}_{tag}_scale", np.array(scale, dtype=np.float32))
        q.input[1] = new
        for dq in index.readers(q.output[0]):
            if dq.op_type == "DequantizeLinear":
                dq.input[1] = new

    # 5. Concat: one shared scale
    if align_concat:
        index = GraphIndex(result.model.graph)
        for node in list(index.graph.node):
            if node.op_type != "Concat":
                continue
            pairs = [activation_pair(name) for name in node.input]
            users = index.readers(node.output[0])
            out_qs = [u for u in users
                      if u.op_type == "QuantizeLinear" and _per_tensor_scale(result, index, u) is not None]
            if any(p is None for p in pairs) or not out_qs:
                continue
            quantizers_ = [p[0] for p in pairs if p is not None] + out_qs
            scales = [_per_tensor_scale(result, index, q) for q in quantizers_]
            if len({s for s in scales}) == 1:
                continue
            shared = float(max(s for s in scales if s is not None))
            for q in quantizers_:
                set_pair_scale(q, shared, "concat")
            report.add("align-concat", name_of(node),
                       f"{len(quantizers_)} quantizers share scale {shared:.6g} (were {min(scales):.6g}.."  # type: ignore[type-var]
                       f"{shared:.6g})")

    # 6. MaxPool: output quantizer takes the input scale
    if align_pool:
        index = GraphIndex(result.model.graph)
        for node in list(index.graph.node):
            if node.op_type not in ("MaxPool", "GlobalMaxPool"):
                continue
            pair = activation_pair(node.input[0])
            if pair is None:
                continue
            in_scale = _per_tensor_scale(result, index, pair[1])
            for user in index.readers(node.output[0]):
                out_scale = _per_tensor_scale(result, index, user) if user.op_type == "QuantizeLinear" else None
                if out_scale is None or in_scale is None or out_scale == in_scale:
                    continue
                set_pair_scale(user, in_scale, "pool")
                report.add("align-pool", name_of(node), f"output scale {out_scale:.6g} -> input scale {in_scale:.6g}")

    if verify and report.changes:
        from trtkit.metrics import sqnr_db
        from trtkit.runtime import random_inputs, run, session

        feeds = random_inputs(source.model, seed=0)
        before = run(session(source), feeds)
        after = run(session(result), feeds)
        values = [sqnr_db(before[k], after[k]) for k in before if before[k].dtype.kind == "f"]
        report.sqnr_db = float(min(values)) if values else None
        if report.sqnr_db is not None and report.sqnr_db < 15.0:
            raise NumericalCheckError(f"qdq-tune: tuned model differs from {label} (SQNR {report.sqnr_db:.1f} dB)")
    result.metadata.setdefault("ptq", {})["qdq_tune"] = report.as_dict()
    return result, report
