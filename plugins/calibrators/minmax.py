"""The `minmax` calibrator: the largest |x| seen (statistics="range": min/max only, no histogram)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trtkit.calibration import TensorStats


def amax_minmax(stats: TensorStats) -> float:
    return stats.absmax
