"""Graph utilities shared by the graph passes: onnx-graphsurgeon round trips, folding, op counts.

Large weights stay lazy: `editable(artifact)` copies the model without its external data (only tensors under
LAZY_MIN_BYTES are read inline), `to_gs(model, base_dir)` turns every remaining external initializer into a
graphsurgeon Constant whose values are read from disk only if a pass asks for them, and `from_gs` exports
untouched ones as the same external references. So a pass over a model above the 2 GB protobuf limit holds
only the tensors it rewrites; `ModelArtifact.save` then streams the rest from the source data file.

A graph pass is usually one call to `rewrite(artifact, edit)`: it makes the editable copy, imports it with
lazy weights, lets `edit(graph)` change the graphsurgeon graph in place, refolds, exports and wraps the result
as a new ModelArtifact. The helpers below it (constant_value, new_constant, fresh_name, single_consumer,
bypass, ...) are what the built-in passes use inside their edits.

Heavy modules (onnx, onnx_graphsurgeon, numpy) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Container, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

    from .model import ModelArtifact

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
# External tensors smaller than this are read into the working copy of a model (shape tensors, biases: what
# shape inference, data propagation and folding need); larger ones stay on disk until a pass reads them.
LAZY_MIN_BYTES = 1 << 20
# Constant folding evaluates subgraphs in onnxruntime: lazy weights up to this size are read for it; a
# foldable subgraph that reads a larger one is left unfolded (it would pull the weight into memory twice).
FOLD_SIZE_THRESHOLD = 64 << 20
# At most this many bytes of lazy weights are read for one folding round (onnxruntime holds what it folds
# several times over); foldable subgraphs reading further lazy weights wait for the next round or stay as
# they are. A Transpose of a lazy weight is folded in numpy instead, one weight at a time, without limit.
FOLD_LOAD_BUDGET = 256 << 20


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


def editable(artifact: ModelArtifact, inline_below: int | None = None) -> onnx.ModelProto:
    """A copy of the artefact's model for rewriting, external data NOT loaded: only external tensors smaller
    than `inline_below` bytes (default LAZY_MIN_BYTES) are read inline; the others stay references into
    `artifact.base_dir`."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from .model import _all_tensors, _external_info

    if inline_below is None:
        inline_below = LAZY_MIN_BYTES
    model = onnx.ModelProto()
    model.CopyFrom(artifact.model)
    for tensor in _all_tensors(model):
        if uses_external_data(tensor) and int(_external_info(tensor).get("length", inline_below)) < inline_below:
            tensor.CopyFrom(numpy_helper.from_array(artifact.tensor(tensor), tensor.name))
    return model


@functools.cache
def _external_values_type() -> type:
    from onnx_graphsurgeon.ir.tensor import LazyValues

    class ExternalValues(LazyValues):  # type: ignore[misc]
        """graphsurgeon LazyValues of a tensor held in external data: read from `base_dir` on demand.

        Exported as the original TensorProto (its external-data reference) as long as nobody reads it.
        """

        def __init__(self, tensor: Any, base_dir: str | None) -> None:
            super().__init__(tensor)
            self.base_dir = base_dir

        def load(self) -> Any:
            from pathlib import Path

            import onnx

            from .model import ModelArtifact

            reader = ModelArtifact(onnx.ModelProto(), Path(self.base_dir) if self.base_dir else None)
            return reader.tensor(self.tensor)  # errors name the data file and the tensor

    return ExternalValues


def is_lazy(tensor: Any) -> bool:
    """True for a graphsurgeon Constant whose values are still on disk (not read by anyone yet)."""
    return isinstance(getattr(tensor, "_values", None), _external_values_type())


def _graphs(graph: Any) -> Iterator[Any]:
    """The graph and every subgraph in node attributes (If/Loop/Scan bodies), depth first."""
    import onnx_graphsurgeon as gs

    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from _graphs(sub)


def to_gs(model: onnx.ModelProto, base_dir: Any = None) -> Any:
    """Import into onnx-graphsurgeon. External tensors (of a model whose data lives in `base_dir`) become
    Constants with lazy values: read only when a pass asks for `.values`, exported untouched otherwise."""
    from onnx.external_data_helper import uses_external_data

    with quiet_gs() as gs:
        graph = gs.import_onnx(model)
        from onnx_graphsurgeon.ir.tensor import LazyValues

        external = _external_values_type()
        base = str(base_dir) if base_dir is not None else None

        def wrap(constant: Any) -> None:
            values = constant._values
            if isinstance(values, LazyValues) and not isinstance(values, external) and \
                    uses_external_data(values.tensor):
                constant._values = external(values.tensor, base)

        for sub in _graphs(graph):
            for tensor in sub.tensors().values():
                if isinstance(tensor, gs.Constant):
                    wrap(tensor)
            for node in sub.nodes:
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        wrap(value)
        return graph


def from_gs(graph: Any, like: onnx.ModelProto, move_big: bool = False) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the model-level fields (opsets, IR version, metadata) of `like`.

    move_big: the main graph's in-memory constants of LAZY_MIN_BYTES or more are moved into the model instead
    of copied (graphsurgeon's exporter copies each tensor three times over, which a pass that rewrote a
    gigabyte of weights cannot afford); the graph must not be used afterwards.
    """
    moved: dict[str, Any] = {}
    if move_big:
        moved = _stub_big_constants(graph)
    collect = bool(moved)
    with quiet_gs() as gs:
        model = gs.export_onnx(graph, do_type_check=False)
    for tensor in model.graph.initializer:
        array = moved.pop(tensor.name, None)
        if array is not None:
            tensor.raw_data = array if isinstance(array, bytes) else array.tobytes()
            del array
    if collect:
        import gc

        gc.collect()  # graph copies left by constant folding (reference cycles) still hold the moved arrays
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


_RAW_KINDS = "fiub"


def _stub_big_constants(graph: Any) -> dict[str, Any]:
    """Swap the values of big in-memory constants of the main graph for data-less TensorProto stubs; returns
    name -> array, or bytes for a tensor still in its inline TensorProto (the caller writes each into the
    exported initializer, then drops it)."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from .model import _copy_field

    moved: dict[str, Any] = {}
    for tensor in graph.tensors().values():
        values: Any = getattr(tensor, "_values", None)
        if isinstance(tensor, gs.Constant) and type(values) is LazyValues and tensor.name not in moved:
            proto = values.tensor  # an inline initializer nobody read: its bytes are taken as they are
            if proto.HasField("raw_data") and not proto.external_data and proto.ByteSize() >= LAZY_MIN_BYTES:
                stub = onnx.TensorProto()
                for descriptor, value in proto.ListFields():
                    if descriptor.name != "raw_data":
                        _copy_field(stub, descriptor, value)
                moved[tensor.name] = proto.raw_data
                tensor._values = LazyValues(stub)
            continue
        if not isinstance(tensor, gs.Constant) or not isinstance(values, np.ndarray):
            continue
        if values.nbytes < LAZY_MIN_BYTES or values.dtype.kind not in _RAW_KINDS or tensor.name in moved:
            continue
        try:
            data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
        except Exception:
            continue
        stub = onnx.TensorProto(name=tensor.name, data_type=data_type, dims=list(values.shape))
        moved[tensor.name] = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        tensor._values = LazyValues(stub)
    return moved


def fold_and_clean(graph: Any, fold: bool = True) -> Any:
    """Constant-fold (onnxruntime-evaluated, shapes included), drop dead nodes and sort, in place.

    Lazy (external) weights: those feeding a foldable subgraph are read if at most FOLD_SIZE_THRESHOLD bytes;
    every other lazy weight is hidden from the folder for its duration (so onnxruntime is never handed an
    external reference it cannot resolve, and big weights are never pulled into memory by folding).
    """
    with quiet_gs():
        if fold:
            with contextlib.suppress(Exception):
                import onnxruntime

                onnxruntime.set_default_logger_severity(3)  # folding sessions must not spam the console
            hidden = _prepare_lazy_for_folding(graph)
            try:
                with contextlib.suppress(Exception):  # folding is best effort: never break the model
                    graph.fold_constants(fold_shapes=True, recurse_subgraphs=True, error_ok=True,
                                         size_threshold=FOLD_SIZE_THRESHOLD)
            finally:
                _restore_hidden(graph, hidden)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return graph


def _foldable_nodes(graphs: list[Any]) -> set[int]:
    """ids of nodes that constant folding may evaluate: every input a constant, the output of such a node, or
    (Shape) a tensor of static shape. A superset is harmless here; it only decides which lazy weights to read."""
    import onnx_graphsurgeon as gs

    nodes = [node for sub in graphs for node in sub.nodes]
    foldable: set[int] = set()
    constant: set[int] = set()
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if id(node) in foldable:
                continue
            if node.op == "Shape" and node.inputs and node.inputs[0].shape is not None and all(
                    isinstance(d, int) and d >= 0 for d in node.inputs[0].shape):
                ok = True
            else:
                ok = all(isinstance(t, gs.Constant) or id(t) in constant or not t.name for t in node.inputs)
            if ok:
                foldable.add(id(node))
                constant.update(id(t) for t in node.outputs)
                changed = True
    return foldable


def _prepare_lazy_for_folding(graph: Any) -> list[tuple[Any, Any, list[Any]]]:
    """Read the lazy weights folding needs (small enough); swap every other lazy weight for a placeholder
    Variable of the same name, dtype and shape. Returns what `_restore_hidden` needs to undo the swap."""
    import onnx_graphsurgeon as gs

    graphs = list(_graphs(graph))
    # Constant nodes whose value is external: lower them to Constant tensors now (fold_constants would do it
    # first thing anyway), so that they are handled like initializers below.
    for sub in graphs:
        for node in sub.nodes:
            value = node.attrs.get("value") if node.op == "Constant" and len(node.attrs) == 1 else None
            if isinstance(value, gs.Constant) and is_lazy(value) and len(node.outputs) == 1:
                out = node.outputs[0]
                out.to_constant(value._values)
                out.inputs.clear()
    lazy: dict[int, Any] = {}
    for sub in graphs:
        for tensor in sub.tensors().values():
            if is_lazy(tensor):
                lazy.setdefault(id(tensor), tensor)
    if not lazy:
        return []
    for tensor in list(lazy.values()):
        if _transpose_lazy(tensor, graphs):
            del lazy[id(tensor)]
    foldable = _foldable_nodes(graphs)
    hidden = []
    budget = FOLD_LOAD_BUDGET
    for tensor in lazy.values():
        size = tensor._values.nbytes
        if any(id(node) in foldable for node in tensor.outputs) and size <= min(FOLD_SIZE_THRESHOLD, budget):
            tensor.values = tensor._values.load()
            budget -= size
            continue
        placeholder = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
        redirect_consumers(tensor, placeholder)
        outputs = [(sub, i) for sub in graphs for i, out in enumerate(sub.outputs) if out is tensor]
        for sub, i in outputs:
            sub.outputs[i] = placeholder
        hidden.append((tensor, placeholder, outputs))
    return hidden


def _transpose_lazy(tensor: Any, graphs: list[Any]) -> bool:
    """Fold Transpose nodes whose only input is the lazy weight `tensor` in numpy (their outputs become
    constants; the weight is read once). True when that leaves `tensor` unused."""
    import numpy as np

    consumers = [node for node in tensor.outputs if node.op == "Transpose" and len(node.inputs) == 1
                 and len(node.outputs) == 1 and node.domain in (None, "", "ai.onnx")]
    if not consumers:
        return False
    outputs = {id(out) for sub in graphs for out in sub.outputs}
    consumers = [node for node in consumers if id(node.outputs[0]) not in outputs]
    if not consumers:
        return False
    values = tensor._values.load()
    for node in consumers:
        perm = node.attrs.get("perm")
        if perm is None:
            perm = list(reversed(range(values.ndim)))
        if sorted(int(p) for p in perm) != list(range(values.ndim)):
            continue  # invalid permutation: leave the node to onnxruntime (which will refuse it)
        out = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        out.to_constant(np.ascontiguousarray(np.transpose(values, [int(p) for p in perm])))
    return not tensor.outputs


def _restore_hidden(graph: Any, hidden: list[tuple[Any, Any, list[Any]]]) -> None:
    for tensor, placeholder, outputs in hidden:
        redirect_consumers(placeholder, tensor)
        for sub, i in outputs:
            if i < len(sub.outputs) and sub.outputs[i] is placeholder:
                sub.outputs[i] = tensor


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """onnx shape inference with data propagation; on failure returns the model unchanged (unless strict).

    A model holding big tensors in memory is inferred as a skeleton (those tensors without their bytes) and
    gets them back afterwards: onnx would otherwise serialize and parse it whole, twice.
    """
    import onnx

    skeleton, big = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=strict, data_prop=True)
    except Exception:
        if strict:
            raise
        return model
    if big:
        inferred.graph.ClearField("initializer")
        inferred.graph.initializer.extend(model.graph.initializer)
    return inferred


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(model, False), or, when top-level initializers of LAZY_MIN_BYTES or more are inline, (a copy with those
    initializers reduced to name, type and shape, True)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from .model import _copy_field

    big = {i for i, t in enumerate(model.graph.initializer)
           if not uses_external_data(t) and t.ByteSize() >= LAZY_MIN_BYTES}
    if not big:
        return model, False
    skeleton = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(skeleton, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(skeleton.graph, descriptor, value)
    for index, tensor in enumerate(model.graph.initializer):
        if index in big:
            stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            stub.external_data.add(key="location", value="trtkit-skeleton")  # never read: no data needed
            stub.data_location = onnx.TensorProto.EXTERNAL
        else:
            skeleton.graph.initializer.add().CopyFrom(tensor)
    return skeleton, True


def rewrite(artifact: ModelArtifact, edit: Callable[[Any], object], *, fold: bool = True,
            model: onnx.ModelProto | None = None) -> ModelArtifact:
    """The round trip of a graph pass: `edit(graph)` changes an onnx-graphsurgeon copy of the artefact's
    model in place; the result comes back as a new ModelArtifact (same base_dir and source, a copy of the
    metadata). The input artefact is never modified.

    Big external weights stay lazy throughout: the copy is `editable(artifact)` (or `model`, an editable copy
    the caller prepared, e.g. shape-inferred), a weight is read from disk only if the edit asks for its
    values, and untouched weights are exported as the same external references. After the edit the graph is
    constant-folded (`fold=False`: only dead nodes removed) and sorted; rewritten big weights are moved into
    the exported model, not copied.
    """
    from .model import ModelArtifact

    if model is None:
        model = editable(artifact)
    graph = to_gs(model, artifact.base_dir)
    edit(graph)
    fold_and_clean(graph, fold=fold)
    new_model = from_gs(graph, model, move_big=True)
    return ModelArtifact(new_model, artifact.base_dir, dict(artifact.metadata), artifact.source)


def rewrite_model(artifact: ModelArtifact, edit: Callable[[onnx.ModelProto], onnx.ModelProto], *,
                  inline_below: int | None = None) -> ModelArtifact:
    """`rewrite` for tools that take and return a whole onnx.ModelProto (onnxslim, onnxsim, ...): `edit`
    gets an editable copy of the artefact's model and returns the rewritten model, which comes back as a new
    ModelArtifact (same base_dir and source, a copy of the metadata). The input artefact is never modified.

    External tensors under `inline_below` bytes (default LAZY_MIN_BYTES) are read into the copy; bigger ones
    stay references into `artifact.base_dir`, which a tool that reads every weight cannot follow: such a
    tool should refuse models with external data (`artifact.has_external_data()`) or raise `inline_below`.
    """
    from .model import ModelArtifact

    new_model = edit(editable(artifact, inline_below))
    return ModelArtifact(new_model, artifact.base_dir, dict(artifact.metadata), artifact.source)


def new_constant(name: str, array: Any) -> Any:
    """A graphsurgeon Constant holding a contiguous copy of `array` (numpy)."""
    import numpy as np
    import onnx_graphsurgeon as gs

    return gs.Constant(name, np.ascontiguousarray(array))


def unique_name(base: str, taken: Container[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first one not in `taken`. The one unique-name rule of trtkit
    (GraphIndex.fresh_name for ONNX protos, fresh_name for graphsurgeon graphs)."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def fresh_name(graph: Any, base: str) -> str:
    """A name no tensor or node of the graphsurgeon graph uses yet (reserved once something carries it)."""
    taken = set(graph.tensors().keys()) | {node.name for node in graph.nodes}
    return unique_name(base, taken)


def static_shape(tensor: Any) -> tuple[int, ...] | None:
    """The shape of a graphsurgeon tensor when every dimension is a known int, else None."""
    shape = getattr(tensor, "shape", None)
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return tuple(shape)


def has_control_flow(model: onnx.ModelProto) -> bool:
    return any(node.op_type in CONTROL_FLOW_OPS for node in model.graph.node)


def constant_value(tensor: Any) -> Any:
    """The numpy value of a graphsurgeon tensor if it is a constant (or a Constant node's output), else None."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        if is_lazy(tensor):  # read from disk for this use only: a pass that rewrites it makes a new constant
            return tensor._values.load()
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value._values.load() if is_lazy(value) else value.values
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


class GraphIndex:
    """Producer, consumers and fresh names of one ONNX graph: the index every proto-level rewrite needs.

    producer[name] is the node writing tensor `name`; consumers[name] lists (node, input slot) pairs reading it.
    Node objects are the graph's own protos, so edits through them land in the model. The index reflects the
    graph when built; code that rewires tensors updates it with `rewire` or builds a new one.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, slot))
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        self._used = (set(self.producer) | set(self.initializers) | self.inputs | self.outputs
                      | {n.name for n in graph.node if n.name})

    def is_constant(self, name: str) -> bool:
        """An initializer or the output of a Constant node."""
        return name in self.initializers or name in self.constants

    def is_activation(self, name: str) -> bool:
        return bool(name) and not self.is_constant(name)

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return [node for node, _ in self.consumers.get(name, [])]

    def single_use(self, name: str) -> bool:
        """Read by exactly one node and not a graph output (so rewriting it affects nobody else)."""
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs

    def fresh_name(self, base: str) -> str:
        """A tensor/node name not used anywhere in the graph yet (whitespace becomes '_'); reserved on return."""
        import re

        name = unique_name(re.sub(r"\s+", "_", base), self._used)
        self._used.add(name)
        return name

    def rewire(self, old: str, new: str) -> None:
        """Make every reader of `old` read `new` instead (graph outputs are renamed by the caller)."""
        for node, slot in self.consumers.pop(old, []):
            node.input[slot] = new
            self.consumers.setdefault(new, []).append((node, slot))
