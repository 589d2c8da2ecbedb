"""Graph utilities shared by the graph passes: onnx-graphsurgeon round trips, folding, op counts.

Heavy modules (onnx, onnx_graphsurgeon, numpy) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

    from .model import ModelArtifact

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type in the main graph (sorted by op type)."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


@contextlib.contextmanager
def quiet_gs() -> Iterator[Any]:
    """onnx-graphsurgeon with its logger reduced to errors (it warns loudly about things we handle)."""
    import onnx_graphsurgeon as gs

    logger = gs.logger.G_LOGGER
    previous = logger.severity
    logger.severity = logger.ERROR
    try:
        yield gs
    finally:
        logger.severity = previous


def materialized(artifact: ModelArtifact) -> onnx.ModelProto:
    """A copy of the artefact's model with external tensors read into memory (for rewriting)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.ModelProto()
    model.CopyFrom(artifact.model)
    if artifact.has_external_data():
        from onnx import numpy_helper

        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                array = artifact.tensor(tensor.name)
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


def to_gs(model: onnx.ModelProto) -> Any:
    with quiet_gs() as gs:
        return gs.import_onnx(model)


def from_gs(graph: Any, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the model-level fields (opsets, IR version, metadata) of `like`."""
    with quiet_gs() as gs:
        model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)
    return model


def fold_and_clean(graph: Any, fold: bool = True) -> Any:
    """Constant-fold (onnxruntime-evaluated, shapes included), drop dead nodes and sort, in place."""
    with quiet_gs():
        if fold:
            with contextlib.suppress(Exception):
                import onnxruntime

                onnxruntime.set_default_logger_severity(3)  # folding sessions must not spam the console
            with contextlib.suppress(Exception):  # folding is best effort: never break the model
                graph.fold_constants(fold_shapes=True, recurse_subgraphs=True, error_ok=True,
                                     size_threshold=64 << 20)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return graph


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """onnx shape inference with data propagation; on failure returns the model unchanged (unless strict)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=strict, data_prop=True)
    except Exception:
        if strict:
            raise
        return model


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(node.op_type in CONTROL_FLOW_OPS for node in model.graph.node)


def constant_value(tensor: Any) -> Any:
    """The numpy value of a graphsurgeon tensor if it is a constant (or a Constant node's output), else None."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def single_consumer(tensor: Any, graph: Any) -> Any:
    """The one node consuming `tensor`, or None (several consumers, none, or it is a graph output)."""
    if len(tensor.outputs) != 1 or any(out is tensor for out in graph.outputs):
        return None
    return tensor.outputs[0]


def is_graph_output(tensor: Any, graph: Any) -> bool:
    return any(out is tensor for out in graph.outputs)


def redirect_consumers(old: Any, new: Any) -> None:
    """Make every node that reads tensor `old` read tensor `new` instead (graphsurgeon tensors)."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def bypass(node: Any, graph: Any, keep: Any = None) -> bool:
    """Remove a single-output node by connecting its consumers to `keep` (its first input by default).

    If the node's output is a graph output, the surviving tensor takes over the output's name (so the model's
    interface is unchanged) when that is possible; returns False (node kept) when it is not.
    """
    source = node.inputs[0] if keep is None else keep
    output = node.outputs[0]
    if is_graph_output(output, graph):
        if is_graph_output(source, graph) or any(inp is source for inp in graph.inputs) or not source.inputs:
            return False
        if len(source.outputs) > 1:  # the source is used elsewhere under its own name: rename is still fine
            pass
        index = next(i for i, out in enumerate(graph.outputs) if out is output)
        name = output.name
        output.name = name + "__bypassed"
        source.name = name
        if output.dtype is not None:
            source.dtype = output.dtype
        source.shape = output.shape if output.shape is not None else source.shape
        graph.outputs[index] = source
    redirect_consumers(output, source)
    node.outputs.clear()
    node.inputs.clear()
    return True
