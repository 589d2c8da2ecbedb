"""Built engines behind the Runner protocol: the sidecar is checked (TensorRT version, GPU compute capability,
engine hash) before deserializing, then inputs and outputs go through cuda-python device buffers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtkit.errors import BuildError, DataError, InputFileError

from .cuda import check, cuda_free, cuda_malloc, cuda_memcpy_dtoh, cuda_memcpy_htod, cudart, gpu_info
from .module import import_trt, make_logger, product
from .sidecar import check_engine_compatible, read_sidecar, sha256_bytes


class EngineRunner:
    """A deserialized TensorRT engine behind the Runner protocol; buffers and stream through cuda-python."""

    def __init__(self, path: str | os.PathLike[str], builder_name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(f"{self.path}: no such file")
        self.info = read_sidecar(self.path)
        name = builder_name or str(self.info.get("builder"))
        if builder_name is not None and self.info.get("builder") != builder_name:
            raise InputFileError(f"{self.path}: engine was built by '{self.info.get('builder')}', not '{builder_name}'")
        try:
            module = import_trt(name)
        except BuildError as exc:
            raise InputFileError(f"{self.path}: built with {self.info.get('module')} "
                                 f"{self.info.get('tensorrt_version')}, which is not usable here ({exc})") from None
        data = self.path.read_bytes()
        if sha256_bytes(data) != (self.info.get("engine") or {}).get("sha256"):
            raise InputFileError(f"{self.path}: engine does not match its sidecar (modified or truncated); rebuild it")
        check_engine_compatible(self.path, self.info, module, gpu_info())
        self.module = module
        self.logger = make_logger(module)
        self.runtime = module.Runtime(self.logger)
        if self.info.get("dla_core") is not None:
            self.runtime.DLA_core = int(self.info["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            detail = " ".join(" ".join(self.logger.errors()[-1:]).split()) or "no reason given"
            raise InputFileError(f"{self.path}: {product(module)} cannot deserialize this engine: {detail}")
        self.context = self.engine.create_execution_context()
        self.input_names = [t["name"] for t in self.info["inputs"]]
        self.output_names = [t["name"] for t in self.info["outputs"]]
        self.stream = int(check(cudart().cudaStreamCreate(), "cudaStreamCreate"))

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"{self.path}: missing input '{missing[0]}'")
        pointers: list[int] = []
        staged: list[Any] = []  # host copies stay alive until the stream is synchronized
        try:
            for spec in self.info["inputs"]:
                array = np.ascontiguousarray(feeds[spec["name"]], dtype=spec["dtype"])
                staged.append(array)
                if not self.context.set_input_shape(spec["name"], array.shape):
                    raise DataError(f"{self.path}: input '{spec['name']}' shape {array.shape} is outside the engine's "
                                    f"profile {self.info.get('profiles')}")
                pointer = cuda_malloc(array.nbytes)
                pointers.append(pointer)
                cuda_memcpy_htod(pointer, array, self.stream)
                self.context.set_tensor_address(spec["name"], pointer)
            outputs: dict[str, Any] = {}
            for spec in self.info["outputs"]:
                shape = tuple(self.context.get_tensor_shape(spec["name"]))
                result = np.empty(shape, dtype=spec["dtype"])
                pointer = cuda_malloc(result.nbytes)
                pointers.append(pointer)
                self.context.set_tensor_address(spec["name"], pointer)
                outputs[spec["name"]] = (result, pointer)
            if not self.context.execute_async_v3(self.stream):
                raise BuildError(f"{self.path}: TensorRT execution failed")
            for result, pointer in outputs.values():
                cuda_memcpy_dtoh(result, pointer, self.stream)
            check(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return {name: result for name, (result, _) in outputs.items()}
        finally:
            for pointer in pointers:
                cuda_free(pointer)

    def close(self) -> None:
        """Release the CUDA stream (device buffers are freed after every run)."""
        if getattr(self, "stream", None):
            cudart().cudaStreamDestroy(self.stream)
            self.stream = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def load_engine(builder_name: str, path: str | os.PathLike[str], **_options: Any) -> EngineRunner:
    """Builder.load for engines: InputFileError unless this is an engine with a sidecar naming this builder."""
    path = Path(path)
    if path.suffix == ".onnx":
        raise InputFileError(f"{path}: an ONNX model, not a TensorRT engine")
    return EngineRunner(path, builder_name)
