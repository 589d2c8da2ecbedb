"""The `percentile` calibrator (the default): the given percentile of |x| from the sampled histogram."""

from __future__ import annotations

import numpy as np

from trtkit.calibration import FINE_BINS, TensorStats
from trtkit.errors import OptionError


def amax_percentile(stats: TensorStats, percentile: float = 99.99) -> float:
    """The given percentile of |x| (linear interpolation inside the fine histogram's bins)."""
    if not 0.0 < percentile <= 100.0:
        raise OptionError(f"percentile must be in (0, 100], got {percentile}")
    if stats.count == 0 or stats.range == 0.0 or percentile >= 100.0:
        return stats.absmax
    cumulative = np.concatenate([[0.0], np.cumsum(stats.hist, dtype=np.float64)])
    total = cumulative[-1]
    # numpy's 'linear' percentile of n sorted values sits at rank p/100 * (n - 1); count ranks from 0.5.
    rank = percentile / 100.0 * (total - 1) + 0.5
    fine_edges = np.linspace(0.0, stats.range, FINE_BINS + 1)
    value = float(np.interp(rank, cumulative, fine_edges))
    return min(value, stats.absmax)
