"""Device memory and copies through cuda-python (the engine runner, the calibrators, the speed evaluator).

cuda-python is imported on first use; `gpu_info()` answers with the reason instead of raising when there is
no usable GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trtkit.errors import BuildError

if TYPE_CHECKING:
    import numpy as np


def cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (BuildError when cuda-python is not installed)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]  # cuda-python < 12.6
        except ImportError:
            raise BuildError("cuda-python is not installed (pip install cuda-python)") from None
    return runtime


def check(result: Any, what: str) -> Any:
    """The value of a cuda-python call's (error, value...) result; BuildError naming `what` on failure."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BuildError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else rest


def gpu_info() -> dict[str, Any] | str:
    """{'name', 'compute_capability', 'count'} of CUDA device 0, or the reason no GPU is usable."""
    try:
        runtime = cudart()
    except BuildError as exc:
        return str(exc)
    try:
        err, count = runtime.cudaGetDeviceCount()
    except Exception as exc:  # pragma: no cover - broken driver installs
        return f"CUDA is not usable ({type(exc).__name__}: {exc})"
    if int(err) != 0 or not count:
        return f"no CUDA GPU usable here ({getattr(err, 'name', err) if int(err) else 'no devices'})"
    err, props = runtime.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return f"cannot query CUDA device 0 ({getattr(err, 'name', err)})"
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}", "count": int(count)}


def cuda_malloc(nbytes: int) -> int:
    return int(check(cudart().cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))


def cuda_free(pointer: int) -> None:
    cudart().cudaFree(pointer)


def cuda_memcpy_htod(pointer: int, array: np.ndarray, stream: int = 0) -> None:
    runtime = cudart()
    kind = runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(runtime.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream), "copy to device")


def cuda_memcpy_dtoh(array: np.ndarray, pointer: int, stream: int = 0) -> None:
    runtime = cudart()
    kind = runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(runtime.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream), "copy to host")
