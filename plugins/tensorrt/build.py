"""One build path for the `tensorrt` and `tensorrt-rtx` builders: parse ONNX, optimization profiles for
dynamic shapes, workspace limit, timing cache load/save, precision flags where the version has them
(TensorRT <= 10), implicit INT8 from a calibration cache or a calibrator (TensorRT <= 10), layer precision
constraints, DLA, RTX compute capabilities; writes the engine and its JSON sidecar (the sidecar first).

tensorrt, onnx, numpy and rich load inside the functions (this module is imported only when a build runs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from trtkit.errors import BuildError, InputFileError, OptionError, unknown_name
from trtkit.fileio import atomic_path, write_bytes, write_text

from .calibrator import calibrator_for_cache, load_calibration_batches, make_calibrator
from .cuda import gpu_info
from .module import (
    import_trt,
    is_rtx,
    make_logger,
    product,
    quiet_deprecations,
    strongly_typed_only,
    version_string,
    version_tuple,
)
from .parser import check_model_file, create_network, parse_onnx
from .precision import apply_layer_precisions, check_options, model_has_qdq, parse_layer_precisions
from .profiles import int_dims, make_profiles
from .sidecar import SIDECAR_FORMAT, sha256_bytes, sidecar_path

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass
class BuildResult:
    engine: Path
    sidecar: Path
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_engine(builder_name: str, model: str | os.PathLike[str], output: str | os.PathLike[str],
                 options: Mapping[str, Any], progress_console: Any = None) -> BuildResult:
    """Build a serialized engine for `model` with TensorRT or TensorRT-RTX; write engine + JSON sidecar.

    progress_console: a rich Console for TensorRT's build-phase progress bars (default: trtkit's stderr
    console when it is a terminal, else none).
    """
    from trtkit.fileio import check_output_path, sha256_file

    module = import_trt(builder_name)
    model_path = check_model_file(model)
    out = check_output_path(output, model_path)
    options = dict(options)
    qdq = model_has_qdq(model_path)
    flags = check_options(module, options, qdq)
    logger = make_logger(module)
    builder = module.Builder(logger)
    strongly = bool(options.get("strongly_typed")) or strongly_typed_only(module)
    network = create_network(module, builder, bool(options.get("strongly_typed")))
    parse_onnx(module, builder, network, logger, model_path)

    config = builder.create_builder_config()
    if options.get("workspace_mb") is not None:
        if options["workspace_mb"] <= 0:
            raise OptionError("option 'workspace_mb' must be > 0")
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, int(options["workspace_mb"]) << 20)
    if options.get("optimization_level") is not None:
        level = int(options["optimization_level"])
        if not 0 <= level <= 5:
            raise OptionError(f"option 'optimization_level' must be 0..5, got {level}")
        config.builder_optimization_level = level
    for flag in flags:
        config.set_flag(getattr(module.BuilderFlag, flag))
    if options.get("sparse_weights"):  # 2:4 sparse weights (trtkit.plugins.sparsity) may use sparse kernels
        if not hasattr(module.BuilderFlag, "SPARSE_WEIGHTS"):
            raise OptionError(f"option 'sparse_weights': {product(module)} has no BuilderFlag.SPARSE_WEIGHTS")
        config.set_flag(module.BuilderFlag.SPARSE_WEIGHTS)

    profile_notes: list[str] = []
    profiles = make_profiles(network, options, profile_notes)
    for entry in profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in entry.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)

    targets: list[str] = []
    if options.get("compute_capability"):
        targets = _set_compute_capabilities(module, config, options["compute_capability"])

    layer_precisions: dict[str, str] = {}
    if options.get("layer_precisions"):
        layer_precisions = apply_layer_precisions(module, network, parse_layer_precisions(options["layer_precisions"]))
        config.set_flag(module.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    dla_core = options.get("dla_core")
    if dla_core is not None:
        available = int(builder.num_DLA_cores)
        if not 0 <= dla_core < available:
            raise OptionError(f"option 'dla_core={dla_core}': this device has {available} DLA core(s)"
                              + (" (DLA exists on Jetson Xavier/Orin only)" if available == 0 else ""))
        config.default_device_type = module.DeviceType.DLA
        config.DLA_core = int(dla_core)
        if options.get("gpu_fallback", True):
            config.set_flag(module.BuilderFlag.GPU_FALLBACK)

    calibrator = None
    notes: list[str] = list(profile_notes)
    calibration: dict[str, Any] | None = None
    cache_path = Path(options["calibration_cache"]) if options.get("calibration_cache") else None
    if options.get("calibration_data"):
        batches = load_calibration_batches(options["calibration_data"], model_path,
                                           int(options.get("calibration_batch_size") or 8))
        calibrator = make_calibrator(module, options.get("calibrator") or "entropy", batches, cache_path)
        calibration = {"source": "data", "calibrator": options.get("calibrator"), "batches": len(batches)}
    elif cache_path is not None:
        if not cache_path.is_file():
            raise InputFileError(f"{cache_path}: no such calibration cache")
        kind, cache_version = calibrator_for_cache(cache_path)
        from trtkit.trtcache import version_number

        here = version_number(".".join(map(str, version_tuple(module))))
        if cache_version != here:
            notes.append(f"calibration cache {cache_path.name} was written for TensorRT {cache_version}, "
                         f"this is {here}: check the build log if TensorRT ignores it")
        calibrator = make_calibrator(module, kind, [], cache_path)
        calibration = {"source": "cache", "calibrator": kind, "cache_sha256": sha256_file(cache_path)}
    if calibrator is not None:
        config.int8_calibrator = calibrator
        if profiles:  # calibration runs at one shape: the calibration batch's (else the profile's opt)
            profile = builder.create_optimization_profile()
            first = calibrator.batches[0] if calibrator.batches else {}
            for name, shapes in profiles[0].items():
                shape = list(first[name].shape) if name in first else shapes["opt"]
                profile.set_shape(name, shape, shape, shape)
            config.set_calibration_profile(profile)

    timing_path = Path(options["timing_cache"]) if options.get("timing_cache") else None
    timing_loaded = False
    if timing_path is not None:
        _, timing_loaded = _load_timing_cache(config, timing_path, product(module))

    if progress_console is None:
        import sys

        from trtkit.ui import console as ui_console

        progress_console = ui_console if sys.stderr.isatty() else None
    monitor = make_progress_monitor(module, progress_console) if progress_console is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        if monitor is not None:
            with monitor.progress:
                serialized = builder.build_serialized_network(network, config)
        else:
            serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None and hasattr(calibrator, "free"):
            calibrator.free()
    if serialized is None:
        detail = "; ".join(" ".join(m.split()) for m in logger.errors()[-3:]) or "no reason given"
        raise BuildError(f"{model_path}: {product(module)} build failed: {detail}")
    data = bytes(memoryview(serialized))

    if options.get("sparse_weights"):  # what the builder's log says about sparsity, verbatim, one note a line
        sparse_log = [" ".join(m.split()) for _, m in logger.messages if "spars" in m.lower()]
        notes.append("sparse_weights: BuilderFlag.SPARSE_WEIGHTS set; builder log: "
                     + (" | ".join(sparse_log) if sparse_log else "no line about sparsity"))
    timing_bytes = _save_timing_cache(config, timing_path) if timing_path is not None else None
    if timing_path is not None and is_rtx(module):
        notes.append("TensorRT-RTX accepts a timing cache but does not use it (it compiles kernels at run time)")

    device = None if is_rtx(module) else gpu_info()
    info: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "builder": builder_name,
        "module": module.__name__,
        "tensorrt_version": version_string(module),
        "device": device if isinstance(device, dict) else None,
        "compute_capabilities": targets or (["all supported by " + product(module)] if is_rtx(module) else []),
        "precision": {
            "mode": options.get("precision") or "auto",
            "flags": flags,
            "strongly_typed": strongly,
            "qdq": qdq,
            "layer_precisions": layer_precisions,
            "calibration": calibration,
        },
        "dla_core": dla_core,
        "inputs": [_tensor_entry(module, network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [_tensor_entry(module, network.get_output(i)) for i in range(network.num_outputs)],
        "profiles": profiles,
        "source": {"file": model_path.name, "sha256": sha256_file(model_path)},
        "engine": {"file": out.name, "bytes": len(data), "sha256": sha256_bytes(data)},
        "timing_cache": None if timing_path is None else {"file": str(timing_path), "loaded": timing_loaded,
                                                           "bytes": timing_bytes},
        "trtkit_version": _trtkit_version(),
        "notes": notes,
    }
    sidecar = sidecar_path(out)
    # The sidecar goes first: an engine never appears without the facts needed to check it before loading.
    write_text(sidecar, json.dumps(info, indent=2, sort_keys=True) + "\n")
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return BuildResult(out, sidecar, info, notes + logger.warnings())


def _trtkit_version() -> str:
    from trtkit import __version__

    return __version__


def _tensor_entry(module: ModuleType, tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": _dtype_name(module, tensor.dtype), "shape": int_dims(tensor.shape)}


def _set_compute_capabilities(module: ModuleType, config: Any, wanted: list[str]) -> list[str]:
    members = {name.lower(): value for name, value in module.ComputeCapability.__members__.items()}
    chosen = []
    for item in wanted:
        key = item.strip().lower().replace(".", "")
        key = key if key.startswith("sm") or key in members else "sm" + key
        if key not in members or key == "none":
            choices = [m for m in members if m != "none"]
            raise OptionError(f"option 'compute_capability': {unknown_name('compute capability', item, choices)}")
        chosen.append(key)
    chosen = sorted(set(chosen))
    config.num_compute_capabilities = len(chosen)
    for index, key in enumerate(chosen):
        config.set_compute_capability(members[key], index)
    return chosen


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None, where: str) -> tuple[Any, bool]:
    data = b""
    loaded = False
    if path is not None and path.is_file():
        data = path.read_bytes()
        loaded = True
    with quiet_deprecations():
        try:
            cache = config.create_timing_cache(data)
        except Exception:
            cache = None
        if cache is None:
            raise InputFileError(f"{path}: not a timing cache {where} can read (delete it to start a new one)")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise InputFileError(f"{path}: timing cache was made by another TensorRT version or GPU; delete it")
    return cache, loaded


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> int:
    with quiet_deprecations():
        cache = config.get_timing_cache()
        data = bytes(memoryview(cache.serialize())) if cache is not None else b""
    write_bytes(path, data)
    return len(data)


def make_progress_monitor(module: ModuleType, console: Any) -> Any:
    """An IProgressMonitor (TensorRT >= 10, RTX) drawing TensorRT's build phases as rich progress bars on
    `console`; None when the module has no progress monitor. Returns (monitor, progress) via attributes."""
    if not hasattr(module, "IProgressMonitor"):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                        transient=True)

    class ProgressMonitor(module.IProgressMonitor):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            module.IProgressMonitor.__init__(self)
            self.progress = progress
            self.tasks: dict[str, Any] = {}
            self.parents: dict[str, str | None] = {}
            self.phases: list[str] = []

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth, parent = 0, parent_phase
            while parent is not None and depth < 8:
                depth += 1
                parent = self.parents.get(parent)
            self.parents[phase_name] = parent_phase
            self.phases.append(phase_name)
            self.tasks[phase_name] = self.progress.add_task("  " * depth + phase_name, total=max(num_steps, 1))

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.tasks:
                self.progress.update(self.tasks[phase_name], completed=step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            task = self.tasks.pop(phase_name, None)
            if task is not None:
                self.progress.remove_task(task)

    return ProgressMonitor()


def _dtype_name(module: ModuleType, dtype: Any) -> str:
    try:
        import numpy as np

        return str(np.dtype(module.nptype(dtype)))
    except Exception:
        return str(getattr(dtype, "name", dtype)).lower()
