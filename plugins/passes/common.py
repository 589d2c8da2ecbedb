"""Helpers several of this plugin's passes share: per-channel constants and dtype comparisons.

numpy is imported inside the functions (only pass modules import this one, and only when a pass runs).
"""

from __future__ import annotations

from typing import Any


def channel_vector(value: Any, channels: int, ndim: int, axis: int = 1) -> Any:
    """A constant broadcast over a [N, C, ...] tensor as a per-channel vector of length C, or None if it is not."""
    import numpy as np

    value = np.asarray(value)
    if value.ndim > ndim:
        return None
    shape = (1,) * (ndim - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    if shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)

def same_dtype(a: Any, b: Any) -> bool:
    """dtype equality that also copes with graphsurgeon's non-numpy dtypes (bfloat16, float8: onnx enums)."""
    import numpy as np

    try:
        return bool(np.dtype(a) == np.dtype(b))
    except TypeError:
        return bool(a == b)

def is_float(dtype: Any) -> bool:
    import numpy as np

    try:
        return np.dtype(dtype).kind == "f"
    except TypeError:
        return False

