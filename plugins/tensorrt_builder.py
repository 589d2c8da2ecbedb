"""Built-in plugin: the `tensorrt` and `tensorrt-rtx` builders (one code path: trtkit.trt_common).

- tensorrt: NVIDIA TensorRT 8.6 / 10.x / 11.x on a machine with a GPU (x86 or Jetson).
- tensorrt-rtx: TensorRT-RTX (`import tensorrt_rtx`), builds engines ahead of time without a GPU.

Both write `OUT` (the serialized engine) and `OUT.json` (the sidecar: TensorRT version, device, compute
capability, precision, inputs/outputs, profiles) and load engines back as Runners after checking the sidecar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trtkit import hookimpl
from trtkit.stages import Builder, Runner


def _builder(name: str, description: str) -> Builder:
    from trtkit import trt_common

    def build(model: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any) -> Path:
        return trt_common.build_engine(name, model, output, options).engine

    def load(path: str | os.PathLike[str], **options: Any) -> Runner:
        return trt_common.load_engine(name, path, **options)

    def available() -> str | None:
        return trt_common.unavailable_reason(name)

    return Builder(name=name, description=description, options=trt_common.OPTIONS, build=build, load=load,
                   available=available)


@hookimpl
def register_builders(register: Any) -> None:
    register(_builder("tensorrt", "NVIDIA TensorRT engine (8.6, 10.x, 11.x) for the GPU of this machine"))
    register(_builder("tensorrt-rtx", "TensorRT-RTX engine, built ahead of time (no GPU needed to build)"))
