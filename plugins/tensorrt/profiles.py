"""Optimization profiles for dynamic shapes: trtexec-style shape strings -> one {input: {min, opt, max}}."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trtkit.errors import OptionError, unknown_name

if TYPE_CHECKING:
    import tensorrt as trt


def parse_shapes(text: str | None, option: str) -> dict[str, tuple[int, ...]]:
    """'x:1x3x224x224,y:2x5' -> {'x': (1, 3, 224, 224), 'y': (2, 5)} (trtexec --minShapes syntax)."""
    result: dict[str, tuple[int, ...]] = {}
    if not text:
        return result
    for item in re.split(r",(?=[^,:]+:)", text.strip()):
        name, sep, dims = item.strip().rpartition(":")
        if not sep or not name:
            raise OptionError(f"option '{option}': expected NAME:DxDxD, got {item!r}")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims.strip() else ()
        except ValueError:
            raise OptionError(f"option '{option}': bad dims {dims!r} for input '{name}' (use e.g. 1x3x224x224)") from None
        if any(d <= 0 for d in shape):
            raise OptionError(f"option '{option}': dims of input '{name}' must be positive, got {dims!r}")
        result[name.strip().strip("'\"")] = shape
    return result


def int_dims(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def make_profiles(network: trt.INetworkDefinition, options: Mapping[str, Any],
                  notes: list[str] | None = None) -> list[dict[str, dict[str, list[int]]]]:
    """One profile {input: {min, opt, max}} covering every input with dynamic dims ([] when all are static).

    A dynamic batch with no shapes and max_batch 1 (the default) gets batch 1 only: said in `notes` (one line per input)."""
    mins = parse_shapes(options.get("min_shapes"), "min_shapes")
    opts = parse_shapes(options.get("opt_shapes"), "opt_shapes")
    maxs = parse_shapes(options.get("max_shapes"), "max_shapes")
    inputs = {network.get_input(i).name: int_dims(network.get_input(i).shape) for i in range(network.num_inputs)}
    for option, given in (("min_shapes", mins), ("opt_shapes", opts), ("max_shapes", maxs)):
        for name in given:
            if name not in inputs:
                raise OptionError(f"option '{option}': {unknown_name('input', name, inputs)}")
    max_batch = int(options.get("max_batch") or 1)
    if max_batch < 1:
        raise OptionError("option 'max_batch' must be >= 1")
    profile: dict[str, dict[str, list[int]]] = {}
    for name, shape in inputs.items():
        if all(d >= 0 for d in shape) and name not in mins and name not in maxs and name not in opts:
            continue
        entry: dict[str, list[int]] = {}
        # Shapes given for this input fill its missing ones (trtexec: one shape means min = opt = max).
        fallback = [g[name] for g in (opts, maxs, mins) if name in g]
        for kind, given in (("min", mins), ("max", maxs)):
            if name in given or fallback:
                entry[kind] = list(given.get(name, fallback[0]))
                continue
            dims = []
            for axis, d in enumerate(shape):
                if d >= 0:
                    dims.append(d)
                elif axis == 0:
                    dims.append(1 if kind == "min" else max_batch)
                    if kind == "max" and notes is not None and max_batch == 1:
                        notes.append(f"warning: input '{name}' has a dynamic batch but no shapes were given: the "
                                     f"engine runs batch 1 only (set -O max_batch=N, or -O min_shapes/opt_shapes/"
                                     f"max_shapes={name}:...)")
                else:
                    example = "x".join(str(x if x > 0 else 1) for x in shape)
                    raise OptionError(
                        f"input '{name}' has a dynamic dim {axis}: give its range with options "
                        f"min_shapes/opt_shapes/max_shapes (e.g. max_shapes={name}:{example})"
                    )
            entry[kind] = dims
        entry["opt"] = list(opts[name]) if name in opts else list(entry["max"])
        for kind in ("min", "opt", "max"):
            if len(entry[kind]) != len(shape):
                raise OptionError(f"option '{kind}_shapes': input '{name}' has rank {len(shape)}, got {entry[kind]}")
            for axis, (d, fixed) in enumerate(zip(entry[kind], shape, strict=True)):
                if fixed >= 0 and d != fixed:
                    raise OptionError(f"option '{kind}_shapes': input '{name}' dim {axis} is fixed at {fixed}, got {d}")
        if not all(a <= b <= c for a, b, c in zip(entry["min"], entry["opt"], entry["max"], strict=True)):
            raise OptionError(f"input '{name}': profile needs min <= opt <= max, got {entry}")
        profile[name] = {k: entry[k] for k in ("min", "opt", "max")}
    return [profile] if profile else []
