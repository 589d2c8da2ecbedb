"""`trtkit run recipe.toml`: the whole pipeline from one reviewable file, with cached stages.

A recipe is data (TOML, never executed). Every section and key is checked before any work starts: unknown
keys and wrong types are one-line errors naming the key and the section. Relative paths are relative to
the recipe file.

Each stage's result is cached under `<output>/cache/<stage>/<key>/`, where the key hashes the stage's
configuration, the keys of the stages it consumes and the contents of the files it reads. A re-run with an
unchanged recipe redoes nothing; changing the calibration method redoes calibration and what follows only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import GateError, InputFileError, OptionError, TrtkitError, close_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# section -> key -> (type(s), help). "list[table]" sections are arrays of tables ([[passes]]).
_ANY = object
SCHEMA: dict[str, dict[str, tuple[Any, str]]] = {
    "model": {
        "source": (str, "torch model spec 'file.py:factory' or 'package.module:factory'"),
        "onnx": (str, "an existing ONNX file (instead of source)"),
        "exporter": (str, "exporter plugin name (default: torch)"),
        "checkpoint": (str, "state_dict to load with torch.load(weights_only=True)"),
        "options": (dict, "exporter options (input names/shapes, dynamic axes, opset, ...)"),
    },
    "passes": {
        "name": (str, "graph pass plugin name"),
        "options": (dict, "the pass's options"),
    },
    "calibration": {
        "data": (str, "calibration data: .npy/.npz file or image folder"),
        "method": (str, "calibrator plugin name (percentile, entropy, minmax, mse, ...)"),
        "options": (dict, "the calibrator's options"),
        "overrides": (str, "custom scales file (JSON/YAML tensor -> amax, or a TensorRT cache)"),
        "batch_size": (int, "batch size for statistics collection"),
        "limit": (int, "use at most this many samples"),
        "histogram_positions": (int, "histogram at most this many positions per sample per tensor (0: every value)"),
        "cache": (bool, "also write a TensorRT calibration cache (calibration.cache)"),
        "trt_version": (str, "TensorRT version for the cache header, e.g. 8.6.1 or 10.3.0"),
    },
    "quantize": {
        "exclude": (list, "node names kept in float"),
        "exclude_op_types": (list, "op types kept in float"),
        "per_channel": (bool, "per-channel weight scales (default true)"),
        "reduce_range": (bool, "7-bit weights (onnxruntime on CPUs without VNNI)"),
        "enabled": (bool, "set false to skip INT8 (FP32/FP16 deployment)"),
    },
    "builders": {
        "name": (str, "builder plugin name (onnxruntime, tensorrt, tensorrt-rtx, ...)"),
        "options": (dict, "the builder's options"),
        "optional": (bool, "skip (with the reason) when the builder is not usable here"),
        "precisions": (list, "which models to build: fp32, int8 (default both)"),
    },
    "evaluators": {
        "name": (str, "evaluator plugin name (accuracy, speed, layers, ...)"),
        "data": (str, "evaluation inputs (.npy/.npz)"),
        "labels": (str, "labels (.npy) for task metrics"),
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
        "dir": (str, "where artefacts, cache and report go (default: trtkit-run next to the recipe)"),
    },
}
ARRAY_SECTIONS = {"passes", "builders", "evaluators"}
REQUIRED = {"passes": ("name",), "builders": ("name",), "evaluators": ("name",)}


@dataclass
class Recipe:
    path: Path
    data: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def resolve(self, value: str | None) -> Path | None:
        """A recipe path relative to the recipe file."""
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.folder / path)

    def section(self, name: str) -> Any:
        return self.data.get(name, [] if name in ARRAY_SECTIONS else {})


def _type_name(expected: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
            dict: "a table"}.get(expected, str(expected))


def _check_value(where: str, key: str, value: Any, expected: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise OptionError(f"{where}: '{key}' must be {_type_name(expected)}, got {type(value).__name__} {value!r}")
    return value


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
                item[key] = _check_value(where, key, value, keys[key][0])
            for key in REQUIRED.get(section, ()):
                if key not in item:
                    raise OptionError(f"{where}: missing key '{key}'")
            checked.append(item)
        data[section] = checked if section in ARRAY_SECTIONS else checked[0]
    model = data.get("model", {})
    if ("source" in model) == ("onnx" in model):
        raise OptionError(f"{path} [model]: give exactly one of 'source' (a torch factory) or 'onnx' (a file)")
    return Recipe(path=path, data=data)


# ---- plan ----------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One unit of cached work. `key` hashes config + upstream keys + contents of files read."""

    name: str
    config: dict[str, Any]
    needs: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    key: str = ""
    action: Callable[[Step, dict[str, StepResult], Path], dict[str, Any]] | None = field(default=None, repr=False)

    def describe(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.config.items() if v not in (None, {}, [], ""))
        after = f" (after {', '.join(self.needs)})" if self.needs else ""
        return f"{self.name}{after}: {details}" if details else f"{self.name}{after}"


@dataclass
class StepResult:
    step: str
    key: str
    folder: Path
    outputs: dict[str, Any]
    cached: bool
    seconds: float

    def path(self, name: str) -> Path:
        return self.folder / self.outputs[name]


def _file_digest(path: Path) -> str:
    from .fileio import sha256_file

    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(sha256_file(child).encode())
        return digest.hexdigest()
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    return sha256_file(path)


def _source_files(spec: str, folder: Path) -> list[Path]:
    """Files whose content defines a torch factory spec, so editing the model code invalidates the cache."""
    target = spec.rsplit(":", 1)[0]
    if target.endswith(".py"):
        path = Path(target)
        return [path if path.is_absolute() else folder / path]
    import importlib.util

    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise OptionError(f"[model] source: cannot find module '{target}'")
    return [Path(found.origin)]


def plan(recipe: Recipe) -> list[Step]:
    """The ordered steps a recipe asks for, each with its cache key."""
    from . import pipeline

    steps = pipeline.steps_for(recipe)
    keys: dict[str, str] = {}
    for step in steps:
        payload = {
            "trtkit": __version__,
            "step": step.name,
            "config": step.config,
            "needs": [keys[name] for name in step.needs],
            "files": [_file_digest(path) for path in step.files],
        }
        step.key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
        keys[step.name] = step.key
    return steps


# ---- run -----------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    output: Path
    results: dict[str, StepResult]
    gates: list[tuple[str, bool, str]]
    report: Path | None

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.gates)


def output_folder(recipe: Recipe, override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        return Path(override)
    configured = recipe.section("output").get("dir")
    return recipe.resolve(configured) or recipe.folder / "trtkit-run"  # type: ignore[return-value]


def run_recipe(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, force: bool = False,
               log: Callable[[str], None] | None = None) -> RunResult:
    """Run every step of the recipe, reusing cached results whose key is unchanged."""
    from . import pipeline

    log = log or (lambda message: None)
    recipe = load_recipe(path)
    steps = plan(recipe)
    out = output_folder(recipe, output)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, StepResult] = {}
    for step in steps:
        folder = out / "cache" / step.name.replace(":", "-") / step.key
        marker = folder / "step.json"
        if marker.is_file() and not force:
            record = json.loads(marker.read_text())
            results[step.name] = StepResult(step.name, step.key, folder, record["outputs"], True, 0.0)
            log(f"[cached] {step.name} ({step.key})")
            continue
        log(f"[run]    {step.describe()}")
        started = time.perf_counter()
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            assert step.action is not None
            outputs = step.action(step, results, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        record = {"step": step.name, "key": step.key, "config": step.config, "outputs": outputs}
        (staging / "step.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # the step appears whole or not at all
        results[step.name] = StepResult(step.name, step.key, folder, outputs, False, seconds)
        log(f"         done in {seconds:.1f} s")
    gates = pipeline.check_gates(recipe, results)
    report = pipeline.publish(recipe, results, gates, out)
    return RunResult(out, results, gates, report)


def gate_error(result: RunResult) -> GateError | None:
    failed = [f"{name}: {detail}" for name, ok, detail in result.gates if not ok]
    return GateError("accuracy gate failed: " + "; ".join(failed)) if failed else None


__all__ = ["Recipe", "RunResult", "Step", "StepResult", "TrtkitError", "load_recipe", "plan", "run_recipe"]


def starter_recipe(onnx: str | None = None, source: str | None = None) -> str:
    """A commented recipe covering every section, for `trtkit init`."""
    if onnx is not None:
        model = f'onnx = "{onnx}"                 # the FP32 model to deploy'
    else:
        model = (f'source = "{source or "my_model.py:build_model"}"   # a function returning a trained torch '
                 'module\n# checkpoint = "weights.pt"         # loaded with torch.load(weights_only=True)\n'
                 'exporter = "torch"\n\n[model.options]\ninput_names = ["input"]\noutput_names = ["output"]\n'
                 'input_shapes = { input = [1, 3, 224, 224] }\ndynamic_batch = true               # axis 0 is "batch"\nopset = 17')
    return f"""# trtkit recipe. Run it with: trtkit run recipe.toml   (--dry-run prints the plan)
# Every key is checked: a typo is an error naming the key and its section. Paths are relative to this file.

[model]
{model}

# Graph passes, in order (default: simplify, optimize). `trtkit plugins` lists every installed pass.
[[passes]]
name = "simplify"

[[passes]]
name = "optimize"

# [[passes]]
# name = "fuse-preprocess"          # fold /255, mean/std and BGR<->RGB into the first Conv
# options = {{ scale = 0.00392156862745098, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }}

# [[passes]]
# name = "remove-sigmoid"           # drop the trailing Sigmoid; thresholds become logits

# INT8 calibration. Remove this section for an FP32/FP16-only deployment.
[calibration]
data = "calibration.npy"            # .npy (first axis = samples), .npz (keys = input names) or an image folder
method = "percentile"               # percentile, entropy (TensorRT's), minmax, mse, or a plugin's calibrator
# options = {{ percentile = 99.99 }}
# overrides = "pinned-scales.json"  # tensor -> amax pinned by you; the calibrator fills the rest
# cache = true                      # also write a TensorRT calibration cache (TensorRT <= 10, DLA)
# trt_version = "10.3.0"

[quantize]
per_channel = true
# exclude = ["/head/conv/Conv"]     # node names kept in float (see `trtkit eval layers`)
# exclude_op_types = ["Softmax"]

[[builders]]
name = "onnxruntime"                # runs anywhere

# [[builders]]
# name = "tensorrt"                 # on a machine with NVIDIA TensorRT and a GPU (Jetson: JetPack)
# optional = true
# options = {{ workspace_mb = 1024 }}

# [[evaluators]]
# name = "accuracy"
# data = "test_inputs.npy"
# labels = "test_labels.npy"

[[evaluators]]
name = "speed"

# [gates]
# max_accuracy_drop = 0.01          # INT8 top-1 within 1 point of FP32 (needs labels)
# min_top1_agreement = 0.99
# min_sqnr_db = 20.0

[report]
title = "trtkit report"

# [output]
# dir = "trtkit-run"
"""
