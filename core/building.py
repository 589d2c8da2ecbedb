"""Python API of the build stage: `trtkit.build(model, output, builder="onnxruntime", **options) -> Path`.

    import trtkit
    trtkit.build("model.onnx", "model_ort.onnx")                                   # onnxruntime, CPU
    trtkit.build("model_qdq.onnx", "model.engine", builder="tensorrt-rtx",
                 max_shapes="image:32x1x8x8", timing_cache="rtx.cache")            # engine + model.engine.json
    trtkit.building.check("model.onnx", builder="tensorrt-rtx")["unsupported"]    # parser capability

Options are validated against the builder's schema (unknown or ill-typed options are one-line errors).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import BuildError, InputFileError, OptionError
from .model import ModelArtifact
from .registry import get_registry
from .stages import Builder

DEFAULT_BUILDER = "onnxruntime"
TRT_BUILDERS = ("tensorrt", "tensorrt-rtx")


def get_builder(name: str) -> Builder:
    """The registered builder `name` (UnknownNameError listing close matches otherwise)."""
    return get_registry().builder(name)


def default_output(model: str | os.PathLike[str], builder: str) -> Path:
    """`model.onnx` -> `model.ort.onnx` (onnxruntime) or `model.<builder>.engine` (engines)."""
    model = Path(model)
    if builder == "onnxruntime":
        return model.with_name(f"{model.stem}.ort.onnx")
    return model.with_name(f"{model.stem}.{builder}.engine")


def build(model: str | os.PathLike[str] | ModelArtifact, output: str | os.PathLike[str] | None = None,
          builder: str = DEFAULT_BUILDER, **options: Any) -> Path:
    """Build `model` (a .onnx path or a ModelArtifact) with the named builder; returns the written artefact.

    Raises UnknownNameError for unknown builders, OptionError for bad or contradictory options, BuildError
    when the builder is not usable here (with the reason) or the build fails.
    """
    component = get_builder(builder)
    reason = component.available()
    if reason:
        raise BuildError(f"builder '{builder}' is not usable here: {reason}")
    resolved = component.resolve_options(options)
    if isinstance(model, ModelArtifact):
        if output is None:
            if model.source is None:
                raise OptionError("build: give an output path for an in-memory model")
            output = default_output(model.source, builder)
        with tempfile.TemporaryDirectory(prefix="trtkit-build-") as folder:
            stem = model.source.stem if model.source is not None else "model"
            staged = model.save(Path(folder) / f"{stem}.onnx")
            return Path(component.build(staged, output, **resolved))
    path = Path(model)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.suffix == ".onnx":
        ModelArtifact.load(path)  # one-line errors for damaged files or opsets this install cannot handle
    out = Path(output) if output is not None else default_output(path, builder)
    return Path(component.build(path, out, **resolved))


def check(model: str | os.PathLike[str], builder: str = "tensorrt-rtx") -> dict[str, Any]:
    """Parser capability report for a TensorRT builder: nodes it cannot import, by ONNX name and op type.

    For the onnxruntime builder it reports whether onnxruntime can load the model.
    """
    component = get_builder(builder)
    reason = component.available()
    if reason:
        raise BuildError(f"builder '{builder}' is not usable here: {reason}")
    if builder in TRT_BUILDERS:
        from .plugins.tensorrt.parser import check_capability

        return check_capability(builder, model)
    from .runtime import session

    path = Path(model)
    try:
        session(path, optimization="disable")
    except InputFileError as exc:
        return {"model": str(path), "builder": builder, "supported": False, "unsupported": [],
                "error": str(exc)}
    return {"model": str(path), "builder": builder, "supported": True, "unsupported": []}


def describe(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    """What a built artefact is: the engine sidecar, or the build metadata of an optimized ONNX model."""
    path = Path(artifact)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.suffix.lower() == ".onnx":
        return {"artifact": str(path), "kind": "onnx", **ModelArtifact.load(path).metadata}
    from .plugins.tensorrt.sidecar import read_sidecar

    return {"artifact": str(path), "kind": "engine", **read_sidecar(path)}


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
