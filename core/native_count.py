"""An optional compiled kernel for the exact |x| histograms of calibration (trtkit.calibration.TensorStats).

numpy's way to count bin numbers (abs, a multiply cast to intp, np.bincount with its min/max pre-pass and a
scalar loop slowed by consecutive values hitting the same bin) costs about 2 ns a value; the exact entropy
calibrator counts every value of every observed tensor (11.5 M values a sample on EfficientNet-Lite1), which
is then as costly as the inference itself. This kernel computes floor(|v| * factor) and counts it in one
pass into four interleaved 32-bit sub-histograms (so runs of values in one bin do not wait on each other's
increments), then adds them to the int64 histogram: about 3x less CPU a value.

It is optional and changes no result: the bin of a value is the same float32 product truncated toward zero
that numpy computes (the factor is a power of two, so the product is exact), and counts are integers, so the
histogram is the numpy path's bit for bit (tests/test_calibration_native.py checks both paths against each
other). The kernel is C compiled on first use with the machine's C compiler (`$CC`, else `cc`) into a cache
folder (`$TRTKIT_NATIVE_CACHE`, else `$XDG_CACHE_HOME/trtkit/native`, else `~/.cache/trtkit/native`) and
loaded with ctypes; without a compiler, or with `TRTKIT_NATIVE=0`, numpy counts.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

# n <= 2**31 - 1 values a call: the sub-histograms are 32-bit. Returns the number of values whose bin was out
# of [0, bins) (NaN, inf or a range too small: never for the calibration's finite values; the caller checks).
SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* A value counts when its |v| * factor is below `bins` (NaN and inf compare false): only then is the
   conversion to an integer defined, on every platform. */
int64_t trtkit_count_abs_bins_f32(const float *values, int64_t n, float factor, int64_t *hist, int64_t bins,
                                  int32_t *scratch) {
    const float limit = (float)bins;
    int32_t *h0 = scratch, *h1 = scratch + bins, *h2 = scratch + 2 * bins, *h3 = scratch + 3 * bins;
    int64_t bad = 0, i = 0;
    memset(scratch, 0, (size_t)(4 * bins) * sizeof(int32_t));
    for (; i + 3 < n; i += 4) {
        float a = fabsf(values[i]) * factor, b = fabsf(values[i + 1]) * factor;
        float c = fabsf(values[i + 2]) * factor, d = fabsf(values[i + 3]) * factor;
        if (a < limit && b < limit && c < limit && d < limit) {
            h0[(int64_t)a]++; h1[(int64_t)b]++; h2[(int64_t)c]++; h3[(int64_t)d]++;
            continue;
        }
        if (a < limit) h0[(int64_t)a]++; else bad++;
        if (b < limit) h1[(int64_t)b]++; else bad++;
        if (c < limit) h2[(int64_t)c]++; else bad++;
        if (d < limit) h3[(int64_t)d]++; else bad++;
    }
    for (; i < n; i++) {
        float a = fabsf(values[i]) * factor;
        if (a < limit) h0[(int64_t)a]++; else bad++;
    }
    for (int64_t k = 0; k < bins; k++)
        hist[k] += (int64_t)h0[k] + h1[k] + h2[k] + h3[k];
    return bad;
}
"""
FLAGS = ("-O2", "-shared", "-fPIC")  # no -march=native: a cache folder may be shared by different machines
MAX_VALUES = (1 << 31) - 1

CountFunction = Callable[[np.ndarray, float, np.ndarray], int]


def enabled() -> bool:
    """False when `TRTKIT_NATIVE=0` (or "false", "no", "off") turns the kernel off."""
    return os.environ.get("TRTKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_folder() -> Path:
    explicit = os.environ.get("TRTKIT_NATIVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trtkit" / "native"


def _library_path(compiler: str) -> Path:
    key = "\0".join([SOURCE, compiler, *FLAGS, sys.platform, platform.machine()]).encode()
    return cache_folder() / f"count-{hashlib.sha256(key).hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into `target` (written under a temporary name, then renamed: concurrent builds of
    several worker processes each write their own file and the last rename wins, all identical)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        source = Path(folder) / "count.c"
        source.write_text(SOURCE)
        built = Path(folder) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(source)], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)


@functools.cache
def count_function() -> CountFunction | None:
    """The compiled counter, or None (turned off, not Linux/macOS, no C compiler, or it failed to build or
    load: numpy counts then). Built once per machine and cached; loaded once per process."""
    if not enabled() or sys.platform not in ("linux", "darwin"):
        return None
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None
    target = _library_path(compiler)
    try:
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    kernel = library.trtkit_count_abs_bins_f32
    pointer = ctypes.c_void_p
    kernel.argtypes = [pointer, ctypes.c_int64, ctypes.c_float, pointer, ctypes.c_int64, pointer]
    kernel.restype = ctypes.c_int64
    scratch = threading.local()  # ctypes releases the GIL during the call: each thread has its own buffer

    def count(values: np.ndarray, factor: float, hist: np.ndarray) -> int:
        """Add the bins floor(|v| * factor) of float32 `values` (flat, C-contiguous, at most MAX_VALUES) to
        the int64 `hist` (C-contiguous); returns how many values fell outside it (then counted nowhere)."""
        bins = hist.size
        buffer = getattr(scratch, "buffer", None)
        if buffer is None or buffer.size != 4 * bins:
            buffer = scratch.buffer = np.empty(4 * bins, dtype=np.int32)
        outside = 0
        for start in range(0, values.size, MAX_VALUES):  # one call but for over 2**31 values
            part = values[start:start + MAX_VALUES]
            outside += int(kernel(part.ctypes.data, part.size, factor, hist.ctypes.data, bins, buffer.ctypes.data))
        return outside

    return count
