"""Python API of the build stage: `trtkit.build(model, output, builder=None, **options) -> Path`.

    import trtkit
    trtkit.build("model.onnx")                                   # the default builder, default output name
    trtkit.build("model_qdq.onnx", "model.engine", builder=name, **options)
    trtkit.building.check("model.onnx", builder=name)            # capability report, no build
    trtkit.building.describe("model.engine")                     # what the builder recorded about it

The built-in builders and their options: docs/stages/build.md (`trtkit plugins` lists what is installed).

Options are validated against the builder's schema (unknown or ill-typed options are one-line errors).
What differs between builders is what they declare on their Builder (stages.py): `default` (used when no
builder is named), `suffix` (default output name), `check` (capability report), `describe` (an artefact's
sidecar or metadata). This module names no builder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BuildError, InputFileError, OptionError, TrtkitError
from .model import ModelArtifact, as_artifact
from .registry import get_registry
from .stages import Builder

if TYPE_CHECKING:
    import onnx


def get_builder(name: str | None = None) -> Builder:
    """The registered builder `name`, or the default builder for None (UnknownNameError listing close matches)."""
    return get_registry().builder(name if name is not None else default_builder())


def default_builder() -> str:
    """Name of the builder used when none is named: the first registered one marked `default=True`."""
    for name, component in get_registry().stages["builders"].items():
        if component.default:
            return name
    raise OptionError("no installed builder is marked as the default one: name a builder")


def default_output(model: str | os.PathLike[str], builder: str | None = None) -> Path:
    """`model.onnx` -> `model<suffix>` with the builder's `suffix` (e.g. `model.ort.onnx`), else `model.<builder>.engine`."""
    model = Path(model)
    component = get_builder(builder)
    return model.with_name(f"{model.stem}{component.suffix or f'.{component.name}.engine'}")


def _usable(builder: str | None) -> Builder:
    component = get_builder(builder)
    reason = component.available()
    if reason:
        raise BuildError(f"builder '{component.name}' is not usable here: {reason}")
    return component


def build(model: str | os.PathLike[str] | ModelArtifact | onnx.ModelProto,
          output: str | os.PathLike[str] | None = None, builder: str | None = None, **options: Any) -> Path:
    """Build `model` (a .onnx path, a ModelArtifact or a ModelProto) with the named builder (None: the default
    one); returns the written artefact.

    Raises UnknownNameError for unknown builders, OptionError for bad or contradictory options, BuildError
    when the builder is not usable here (with the reason) or the build fails.
    """
    component = _usable(builder)
    resolved = component.resolve_options(options)
    if not isinstance(model, (str, os.PathLike)):  # in memory: builders read files, so it is staged as one
        artifact = as_artifact(model, "build: model")
        if output is None:
            if artifact.source is None:
                raise OptionError("build: give an output path for an in-memory model")
            output = default_output(artifact.source, component.name)
        with tempfile.TemporaryDirectory(prefix="trtkit-build-") as folder:
            stem = artifact.source.stem if artifact.source is not None else "model"
            staged = artifact.save(Path(folder) / f"{stem}.onnx")
            return Path(component.build(staged, output, **resolved))
    path = Path(model)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.suffix == ".onnx":
        ModelArtifact.load(path)  # one-line errors for damaged files or opsets this install cannot handle
    out = Path(output) if output is not None else default_output(path, component.name)
    return Path(component.build(path, out, **resolved))


def check(model: str | os.PathLike[str], builder: str | None = None) -> dict[str, Any]:
    """The builder's capability report for `model` without building (None: the default builder): e.g. for
    an engine builder the nodes its parser cannot import, by ONNX name and op type.

    OptionError when the builder declares no `check`.
    """
    component = _usable(builder)
    if component.check is None:
        raise OptionError(f"builder '{component.name}' has no capability check")
    return component.check(Path(model))


def describe(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    """What a built artefact is: the build metadata of an ONNX model, or what the builder that made it reads
    from its sidecar/metadata (the first builder whose `describe` takes it)."""
    path = Path(artifact)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.suffix.lower() == ".onnx":
        return {"artifact": str(path), "kind": "onnx", **ModelArtifact.load(path).metadata}
    first_error: TrtkitError | None = None
    for component in get_registry().stages["builders"].values():
        if not isinstance(component, Builder) or component.describe is None:
            continue
        try:
            info = component.describe(path)
        except TrtkitError as exc:
            first_error = first_error or exc
            continue
        if info is not None:
            return {"artifact": str(path), **info}
    if first_error is not None:
        raise first_error
    raise InputFileError(f"{path}: no installed builder can describe this artefact")


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
