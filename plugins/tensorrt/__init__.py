"""Built-in plugin: the `tensorrt` and `tensorrt-rtx` builders, one code path for both Python modules.

- tensorrt: NVIDIA TensorRT 8.6 / 10.x / 11.x on a machine with a GPU (x86 or Jetson).
- tensorrt-rtx: TensorRT-RTX (`import tensorrt_rtx`), builds engines ahead of time without a GPU.

Both write `OUT` (the serialized engine) and `OUT.json` (the sidecar: TensorRT version, device, compute
capability, precision, inputs/outputs, profiles) and load engines back as Runners after checking the sidecar.

This module only registers; the work is in the submodules, imported when a builder is used:
  options.py     the option schema (the only one loaded at start-up)
  module.py      the TensorRT Python module behind a builder name, version rules, logger
  parser.py      network creation, ONNX parsing with per-node errors, the capability check
  profiles.py    optimization profiles from trtexec-style shapes
  precision.py   builder flags and layer precisions per TensorRT version
  calibrator.py  implicit INT8 calibrators (TensorRT <= 10)
  build.py       the build: config, timing cache, progress bars, engine + sidecar
  sidecar.py     the engine's JSON sidecar: read, check against this TensorRT and GPU
  engine.py      EngineRunner: a built engine behind the Runner protocol
  cuda.py        device memory and copies through cuda-python
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trtkit import hookimpl
from trtkit.stages import Builder, Runner

from .options import OPTIONS


def _builder(name: str, description: str) -> Builder:
    def build(model: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any) -> Path:
        from .build import build_engine

        return build_engine(name, model, output, options).engine

    def load(path: str | os.PathLike[str], **options: Any) -> Runner:
        from .engine import load_engine

        return load_engine(name, path, **options)

    def available() -> str | None:
        from .module import unavailable_reason

        return unavailable_reason(name)

    def check(model: Path) -> dict[str, Any]:
        from .parser import check_capability

        return check_capability(name, model)

    def describe(artifact: Path) -> dict[str, Any] | None:
        from .sidecar import describe

        return describe(artifact)

    return Builder(name=name, description=description, options=OPTIONS, build=build, load=load,
                   available=available, check=check, describe=describe, suffix=f".{name}.engine")


@hookimpl
def register_builders(register: Any) -> None:
    register(_builder("tensorrt", "NVIDIA TensorRT engine (8.6, 10.x, 11.x) for the GPU of this machine"))
    register(_builder("tensorrt-rtx", "TensorRT-RTX engine, built ahead of time (no GPU needed to build)"))
