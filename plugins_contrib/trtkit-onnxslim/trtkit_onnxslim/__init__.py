"""trtkit plugin: the `onnxslim` graph pass.

It uses nothing but trtkit's public plugin API (hookimpl, trtkit.stages, trtkit.graph.rewrite_model),
exactly as any third-party plugin would. onnxslim is imported only when the pass runs, so `trtkit --help`
stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trtkit import hookimpl
from trtkit.errors import OptionError
from trtkit.graph import rewrite_model
from trtkit.stages import GraphPass, Option

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact

__version__ = "0.1.0"


def slim(
    artifact: ModelArtifact,
    skip_fusion_patterns: list[str] | None = None,
    no_shape_infer: bool = False,
    size_threshold: int | None = None,
) -> ModelArtifact:
    """Run onnxslim on a copy of the model; the input artefact is left untouched."""
    import onnxslim

    if artifact.has_external_data():  # onnxslim reads every weight; it cannot follow external references
        raise OptionError("pass 'onnxslim' cannot rewrite models with external data; use 'simplify' instead")
    kwargs: dict[str, Any] = {"no_shape_infer": no_shape_infer}
    if skip_fusion_patterns:
        kwargs["skip_fusion_patterns"] = list(skip_fusion_patterns)
    if size_threshold is not None:
        kwargs["size_threshold"] = size_threshold
    return rewrite_model(artifact, lambda model: onnxslim.slim(model, **kwargs))


ONNXSLIM = GraphPass(
    name="onnxslim",
    description="onnxslim: constant folding, dead-node removal and its fusion patterns",
    options={
        "skip_fusion_patterns": Option("list", None, "onnxslim fusion patterns to skip"),
        "no_shape_infer": Option("bool", False, "skip onnxslim's shape inference"),
        "size_threshold": Option("int", None, "do not fold constants larger than this many bytes"),
    },
    apply=slim,
)


@hookimpl
def register_passes(register: Any) -> None:
    register(ONNXSLIM)
