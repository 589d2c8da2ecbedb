"""Implicit INT8 calibration (TensorRT <= 10): calibration batches from any trtkit data source, the
IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator classes fed through cuda-python, and the calibrator class a
calibration cache asks for. TensorRT 11 and TensorRT-RTX have no calibrators (precision.check_options refuses)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from trtkit.errors import InputFileError
from trtkit.fileio import write_bytes

from .cuda import check, cuda_free, cuda_malloc, cudart

if TYPE_CHECKING:
    import numpy as np


def load_calibration_batches(data: Any, model_path: Path, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Full batches of `batch_size` from any trtkit data source (`trtkit.data.load_data`: .npz/.npy files,
    image folders, arrays); TensorRT calibrators need a constant batch size, so a remainder is dropped."""
    import numpy as np

    from trtkit.data import load_data

    source = load_data(data, model_path, batch_size=batch_size)
    batches = []
    for feeds in source.batches():
        if next(iter(feeds.values())).shape[0] != batch_size:
            continue
        batches.append({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in feeds.items()})
    if not batches:
        raise InputFileError(f"{data}: fewer samples than calibration_batch_size={batch_size}")
    return batches


def make_calibrator(module: ModuleType, kind: str, batches: list[dict[str, np.ndarray]], cache_path: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator feeding `batches` through cuda-python device buffers."""
    base = module.IInt8EntropyCalibrator2 if kind == "entropy" else module.IInt8MinMaxCalibrator

    class Calibrator(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.batches = batches
            self.index = 0
            self.device: dict[str, int] = {}

        def get_batch_size(self) -> int:
            first = next(iter(batches[0].values())) if batches else None
            return int(first.shape[0]) if first is not None else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            pointers = []
            for name in names:
                array = batch[name]
                if name not in self.device:
                    self.device[name] = cuda_malloc(array.nbytes)
                # Synchronous copy: TensorRT reads the buffer on its own stream right after get_batch returns.
                runtime = cudart()
                check(runtime.cudaMemcpy(self.device[name], array.ctypes.data, array.nbytes,
                                         runtime.cudaMemcpyKind.cudaMemcpyHostToDevice), "copy to device")
                pointers.append(self.device[name])
            return pointers

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                write_bytes(cache_path, bytes(cache))

        def free(self) -> None:
            for pointer in self.device.values():
                cuda_free(pointer)
            self.device.clear()

    return Calibrator()


CACHE_CALIBRATORS = {"EntropyCalibration2": "entropy", "MinMaxCalibration": "minmax"}


def calibrator_for_cache(path: Path) -> tuple[str, int]:
    """(calibrator kind, header version) for a TensorRT calibration cache.

    TensorRT only reads a cache whose header algorithm matches the calibrator class asking for it (an entropy
    calibrator ignores a MinMax cache and then has no data to calibrate with), so the cache decides the class.
    """
    from trtkit.scales import read_cache

    scales = read_cache(path)  # InputFileError naming the file and line for malformed caches
    options = getattr(scales, "options", {}) or {}
    algorithm = str(options.get("algorithm"))
    if algorithm not in CACHE_CALIBRATORS:
        raise InputFileError(f"{path}: calibration cache algorithm '{algorithm}' is not supported "
                             f"(use {' or '.join(CACHE_CALIBRATORS)})")
    return CACHE_CALIBRATORS[algorithm], int(options.get("trt_version") or 0)
