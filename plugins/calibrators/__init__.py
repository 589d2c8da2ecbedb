"""Built-in calibrators: minmax, entropy (TensorRT EntropyCalibrator2), percentile (the default), mse.

Each computes a symmetric range amax from the statistics collected once by `trtkit.calibration.collect`
(min, max, |x| histogram), so every method can be computed from the same pass over the data, and declares
which statistics it needs (`statistics`: "range", "histogram" or "exact-histogram"). They are complete
examples of a calibrator plugin: this module only registers; the numerics are in one module per calibrator
(minmax.py, percentile.py, entropy.py, mse.py), imported when a calibrator is used (they import numpy, and
plugin modules load at CLI start-up).
"""

from __future__ import annotations

from typing import Any

from trtkit import hookimpl
from trtkit.errors import OptionError
from trtkit.stages import Calibrator, Option

# Marked default=True: best or within 0.3 dB of the best on every benchmark model (docs/benchmarks.md).
DEFAULT_METHOD = "percentile"


def _minmax(stats: Any) -> float:
    from .minmax import amax_minmax

    return amax_minmax(stats)


def _entropy(stats: Any, bins: int = 2048, levels: int = 128, start: int = 128) -> float:
    from .entropy import amax_entropy

    if not 0 < levels <= start <= bins:
        raise OptionError(f"calibrator 'entropy' needs 0 < levels <= start <= bins, got {levels}, {start}, {bins}")
    return amax_entropy(stats, bins=bins, levels=levels, start=start)


def _percentile(stats: Any, percentile: float = 99.99) -> float:
    from .percentile import amax_percentile

    return amax_percentile(stats, percentile)


def _mse(stats: Any, bins: int = 2048, stride: int = 2) -> float:
    from .mse import amax_mse

    if bins < 256 or stride < 1:
        raise OptionError(f"calibrator 'mse' needs bins >= 256 and stride >= 1, got {bins}, {stride}")
    return amax_mse(stats, bins=bins, stride=stride)


@hookimpl
def register_calibrators(register: Any) -> None:
    register(Calibrator(
        name="minmax",
        description="Largest |x| seen (no clipping; sensitive to outliers).",
        compute_amax=_minmax,
        statistics="range",
    ))
    register(Calibrator(
        name="entropy",
        description="TensorRT EntropyCalibrator2: threshold with minimal KL divergence (2048 bins, 128 levels).",
        options={
            "bins": Option("int", 2048, "histogram bins over [0, max |x|]"),
            "levels": Option("int", 128, "quantized levels of the positive half"),
            "start": Option("int", 128, "first candidate bin"),
        },
        compute_amax=_entropy,
        statistics="exact-histogram",  # its KL divergence depends on the counts in sparse tail bins
    ))
    register(Calibrator(
        name=DEFAULT_METHOD,
        description="The given percentile of |x| (e.g. 99.99).",
        options={"percentile": Option("float", 99.99, "percentile of |x| in (0, 100]")},
        compute_amax=_percentile,
        default=True,
    ))
    register(Calibrator(
        name="mse",
        description="Threshold minimising the mean squared int8 quantization error.",
        options={
            "bins": Option("int", 2048, "histogram bins over [0, max |x|]"),
            "stride": Option("int", 2, "candidate thresholds every this many bins"),
        },
        compute_amax=_mse,
    ))
