"""The `mse` calibrator: the threshold minimising the mean squared int8 quantization error of |x|."""

from __future__ import annotations

import math

import numpy as np

from trtkit.calibration import TensorStats

BINS = 2048     # |x| histogram bins over [0, amax_observed]
START = 128     # first candidate threshold bin


def amax_mse(stats: TensorStats, bins: int = BINS, start: int = START, stride: int = 2) -> float:
    """The threshold minimising the mean squared quantization error of |x| (int8 symmetric, 127 levels)."""
    absmax = stats.absmax
    if stats.count == 0 or absmax <= 0.0:
        return absmax
    counts, edges = stats.histogram(bins)
    centers = (edges[:-1] + edges[1:]) / 2
    candidates = edges[np.arange(start, bins + 1, stride)]
    best, best_err = absmax, math.inf
    for block in np.array_split(candidates, max(1, len(candidates) // 128)):
        step = block[:, None] / 127.0
        quantized = np.minimum(np.round(centers[None, :] / step), 127.0) * step
        error = ((centers[None, :] - quantized) ** 2 * counts[None, :]).sum(axis=1)
        index = int(np.argmin(error))
        if error[index] < best_err:
            best_err, best = float(error[index]), float(block[index])
    return best
