"""Scales: tensor name -> amax (symmetric int8, scale = amax / 127), and every way to read them.

    scales = Scales.load("scales.json")     # ours, a plain JSON/YAML tensor -> amax file, or a TensorRT cache
    scales = as_scales(value)                # a Scales, a mapping tensor -> amax, or a file path
    scales.save("scales.json")

This module sits below calibration (which writes scales), the builder that inserts Q/DQ (which reads them)
and the TensorRT cache writer (trtkit.trtcache), so none of them imports another for scales. It imports only the standard
library (YAML is read with PyYAML, loaded on use).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, InputFileError, OptionError, UnknownNameError, unknown_name

if TYPE_CHECKING:
    import onnx

SCALES_FORMAT = "trtkit-scales"
SCALES_VERSION = 1
_CACHE_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_CACHE_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{1,8})$")


class Scales(Mapping[str, float]):
    """tensor name -> amax (symmetric int8: scale = amax / 127), with how and from what they were computed."""

    def __init__(
        self,
        amax: Mapping[str, float],
        method: str = "custom",
        options: Mapping[str, Any] | None = None,
        model: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
        stats: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        for name, value in amax.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise DataError(f"tensor '{name}': amax must be a positive finite number, got {value!r}")
        self._amax = {str(k): float(v) for k, v in amax.items()}
        self.method = method
        self.options = dict(options or {})
        self.model = dict(model or {})
        self.data = dict(data or {})
        self.sources = {k: sources.get(k, method) for k in self._amax} if sources else dict.fromkeys(self._amax, method)
        self.stats = {k: dict(v) for k, v in (stats or {}).items()}
        self.zero: list[str] = []  # tensors a TensorRT cache gave scale 0 (no range; written back as 0)

    def __getitem__(self, name: str) -> float:
        return self._amax[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._amax)

    def __len__(self) -> int:
        return len(self._amax)

    def __repr__(self) -> str:
        return f"Scales({len(self)} tensors, method={self.method!r})"

    def scale(self, name: str) -> float:
        return self._amax[name] / 127.0

    def with_overrides(self, overrides: Any, known: set[str] | None = None) -> Scales:
        pinned = load_overrides(overrides, known)
        amax = {**self._amax, **pinned}
        sources = {**self.sources, **dict.fromkeys(pinned, "override")}
        return Scales(amax, self.method, self.options, self.model, self.data, sources, self.stats)

    def to_dict(self) -> dict[str, Any]:
        tensors = {}
        for name in sorted(self._amax):
            entry: dict[str, Any] = {"amax": self._amax[name], "scale": self._amax[name] / 127.0,
                                     "source": self.sources.get(name, self.method)}
            if name in self.stats:
                entry["min"] = self.stats[name].get("min")
                entry["max"] = self.stats[name].get("max")
                if "clipped" in self.stats[name]:
                    entry["clipped"] = self.stats[name]["clipped"]
            tensors[name] = entry
        return {
            "format": SCALES_FORMAT,
            "version": SCALES_VERSION,
            "method": self.method,
            "options": self.options,
            "model": self.model,
            "data": self.data,
            "tensors": tensors,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        from .fileio import write_text

        write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scales:
        """Read a scales JSON (ours), a plain JSON/YAML tensor -> amax file, or a TensorRT calibration cache."""
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.startswith("TRT-"):
            return read_cache(path)
        try:
            raw = json.loads(text) if path.suffix.lower() not in (".yaml", ".yml") else None
        except json.JSONDecodeError:
            raise InputFileError(f"{path}: not a scales JSON file") from None
        if isinstance(raw, dict) and raw.get("format") == SCALES_FORMAT:
            tensors = raw.get("tensors")
            if not isinstance(tensors, dict):
                raise InputFileError(f"{path}: scales file without a 'tensors' mapping")
            amax = parse_amax_values(tensors, str(path))
            sources = {str(n): str(e.get("source", raw.get("method", "custom"))) for n, e in tensors.items()
                       if isinstance(e, dict)}
            stats = {n: {k: e[k] for k in ("min", "max", "clipped") if k in e} for n, e in tensors.items()
                     if isinstance(e, dict) and "min" in e and "max" in e}
            return cls(amax, raw.get("method", "custom"), raw.get("options"), raw.get("model"), raw.get("data"),
                       sources, stats)
        values, _ = read_scales_file(path)
        return cls(values, method="custom", sources=dict.fromkeys(values, "override"))


def as_scales(value: Any) -> Scales:
    """Scales from a Scales, a mapping tensor -> amax, or a file path."""
    if isinstance(value, Scales):
        return value
    if isinstance(value, Mapping):
        return Scales(parse_amax_values(value, "scales"))
    if isinstance(value, (str, os.PathLike)):
        return Scales.load(value)
    raise OptionError(f"scales must be a Scales object, a mapping or a file path, not {type(value).__name__}")


# ---- which model scales belong to -------------------------------------------------------------------------

def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of the graph (nodes, initializers or their external references), ignoring trtkit metadata.

    Calibration records it in `scales.model["sha256"]`; the builder reading the scales warns when its model's
    differs."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name of the model (inputs, node outputs, graph outputs, initializers): what scales may name."""
    graph = model.graph
    return ({v.name for v in graph.input} | {o for n in graph.node for o in n.output} | {v.name for v in graph.output}
            | {t.name for t in graph.initializer}) - {""}


# ---- custom scales (overrides) -----------------------------------------------------------------------------

def read_scales_file(path: str | os.PathLike[str]) -> tuple[dict[str, float], str]:
    """tensor -> amax from a JSON/YAML file (ours, or tensor -> amax / {"amax" | "scale": v}) or a TensorRT
    cache, and the file's name for messages. Bad files raise InputFileError / DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.startswith("TRT-"):
        return dict(read_cache(path)), str(path)
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:
        raise InputFileError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({type(exc).__name__})") from None
    if isinstance(raw, dict) and raw.get("format") == SCALES_FORMAT:
        raw = {name: entry for name, entry in raw.get("tensors", {}).items()}
    if not isinstance(raw, dict):
        raise InputFileError(f"{path}: expected a mapping of tensor name -> amax")
    return parse_amax_values(raw, str(path)), str(path)


def parse_amax_values(raw: Mapping[Any, Any], where: str) -> dict[str, float]:
    """tensor -> amax from tensor -> amax / {"amax": v} / {"scale": v} (amax = 127 * scale); all > 0."""
    result: dict[str, float] = {}
    for name, entry in raw.items():
        if isinstance(entry, Mapping):
            if "amax" in entry:
                value = entry["amax"]
                factor = 1.0
            elif "scale" in entry:
                value = entry["scale"]
                factor = 127.0
            else:
                raise DataError(f"{where}: tensor '{name}' needs 'amax' or 'scale'")
        else:
            value, factor = entry, 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: tensor '{name}' has a non-numeric value {value!r}")
        if not math.isfinite(float(value)) or float(value) <= 0:
            raise DataError(f"{where}: tensor '{name}' has a non-positive or non-finite value {value!r} (must be > 0)")
        result[str(name)] = float(value) * factor
    return result


def load_overrides(overrides: Any, known: set[str] | None = None) -> dict[str, float]:
    """Custom scales as tensor -> amax; names are checked against `known` (close matches listed)."""
    if isinstance(overrides, Scales):
        values, where = dict(overrides), "overrides"
    elif isinstance(overrides, Mapping):
        values, where = parse_amax_values(overrides, "overrides"), "overrides"
    else:
        values, where = read_scales_file(overrides)
    if known is not None:
        for name in values:
            if name not in known:
                raise UnknownNameError(f"{where}: {unknown_name('tensor', name, known)}")
    return values


# ---- TensorRT calibration cache (reading; trtkit.trtcache writes) -------------------------------------------

def hex_to_float(text: str) -> float:
    """A float32 from its bit pattern in hex, as TensorRT's calibration cache prints it."""
    value: float = struct.unpack(">f", struct.pack(">I", int(text, 16)))[0]
    return value


def read_cache(path: str | os.PathLike[str]) -> Scales:
    """Read a TensorRT calibration cache as Scales (tensor -> amax = scale * 127, exact round trip).

    The header's version and algorithm are kept in `scales.options` ({"trt_version", "algorithm"}).
    Bad headers and malformed lines raise InputFileError naming the file and line. The format is described
    in trtkit.trtcache.
    """
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
    header = _CACHE_HEADER.match(lines[0].strip())
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
        match = _CACHE_LINE.match(line.rstrip("\r"))
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
