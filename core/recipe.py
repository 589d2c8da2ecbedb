"""Recipes: the schema of the TOML file `trtkit run` reads, and loading it.

A recipe is data (TOML, never executed). Every section and key is checked when it is loaded, before any work
starts: unknown keys and wrong types are one-line errors naming the file, the section and the key. Paths
are resolved once, here, relative to the recipe file; what the steps do with a loaded recipe is
`trtkit.pipeline`'s business (and caching the steps `trtkit.steps`').
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputFileError, OptionError, close_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# section -> key -> (type, help); type Path: a string, a path relative to the recipe file (resolved at load).
# ARRAY_SECTIONS are arrays of tables ([[passes]]).
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "model": {
        "source": (str, "model spec 'file.py:factory' or 'package.module:factory'"),
        "onnx": (Path, "an existing ONNX file (instead of source)"),
        "exporter": (str, "exporter plugin name (default: the default exporter)"),
        "checkpoint": (Path, "state_dict to load with torch.load(weights_only=True)"),
        "options": (dict, "exporter options (input names/shapes, dynamic axes, opset, ...)"),
    },
    "prune": {
        "criterion": (str, "pruning criterion plugin name (default l1; `trtkit plugins` lists them)"),
        "ratio": (float, "fraction of every layer's channels removed, in (0, 1)"),
        "ratios": (dict, "per-layer fraction removed, {layer name = ratio}"),
        "global": (bool, "rank the channels of all layers together"),
        "target_flops": (float, "prune until the MACs are at most this fraction of the original, e.g. 0.7"),
        "ignore": (list, "layer names whose output channels are kept"),
        "round_to": (int, "keep channel counts multiples of this (8 suits TensorRT)"),
        "reconstruct": (bool, "refit the layers that lost inputs to the unpruned network's outputs (least squares)"),
        "keep_coupled": (bool, "leave residual streams and Concat branches alone"),
        "options": (dict, "the criterion's options"),
        "data": (Path, "samples .npy for data-driven criteria (default: the calibration data)"),
    },
    "distill": {
        "data": (Path, "unlabelled samples .npy (default: the calibration data)"),
        "epochs": (int, "passes over the data"),
        "lr": (float, "Adam learning rate"),
        "batch_size": (int, "samples per step"),
        "temperature": (float, "softmax temperature of the KL term"),
        "kl": (float, "weight of the KL term on [N, C] outputs"),
        "mse": (float, "weight of the MSE between outputs"),
        "features": (list, "submodule names whose outputs are matched too (MSE)"),
        "feature_weight": (float, "weight of each feature's MSE"),
        "augment": (bool, "random crops and flips of the images (same for teacher and student)"),
        "mixup": (float, "mixup alpha (0: off)"),
        "device": (str, "cpu or cuda (default: cuda when available)"),
        "limit": (int, "use at most this many samples"),
        "seed": (int, "shuffling seed"),
    },
    "passes": {
        "name": (str, "graph pass plugin name"),
        "options": (dict, "the pass's options"),
    },
    "optimize": {
        "check_data": (Path, "inputs for the passes' numerical check: .npz keyed by input name (default: generated)"),
    },
    "calibration": {
        "data": (Path, "calibration data: .npy/.npz file or image folder"),
        "method": (str, "calibrator plugin name (default: the default calibrator; `trtkit plugins` lists them)"),
        "options": (dict, "the calibrator's options"),
        "overrides": (Path, "custom scales file (JSON/YAML tensor -> amax, or a TensorRT cache)"),
        "batch_size": (int, "batch size for statistics collection"),
        "limit": (int, "use at most this many samples"),
        "histogram_positions": (int, "histogram at most this many positions per sample per tensor (0: every value)"),
        "cache": (bool, "also write a TensorRT calibration cache (calibration.cache)"),
        "trt_version": (str, "TensorRT version for the cache header, e.g. 8.6.1 or 10.3.0"),
        "cast": (bool, "accept integer data for float inputs (cast as is; refused without it)"),
    },
    "quantize": {
        "exclude": (list, "node names kept in float"),
        "exclude_op_types": (list, "op types kept in float"),
        "per_channel": (bool, "per-channel weight scales (default true)"),
        "reduce_range": (bool, "7-bit weights (onnxruntime on CPUs without VNNI)"),
        "adaptive_round": (bool, "int8 weights chosen against each layer's output on the calibration data (default true)"),
        "recenter": (bool, "ReLU/ReLU6 outputs shifted onto [-amax/2, amax/2], half the int8 step (default true)"),
        "smooth": (bool, "LayerNorm output and depthwise Conv input ranges moved into the weights reading them (default true)"),
        "choose_ranges": (bool, "each activation's range chosen by measurement, not the calibrator's (default true)"),
        "target": (str, "accuracy to reach on the calibration samples, e.g. 'sqnr>=20' (float fallback)"),
        "task_metrics": (list, "task metric specs the target may name, as in `trtkit eval --task-metric`"),
        "max_float": (int, "with a target: at most this many layers in float"),
        "enabled": (bool, "set false to skip INT8 (FP32/FP16 deployment)"),
    },
    "builders": {
        "name": (str, "builder plugin name (`trtkit plugins` lists them)"),
        "options": (dict, "the builder's options"),
        "optional": (bool, "skip (with the reason) when the builder is not usable here"),
        "precisions": (list, "which models to build: fp32, int8 (default both)"),
    },
    "evaluators": {
        "name": (str, "evaluator plugin name (`trtkit plugins` lists them)"),
        "data": (Path, "evaluation inputs (.npy/.npz)"),
        "labels": (Path, "labels (.npy) for task metrics"),
        "options": (dict, "the evaluator's options"),
    },
    "gates": {
        "max_accuracy_drop": (float, "fail when INT8 top-1 accuracy is this much below FP32 (0.01 = 1 point)"),
        "min_top1_agreement": (float, "fail when INT8 agrees with FP32 on fewer top-1 labels"),
        "min_sqnr_db": (float, "fail when the INT8 output SQNR is lower"),
    },
    "report": {
        "enabled": (bool, "write the HTML and Markdown report (default true)"),
        "title": (str, "report title"),
    },
    "output": {
        "dir": (Path, "where artefacts, cache and report go (default: trtkit-run next to the recipe)"),
    },
    "execution": {
        "engine": (str, "execution engine plugin name (default with workers > 1 or an address: the default one, Ray)"),
        "workers": (int, "workers for calibration and the evaluators that run on them (1, the default: in-process)"),
        "address": (str, "the engine's cluster address (Ray: `ray start --head` prints it)"),
    },
    "run": {
        "threads": (int, "threads for onnxruntime, BLAS and torch (default: the CPUs the process may use; "
                         "`trtkit run --threads` wins)"),
    },
}
ARRAY_SECTIONS = {"passes", "builders", "evaluators"}
REQUIRED = {"passes": ("name",), "builders": ("name",), "evaluators": ("name",)}


@dataclass
class Recipe:
    """A loaded recipe: `data` holds the checked sections, paths already resolved against the recipe's folder.

    model_files: the files whose content defines the model (the ONNX file, or the source's Python file(s)
    and the checkpoint), so editing them invalidates what was built from them.
    """

    path: Path
    data: dict[str, Any]
    model_files: list[Path] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def section(self, name: str) -> Any:
        return self.data.get(name, [] if name in ARRAY_SECTIONS else {})


def _type_name(expected: Any) -> str:
    return {str: "a string", Path: "a string (a path)", int: "an integer", float: "a number", bool: "true/false", list: "a list",
            dict: "a table"}.get(expected, str(expected))


def _check_value(where: str, key: str, value: Any, expected: Any, folder: Path) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is Path and isinstance(value, str):
        return _resolve(folder, value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise OptionError(f"{where}: '{key}' must be {_type_name(expected)}, got {type(value).__name__} {value!r}")
    return value


def _resolve(folder: Path, value: str) -> str:
    """A recipe path relative to the recipe's folder (absolute and ~ paths as they are)."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _is_file_spec(module_part: str) -> bool:
    """`file.py:factory` (or a path) rather than `package.module:factory`."""
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def _resolve_source(folder: Path, spec: str) -> str:
    """A model spec with its file part (if any) resolved against the recipe's folder."""
    module_part, sep, attr = spec.rpartition(":")
    if sep and _is_file_spec(module_part):
        return f"{_resolve(folder, module_part)}:{attr}"
    return spec


def _source_files(path: Path, spec: str) -> list[Path]:
    """Files whose content defines a model spec, so editing the model code invalidates the cache."""
    target = spec.rsplit(":", 1)[0]
    if _is_file_spec(target):
        return [Path(target)]
    import importlib.util

    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise OptionError(f"{path} [model] source: cannot find module '{target}'")
    return [Path(found.origin)]


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe. Errors name the file, the section and the key."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such recipe file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: not valid TOML ({exc})") from None
    data: dict[str, Any] = {}
    for section, body in raw.items():
        if section not in SCHEMA:
            raise OptionError(f"{path}: unknown section [{section}]{close_matches(section, SCHEMA)}")
        keys = SCHEMA[section]
        if section in ARRAY_SECTIONS:
            if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
                raise OptionError(f"{path}: [{section}] must be an array of tables: write [[{section}]]")
            items = body
        else:
            if not isinstance(body, dict):
                raise OptionError(f"{path}: [{section}] must be a table")
            items = [body]
        checked = []
        for index, item in enumerate(items):
            where = f"{path} [{section}]" + (f" #{index + 1}" if section in ARRAY_SECTIONS else "")
            for key, value in item.items():
                if key not in keys:
                    raise OptionError(f"{where}: unknown key '{key}'{close_matches(key, keys)}")
                item[key] = _check_value(where, key, value, keys[key][0], path.parent)
            for key in REQUIRED.get(section, ()):
                if key not in item:
                    raise OptionError(f"{where}: missing key '{key}'")
            checked.append(item)
        data[section] = checked if section in ARRAY_SECTIONS else checked[0]
    model = data.get("model", {})
    if ("source" in model) == ("onnx" in model):
        raise OptionError(f"{path} [model]: give exactly one of 'source' (a model factory) or 'onnx' (a file)")
    if "onnx" in model:
        model_files = [Path(model["onnx"])]
    else:
        model["source"] = _resolve_source(path.parent, model["source"])
        checkpoint = [Path(model["checkpoint"])] if "checkpoint" in model else []
        model_files = _source_files(path, model["source"]) + checkpoint
    return Recipe(path=path, data=data, model_files=model_files)
