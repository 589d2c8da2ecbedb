"""The TensorRT Python module behind a builder name (`tensorrt` or `tensorrt_rtx`), its version rules, and a
logger that collects TensorRT's messages.

Nothing heavy is imported at module level: tensorrt loads in import_trt().
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from trtkit.errors import BuildError

from .cuda import gpu_info

# Builder name -> Python module name.
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def import_trt(builder: str) -> ModuleType:
    """The TensorRT Python module behind a builder name; BuildError with the reason when it is not usable.

    `import tensorrt` can succeed on a bare namespace package (tensorrt-stubs installs one); a usable module
    has `Builder`.
    """
    module_name = MODULES.get(builder, builder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BuildError(f"{builder}: the Python module '{module_name}' is not installed ({type(exc).__name__})") from None
    if not hasattr(module, "Builder"):
        raise BuildError(
            f"{builder}: '{module_name}' is only a stub/namespace package here (no TensorRT libraries); "
            f"install TensorRT (JetPack on Jetson, pip install tensorrt on x86 with a GPU)"
        )
    return module


def unavailable_reason(builder: str) -> str | None:
    """Why `builder` cannot build here, or None. TensorRT builds on (and for) a GPU; TensorRT-RTX needs none."""
    try:
        module = import_trt(builder)
    except BuildError as exc:
        return str(exc)
    if not is_rtx(module):
        gpu = gpu_info()
        if isinstance(gpu, str):
            return f"{builder}: {product(module)} builds engines on the GPU they run on: {gpu}"
    return None


def is_rtx(module: ModuleType) -> bool:
    return module.__name__.split(".")[0] == "tensorrt_rtx"


def version_tuple(module: ModuleType) -> tuple[int, ...]:
    parts = re.findall(r"\d+", str(getattr(module, "__version__", "0")))
    return tuple(int(p) for p in parts[:3]) or (0,)


def version_string(module: ModuleType) -> str:
    return str(getattr(module, "__version__", "unknown"))


def product(module: ModuleType) -> str:
    return f"TensorRT-RTX {version_string(module)}" if is_rtx(module) else f"TensorRT {version_string(module)}"


def strongly_typed_only(module: ModuleType) -> bool:
    """TensorRT 11 and TensorRT-RTX: no precision flags, no implicit INT8, no calibrators."""
    return is_rtx(module) or version_tuple(module)[0] >= 11


def make_logger(module: ModuleType) -> Any:
    """An ILogger that collects messages (shown on failure) instead of printing TensorRT's log to stderr."""

    class CollectingLogger(module.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            module.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((getattr(severity, "name", str(severity)), msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in ("ERROR", "INTERNAL_ERROR", "kERROR", "kINTERNAL_ERROR")]

        def warnings(self) -> list[str]:
            return [m for s, m in self.messages if s in ("WARNING", "kWARNING")]

    return CollectingLogger()


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """TensorRT-RTX marks timing-cache calls deprecated no-ops; the shared code still calls them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
