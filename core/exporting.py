"""Export a trained model to ONNX through a registered exporter (by default the one marked `default=True`).

    import trtkit
    artifact = trtkit.export("trtkit.examples.digits:factory", "digits.onnx",
                             input_shapes={"image": [1, 1, 8, 8]}, output_names=["logits"], dynamic_batch=True)
    artifact.metadata["export"]["max_abs_diff"]     # onnxruntime vs torch on the same random input

source: a torch.nn.Module, or a spec `file.py:factory` / `package.module:factory` naming a callable that
returns one. Options are the exporter's (see `trtkit plugins` / docs/stages/export.md); they are validated
against its schema, so a misspelt option is a one-line error with close matches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import ModelArtifact
    from .registry import Registry


def export(
    source: Any,
    output: str | os.PathLike[str],
    *,
    exporter: str | None = None,
    input_shapes: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    opset: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    method: str | None = None,
    options: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    **extra: Any,
) -> ModelArtifact:
    """Export `source` to `output` (written atomically) and return the checked ModelArtifact.

    exporter: the exporter's name (None: the default exporter).

    input_shapes: one shape ([1, 3, 224, 224] or "1x3x224x224"), a list of them, or {name: shape}.
    dynamic_batch: axis 0 of every input and output becomes "batch"; dynamic_axes: torch-style mapping.
    method: the torch exporter to use ("auto", "dynamo" or "torchscript"; auto = dynamo when onnxscript is
    installed). options (or extra keyword arguments): any further exporter options, e.g. input_range, rtol,
    seed (validated by the exporter's schema, so a misspelt name is an error with close matches).
    """
    from .errors import OptionError
    from .registry import get_registry

    registry = registry or get_registry()
    component = registry.exporter(exporter if exporter is not None else registry.default("exporters").name)
    given: dict[str, Any] = dict(options or {})
    for key, value in extra.items():
        if key in given and given[key] != value:
            raise OptionError(f"option '{key}' given twice with different values")
        given[key] = value
    if isinstance(input_shapes, Mapping):
        if input_names is not None and list(input_names) != list(input_shapes):
            raise OptionError("input_names and the keys of input_shapes differ")
        input_names = [str(k) for k in input_shapes]
        input_shapes = [_shape_text(v) for v in input_shapes.values()]
    elif input_shapes is not None:
        if isinstance(input_shapes, (str, bytes)) or (
            isinstance(input_shapes, (list, tuple)) and input_shapes and all(isinstance(d, int) for d in input_shapes)
        ):
            input_shapes = [input_shapes]
        input_shapes = [_shape_text(v) for v in input_shapes]
    explicit = {
        "input_shapes": input_shapes, "input_names": input_names, "output_names": output_names,
        "dynamic_batch": dynamic_batch, "dynamic_axes": dict(dynamic_axes) if dynamic_axes is not None else None,
        "opset": opset, "checkpoint": os.fspath(checkpoint) if checkpoint is not None else None, "exporter": method,
    }
    for key, value in explicit.items():
        if value is None:
            continue
        if key in given and given[key] != value:
            raise OptionError(f"option '{key}' given twice with different values")
        given[key] = list(value) if isinstance(value, tuple) else value
    resolved = component.resolve_options(given, where=f"exporter '{component.name}'")
    return component.export(source, output, **resolved)


def _shape_text(shape: Any) -> str:
    if isinstance(shape, str):
        return shape
    return "x".join(str(int(d)) for d in shape)
