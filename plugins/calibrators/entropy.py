"""The `entropy` calibrator: TensorRT's EntropyCalibrator2 (minimal KL divergence), on exact histograms.

It declares statistics="exact-histogram": its divergence depends on how many values fill the sparse tail bins
(sampling positions moved its threshold by 12 % on a test model), and users choosing it expect TensorRT's result.
"""

from __future__ import annotations

import math

import numpy as np

from trtkit.calibration import TensorStats

BINS = 2048     # |x| histogram bins over [0, amax_observed]
LEVELS = 128    # quantized levels of the positive half
START = 128     # first candidate bin


def amax_entropy(stats: TensorStats, bins: int = BINS, levels: int = LEVELS, start: int = START) -> float:
    """TensorRT EntropyCalibrator2: the threshold whose 128-level quantization has minimal KL(P||Q).

    |x| histogram with `bins` bins over [0, observed max], bin 0 set to bin 1's count (NVIDIA's reference does
    this so the zero spike of ReLU outputs does not decide the range); for each candidate i in start..bins,
    P = the first i bins with the outliers added to bin i-1, Q = the first i bins merged into `levels` equal-width
    levels (bin k goes to level floor(k * levels / i)) and expanded back over the non-empty bins (empty bins stay
    empty); the threshold is the edge of bin i with minimal KL(P||Q), the last one on ties. Candidates whose
    last bin is empty while outliers exist have infinite divergence.
    Vectorised over all candidates.
    """
    absmax = stats.absmax
    if stats.count == 0 or absmax <= 0.0:
        return absmax
    counts, edges = stats.histogram(bins)
    total = counts.sum()
    if total <= 0:
        return absmax
    # KL(P||Q) per candidate in O(levels) from prefix sums (no per-bin work per candidate), with T the total,
    # C_i the mass of the first i bins, O_i = T - C_i the outliers, S_j / N_j a level's mass / non-empty bins:
    # T*KL = sum P log P - T log T + T log C_i - sum_j S_j log(S_j / N_j) - O_i log Q_{i-1}
    counts = counts.copy()
    if bins > 1:
        counts[0] = counts[1]  # as NVIDIA's reference: the spike at 0 (ReLU outputs) must not decide the range
    total = counts.sum()
    candidates = np.arange(start, bins + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = counts > 0
    cum_nonzero = np.concatenate([[0], np.cumsum(nonzero)])
    xlogx = np.where(nonzero, counts * np.log(np.where(nonzero, counts, 1.0)), 0.0)
    cum_xlogx = np.concatenate([[0.0], np.cumsum(xlogx)])
    i = candidates[:, None]
    bounds = (np.arange(levels + 1)[None, :] * i + levels - 1) // levels   # first bin of each level
    level_sum = cumulative[bounds[:, 1:]] - cumulative[bounds[:, :-1]]
    level_nz = cum_nonzero[bounds[:, 1:]] - cum_nonzero[bounds[:, :-1]]
    used = (level_nz > 0) & (level_sum > 0)
    density = np.where(used, level_sum / np.where(used, level_nz, 1), 0.0)
    cross = np.where(used, level_sum * np.log(np.where(used, density, 1.0)), 0.0).sum(axis=1)
    inside = cumulative[candidates]                    # C_i
    outliers = total - inside                          # O_i
    last = counts[candidates - 1] + outliers           # P_{i-1}
    p_log_p = cum_xlogx[candidates - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
    last_q = density[:, -1]                            # Q_{i-1}: bin i-1 is in the last level
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(outliers > 0, outliers * np.log(np.where(last_q > 0, last_q, 1.0)), 0.0)
        divergence = (p_log_p - total * math.log(total) + total * np.log(np.where(inside > 0, inside, 1.0))
                      - cross - tail) / total
    impossible = (inside <= 0) | ((outliers > 0) & (counts[candidates - 1] <= 0))
    divergence = np.where(impossible, math.inf, divergence)
    best_i = int(candidates[len(divergence) - 1 - int(np.argmin(divergence[::-1]))])
    return float(edges[best_i])
