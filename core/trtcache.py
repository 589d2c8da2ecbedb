"""TensorRT calibration cache (text): write scales for implicit-INT8 TensorRT (<= 10, DLA), read one back.

Format (what TensorRT's IInt8EntropyCalibrator2 and trtexec write and read):

    TRT-8601-EntropyCalibration2
    input: 3caa54fc
    conv1_out: 3d1a0e3c

Line 1 is `TRT-<getInferLibVersion()>-<algorithm>`; every other line is `<tensor>: <hex>` where hex is the
IEEE-754 float32 bit pattern of scale = amax / 127, printed big-endian (most significant nibble first), lowercase,
not zero-padded (0.0 -> `0`). Round trip is exact: reading a cache and writing it again gives the same bytes.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

from .errors import InputFileError, OptionError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_TRT_VERSION = "8.6.1"  # JetPack 6 (the most common Jetson target of implicit INT8 today)
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{1,8})$")


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


def hex_to_float(text: str) -> float:
    return struct.unpack(">f", struct.pack(">I", int(text, 16)))[0]


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


def read_cache(path: str | os.PathLike[str]):  # -> Scales (import is lazy: calibration imports numpy)
    """Read a TensorRT calibration cache as Scales (tensor -> amax = scale * 127, exact round trip).

    The header's version and algorithm are kept in `scales.options` ({"trt_version", "algorithm"}).
    Bad headers and malformed lines raise InputFileError naming the file and line.
    """
    from .calibration import Scales

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not a TensorRT calibration cache (binary content)") from None
    lines = text.splitlines()
    if not lines:
        raise InputFileError(f"{path}: empty calibration cache")
    header = _HEADER.match(lines[0].strip())
    if header is None:
        raise InputFileError(
            f"{path}:1: bad calibration cache header {lines[0][:60]!r} (expected TRT-<version>-<algorithm>)"
        )
    version, algorithm = int(header.group(1)), header.group(2)
    amax: dict[str, float] = {}
    zero: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        match = _LINE.match(line.rstrip("\r"))
        if match is None:
            raise InputFileError(f"{path}:{number}: malformed line {line[:60]!r} (expected '<tensor>: <hex>')")
        name, scale = match.group(1), hex_to_float(match.group(2))
        if name in amax or name in zero:
            raise InputFileError(f"{path}:{number}: tensor '{name}' appears twice")
        if scale != scale or scale < 0 or scale == float("inf"):
            raise InputFileError(f"{path}:{number}: tensor '{name}' has an invalid scale {match.group(2)}")
        if scale == 0.0:
            zero.append(name)
            continue
        amax[name] = scale * 127.0
    scales = Scales(amax, method="trt-cache", options={"trt_version": version, "algorithm": algorithm},
                    sources=dict.fromkeys(amax, "trt-cache"))
    scales.zero = zero  # tensors the cache gives scale 0 (no amax; kept so a round trip is exact)
    return scales
