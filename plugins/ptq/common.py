"""What the PTQ passes share: weight values on top of trtkit.graph.GraphIndex, node attributes, Q/DQ test.

The passes edit the artefact's ONNX protos directly (no graphsurgeon round trip: they change a few
initializers and Q/DQ nodes of a model whose structure stays as it is). numpy and onnx are imported inside
the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from trtkit.graph import GraphIndex
    from trtkit.model import ModelArtifact


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of a node attribute, or `default` when the node does not set it."""
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def constant_array(artifact: ModelArtifact, index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output (external data read on demand), else None."""
    from onnx import numpy_helper

    if name in index.initializers:
        return artifact.tensor(index.initializers[name])
    node = index.constants.get(name)
    if node is not None:
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def initializer_array(artifact: ModelArtifact, index: GraphIndex, name: str) -> np.ndarray:
    """The value of an initializer known to exist."""
    return artifact.tensor(index.initializers[name])


def set_initializer(index: GraphIndex, name: str, value: np.ndarray) -> None:
    """Replace an initializer's value in place (the graph belongs to a copy the pass made)."""
    from onnx import numpy_helper

    index.initializers[name].CopyFrom(numpy_helper.from_array(value, name))


def set_constant(index: GraphIndex, name: str, value: np.ndarray) -> None:
    """Replace the value of an initializer or of a Constant node's output in place (what `constant_array`
    reads)."""
    from onnx import numpy_helper

    if name in index.initializers:
        set_initializer(index, name, value)
        return
    for attr in index.constants[name].attribute:
        if attr.name == "value":
            attr.t.CopyFrom(numpy_helper.from_array(value, name))


def add_initializer(index: GraphIndex, base: str, value: np.ndarray) -> str:
    """Add an initializer under a fresh name derived from `base`; returns the name."""
    from onnx import numpy_helper

    name = index.fresh_name(base)
    index.graph.initializer.append(numpy_helper.from_array(value, name))
    index.initializers[name] = index.graph.initializer[-1]
    return name


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
