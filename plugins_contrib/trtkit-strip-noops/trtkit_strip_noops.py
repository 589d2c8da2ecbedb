"""trtkit graph pass `strip-noops`: remove nodes that do nothing at inference (Identity, Dropout)."""

from trtkit import hookimpl
from trtkit.graph import bypass, rewrite
from trtkit.stages import GraphPass, Option


def strip_noops(artifact, ops=("Identity", "Dropout")):
    """A new artefact without the nodes of type `ops`; the input artefact is left untouched."""

    def edit(graph):  # an onnx-graphsurgeon graph, edited in place
        for node in list(graph.nodes):
            mask_used = len(node.outputs) > 1 and node.outputs[1].outputs  # Dropout's optional mask
            if node.op in ops and node.inputs and not mask_used:
                bypass(node, graph)  # consumers read the node's input; a graph output keeps its name

    # fold=False: only the bypassed nodes go, nothing else is constant-folded
    return rewrite(artifact, edit, fold=False)


@hookimpl
def register_passes(register):
    register(GraphPass(
        name="strip-noops",
        description="remove Identity and Dropout nodes (no-ops at inference)",
        options={"ops": Option("list", ["Identity", "Dropout"], "op types to remove")},
        apply=strip_noops,  # exact (the default): `trtkit optimize` checks the outputs are unchanged
    ))
