"""The JSON sidecar written next to every engine (`OUT.json`): the facts needed to check an engine against
this TensorRT version and GPU before deserializing it, and what `trtkit inspect` shows."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from trtkit.errors import InputFileError

from .module import product, version_string

SIDECAR_FORMAT = "trtkit-engine/1"


def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sidecar(engine: str | os.PathLike[str]) -> dict[str, Any]:
    engine = Path(engine)
    side = sidecar_path(engine)
    if not side.is_file():
        raise InputFileError(f"{engine}: no sidecar {side.name} (written by `trtkit build`); cannot check this "
                             "engine matches this TensorRT version and GPU, so it is not loaded")
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputFileError(f"{side}: corrupt engine sidecar (not JSON)") from None
    if not isinstance(info, dict) or info.get("format") != SIDECAR_FORMAT:
        raise InputFileError(f"{side}: not a trtkit engine sidecar (format {info.get('format') if isinstance(info, dict) else None!r})")
    return info


def check_engine_compatible(engine: Path, info: Mapping[str, Any], module: ModuleType,
                            gpu: dict[str, Any] | str) -> None:
    """One-line InputFileError when the engine was built for another TensorRT version or GPU."""
    built = str(info.get("tensorrt_version"))
    here = version_string(module)
    if tuple(re.findall(r"\d+", built)[:3]) != tuple(re.findall(r"\d+", here)[:3]):
        raise InputFileError(f"{engine}: built with {info.get('module')} {built}, this is {product(module)}; "
                             "engines do not transfer across TensorRT versions: rebuild it here")
    if isinstance(gpu, str):
        raise InputFileError(f"{engine}: cannot run a TensorRT engine here: {gpu}")
    built_device = info.get("device") or {}
    built_cc = built_device.get("compute_capability")
    if built_cc and built_cc != gpu["compute_capability"]:
        raise InputFileError(f"{engine}: built for {built_device.get('name', 'a GPU')} (compute capability {built_cc}), "
                             f"this GPU is {gpu['name']} ({gpu['compute_capability']}); rebuild it on this device")
    targets = [t for t in info.get("compute_capabilities") or [] if t.startswith("sm")]
    here_sm = "sm" + gpu["compute_capability"].replace(".", "")
    if targets and here_sm not in targets:
        raise InputFileError(f"{engine}: built for {', '.join(targets)}, this GPU is {gpu['name']} ({here_sm}); "
                             "rebuild with compute_capability including it")


def describe(artifact: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Builder.describe: {"kind": "engine", **sidecar} for an engine; None for an ONNX model (not an engine)."""
    path = Path(artifact)
    if path.suffix.lower() == ".onnx":
        return None
    return {"kind": "engine", **read_sidecar(path)}
