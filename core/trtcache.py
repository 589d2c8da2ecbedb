"""TensorRT calibration cache (text): write scales for implicit-INT8 TensorRT (<= 10, DLA), read one back.

Format (what TensorRT's IInt8EntropyCalibrator2 and trtexec write and read):

    TRT-8601-EntropyCalibration2
    input: 3caa54fc
    conv1_out: 3d1a0e3c

Line 1 is `TRT-<getInferLibVersion()>-<algorithm>`; every other line is `<tensor>: <hex>` where hex is the
IEEE-754 float32 bit pattern of scale = amax / 127, printed big-endian (most significant nibble first), lowercase,
not zero-padded (0.0 -> `0`). Round trip is exact: reading a cache and writing it again gives the same bytes.
Reading lives with the other scales readers in trtkit.scales (`read_cache`, re-exported here).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path

from .errors import OptionError
from .scales import hex_to_float, read_cache

__all__ = ["ALGORITHMS", "DEFAULT_TRT_VERSION", "float_to_hex", "format_cache", "hex_to_float", "read_cache",
           "version_number", "write_cache"]

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_TRT_VERSION = "8.6.1"  # JetPack 6 (the most common Jetson target of implicit INT8 today)


def version_number(version: str | int) -> int:
    """getInferLibVersion() for a TensorRT version: '8.6.1' -> 8601, '10.3.0' -> 100300, '8601' -> 8601."""
    if isinstance(version, int):
        if version <= 0:
            raise OptionError(f"--trt-version must be positive, got {version}")
        return version
    text = str(version).strip()
    if text.isdigit():
        return version_number(int(text))
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise OptionError(f"--trt-version expects MAJOR.MINOR.PATCH (e.g. 8.6.1 or 10.3.0), got {version!r}")
    major, minor, patch = (int(p) for p in (parts + ["0", "0"])[:3])
    if major >= 10:
        return (major * 100 + minor) * 100 + patch
    return major * 1000 + minor * 100 + patch


def float_to_hex(value: float) -> str:
    """The float32 bit pattern as TensorRT prints it: lowercase hex, no padding (0.0 -> '0')."""
    return format(struct.unpack(">I", struct.pack(">f", value))[0], "x")


def format_cache(scales: Mapping[str, float], trt_version: str | int = DEFAULT_TRT_VERSION,
                 algorithm: str = "EntropyCalibration2") -> str:
    """The cache text for tensor -> amax (sorted by tensor name for byte-identical output)."""
    if algorithm not in ALGORITHMS:
        raise OptionError(f"unknown calibration algorithm '{algorithm}' (choices: {', '.join(ALGORITHMS)})")
    lines = [f"TRT-{version_number(trt_version)}-{algorithm}"]
    values = {name: float(scales[name]) for name in scales}
    values.update(dict.fromkeys(getattr(scales, "zero", ()), 0.0))
    for name in sorted(values):
        if "\n" in name or name != name.strip():
            raise OptionError(f"tensor name {name!r} has a newline or edge spaces; it cannot go in a calibration cache")
        if not values[name] >= 0.0:
            raise OptionError(f"tensor '{name}': amax must be >= 0 for a calibration cache, got {values[name]}")
        lines.append(f"{name}: {float_to_hex(values[name] / 127.0)}")
    return "\n".join(lines) + "\n"


def write_cache(scales: Mapping[str, float], path: str | os.PathLike[str],
                trt_version: str | int = DEFAULT_TRT_VERSION, algorithm: str = "EntropyCalibration2") -> Path:
    """Write a TensorRT calibration cache (atomically) for tensor -> amax (e.g. a `Scales`)."""
    from .fileio import write_text

    write_text(path, format_cache(scales, trt_version, algorithm))
    return Path(path)
