"""Per-tensor range search: each activation's clipping range chosen by the error it causes at its layers' outputs.

A calibrator judges a tensor alone (its histogram); what matters is what the rounding and clipping of the
tensor do to the layers that read it. For each quantized activation read by Conv/Gemm/MatMul layers with
constant weights, this searches a grid of ranges (from half the calibrator's range up to the tensor's full
observed range) for the one that minimises

    sum over readers L of || W_L (q(X) - X) ||^2,   X = the tensor's FP32 value at sampled positions (im2col)

on calibration data. Weight rows with large norms (a depthwise filter whose BN-folded taps nearly cancel, a
head that sums many channels) weigh their input channels' error, which the tensor's own histogram cannot see.
Tensors read only by other ops (Add, Concat, pooling) keep the calibrator's range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from trtkit.graph import GraphIndex
    from trtkit.model import ModelArtifact

GRID_LOW = 0.5       # smallest range tried, relative to the calibrator's
GRID_POINTS = 12     # ranges tried per tensor, geometrically spaced from GRID_LOW x calibrator to the full range
POSITIONS = 128      # output positions sampled per sample and layer


@dataclass
class _Reader:
    node: Any          # the FP32 model's Conv/Gemm/MatMul node reading the tensor as input 0
    weight: Any        # its weight as [groups, rows, columns]
    kernel: tuple[int, ...]


def _readers(source: ModelArtifact, index: GraphIndex, by_name: Mapping[str, Any], layers: Sequence[str],
             tensor: str) -> list[_Reader]:
    from trtkit.plugins.ptq.adaptive_round import _weight_rows
    from trtkit.plugins.ptq.common import attribute, constant_array

    found = []
    for name in layers:
        node = by_name.get(name)
        if node is None or len(node.input) < 2 or node.input[0] != tensor:
            continue
        weight = constant_array(source, index, node.input[1])
        if weight is None or (node.op_type == "Conv" and weight.ndim != 4):
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0):
            continue
        rows = _weight_rows(node, weight.astype("float32"))
        if rows is not None:
            found.append(_Reader(node, rows, tuple(weight.shape[2:])))
    return found


def _grid(calibrated: float, full: float) -> np.ndarray:
    import numpy as np

    top = max(full, calibrated)
    grid = np.geomspace(GRID_LOW * calibrated, top, GRID_POINTS)
    return np.unique(np.concatenate([grid, [calibrated, top]]))


def _layer_error(reader: _Reader, x: np.ndarray, grid: np.ndarray, seed: int) -> np.ndarray:
    """Sum of squared output error of `reader` for each range of `grid`, on the sampled rows of `x`."""
    import numpy as np

    from trtkit.plugins.ptq.adaptive_round import _rows

    rows = _rows(reader.node, reader.kernel, reader.weight.shape[0], x, POSITIONS, seed)  # [G, P, K]
    weight_t = np.ascontiguousarray(np.swapaxes(reader.weight, 1, 2))                  # [G, K, R]
    errors = np.empty(len(grid))
    for k, amax in enumerate(grid):
        step = amax / 127.0
        diff = np.clip(np.rint(rows / step), -128, 127) * step - rows
        errors[k] = float(np.sum(np.square(diff @ weight_t), dtype=np.float64))
    return errors


def search_ranges(source: ModelArtifact, amax: Mapping[str, float], full: Mapping[str, float],
                  readers: Mapping[str, Sequence[str]], data: Mapping[str, np.ndarray],
                  batch: int = 8) -> dict[str, float]:
    """For each tensor of `readers` (tensor -> names of the compute layers reading its Q/DQ), the range of the
    grid with the least output error on `data` (arrays per input). `amax`: the calibrator's ranges; `full`:
    each tensor's max |x| seen in calibration. Returns the tensors whose best range differs, with that range."""
    import numpy as np

    from trtkit.graph import GraphIndex
    from trtkit.runtime import session
    from trtkit.ui import track

    index = GraphIndex(source.model.graph)
    by_name = {node.name: node for node in source.model.graph.node if node.name}
    plan = {}
    for tensor, layers in readers.items():
        if tensor not in amax or amax[tensor] <= 0:
            continue
        found = _readers(source, index, by_name, layers, tensor)
        if found:
            plan[tensor] = (found, _grid(float(amax[tensor]), float(full.get(tensor, amax[tensor]))))
    if not plan:
        return {}
    tensors = sorted(plan)
    total = len(next(iter(data.values())))
    errors = {tensor: np.zeros(len(plan[tensor][1])) for tensor in tensors}
    sess = session(source, extra_outputs=tensors)
    fixed = sess.get_inputs()[0].shape[0]  # a model exported with a fixed batch runs in steps of that batch
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    for number, start in enumerate(track(range(0, total, step), total=-(-total // step),
                                         description="range search")):
        values = dict(zip(tensors, sess.run(tensors, {k: v[start:start + step] for k, v in data.items()}),
                          strict=True))
        for tensor in tensors:
            found, grid = plan[tensor]
            for reader in found:
                errors[tensor] += _layer_error(reader, values[tensor], grid, number)
    chosen = {}
    for tensor in tensors:
        grid = plan[tensor][1]
        best = float(grid[int(np.argmin(errors[tensor]))])
        if not np.isclose(best, amax[tensor], rtol=1e-6):
            chosen[tensor] = best
    return chosen
