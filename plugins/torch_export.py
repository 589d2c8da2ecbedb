"""Built-in exporter `torch`: a torch.nn.Module (or a `file.py:factory` / `package.module:factory` spec) to ONNX.

Uses torch's dynamo exporter when onnxscript is installed and the TorchScript exporter otherwise (`exporter`
forces one). Checkpoints load with `torch.load(weights_only=True)`. After export the model goes through the
onnx checker and shape inference, and onnxruntime is compared with torch on the same seeded random input; the
max error is recorded in metadata["export"]. The file is re-saved through ModelArtifact, so the same module
and options give a byte-identical file whichever exporter ran.

torch, onnx and onnxruntime are imported inside functions (this module loads at CLI start-up).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtkit import hookimpl
from trtkit.errors import DataError, InputFileError, NumericalCheckError, OptionError, TrtkitError
from trtkit.stages import Exporter, Option

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact

EXPORTERS = ("auto", "dynamo", "torchscript")


# ---- source loading ----------------------------------------------------------------------------------------
def load_factory(spec: str) -> Callable[[], Any]:
    """`file.py:name` or `package.module:name` -> the callable (errors name the file, module or attribute)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise OptionError(f"model source '{spec}' must look like file.py:factory or package.module:factory")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        name = "trtkit_user_" + re.sub(r"\W", "_", str(path.resolve()))
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputFileError(f"{path}: not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise InputFileError(f"{path}: failed to import ({type(exc).__name__}: {exc})") from None
        where = str(path)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            raise InputFileError(f"module '{module_part}' not found ({exc.name})") from None
        where = module_part
    if not hasattr(module, attr):
        from trtkit.errors import unknown_name

        candidates = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise unknown_name(f"factory in {where}", attr, candidates)
    factory = getattr(module, attr)
    if not callable(factory):
        raise OptionError(f"{where}:{attr} is not callable")
    return factory


def resolve_module(source: Any) -> tuple[Any, str]:
    """(torch module in eval mode, description of the source)."""
    import torch

    if isinstance(source, torch.nn.Module):
        return source, type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        factory = load_factory(text)
        try:
            module = factory()
        except TrtkitError:
            raise
        except Exception as exc:
            raise OptionError(f"factory '{text}' failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(module, torch.nn.Module):
            raise OptionError(f"factory '{text}' returned {type(module).__name__}, not a torch.nn.Module")
        return module, text
    raise OptionError(f"export source must be a torch.nn.Module or a 'file.py:factory' spec, not {type(source).__name__}")


def load_checkpoint(module: Any, path: str | os.PathLike[str]) -> None:
    """Load a state dict with torch.load(weights_only=True); accepts {'state_dict': ...} / {'model': ...} wrappers."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path}: not a loadable weights-only checkpoint ({first[:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict, found {type(state).__name__}")
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = f"missing {result.missing_keys[0]!r}" if result.missing_keys else ""
        unexpected = f"unexpected {result.unexpected_keys[0]!r}" if result.unexpected_keys else ""
        detail = ", ".join(x for x in (missing, unexpected) if x)
        count = len(result.missing_keys) + len(result.unexpected_keys)
        raise DataError(f"{path}: checkpoint does not match the model ({count} keys differ: {detail})")


# ---- shapes and names --------------------------------------------------------------------------------------
def parse_shape(text: Any) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(d) for d in text]
    parts = [p for p in re.split(r"[x*, ]+", str(text).strip()) if p]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise OptionError(f"input shape '{text}' must be dims separated by 'x', e.g. 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise OptionError(f"input shape '{text}' must have positive dims")
    return dims


def _shapes(input_shapes: Any, input_names: list[str] | None) -> tuple[list[str], list[list[int]]]:
    if input_shapes is None:
        raise OptionError("export needs the input shape(s): option 'input_shapes', e.g. 1x3x224x224 "
                          "(CLI: --input NAME:1x3x224x224)")
    if isinstance(input_shapes, Mapping):
        names = list(input_shapes)
        shapes = [parse_shape(v) for v in input_shapes.values()]
        if input_names and list(input_names) != names:
            raise OptionError("options 'input_names' and 'input_shapes' name different inputs")
        return names, shapes
    items = [input_shapes] if isinstance(input_shapes, str) else list(input_shapes)
    if items and all(isinstance(d, int) for d in items):
        items = [items]
    shapes = [parse_shape(item) for item in items]
    names = list(input_names) if input_names else (["input"] if len(shapes) == 1 else
                                                   [f"input_{i}" for i in range(len(shapes))])
    if len(names) != len(shapes):
        raise OptionError(f"{len(names)} input names but {len(shapes)} input shapes")
    return names, shapes


def _flatten_outputs(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten_outputs(v)]
    return []


def choose_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        from trtkit.errors import unknown_name

        raise unknown_name("torch exporter", exporter, EXPORTERS)
    if exporter != "auto":
        if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            raise OptionError("exporter 'dynamo' needs onnxscript (pip install onnxscript)")
        return exporter
    return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"


# ---- export ------------------------------------------------------------------------------------------------
def export_torch(
    source: Any,
    output: str | os.PathLike[str],
    input_shapes: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = False,
    dynamic_axes: dict[str, Any] | None = None,
    opset: int = 17,
    exporter: str = "auto",
    checkpoint: str | None = None,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    input_range: list[Any] | None = None,
    seed: int = 0,
) -> ModelArtifact:
    """Export, check (checker, shape inference, onnxruntime vs torch), and write `output` atomically."""
    import tempfile
    import warnings

    import numpy as np
    import onnx
    import torch

    from trtkit.fileio import check_output_path
    from trtkit.graph import infer_shapes
    from trtkit.model import ModelArtifact

    check_output_path(output, checkpoint)
    if not 7 <= int(opset) <= 23:
        raise OptionError(f"opset {opset} is outside the supported range 7..23")
    module, description = resolve_module(source)
    if checkpoint:
        load_checkpoint(module, checkpoint)
    module.eval()
    names, shapes = _shapes(input_shapes, input_names)
    low, high = (float(v) for v in (input_range or [-1.0, 1.0])[:2])
    generator = torch.Generator().manual_seed(seed)
    example = tuple(torch.rand(*shape, generator=generator) * (high - low) + low for shape in shapes)
    with torch.no_grad():
        try:
            reference = _flatten_outputs(module(*example))
        except Exception as exc:
            raise OptionError(
                f"{description} fails on inputs of shape {' '.join('x'.join(map(str, s)) for s in shapes)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
    if not reference:
        raise OptionError(f"{description} returns no tensors")
    outputs = list(output_names) if output_names else (
        ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    )
    if len(outputs) != len(reference):
        raise OptionError(f"{len(outputs)} output names given but the model returns {len(reference)} tensors")
    axes: dict[str, Any] = {}
    if dynamic_batch:
        axes = {name: {0: "batch"} for name in [*names, *outputs]}
    for name, spec in (dynamic_axes or {}).items():
        if name not in names and name not in outputs:
            from trtkit.errors import unknown_name

            raise unknown_name("tensor in dynamic_axes", name, [*names, *outputs])
        axes[name] = {int(k): v for k, v in spec.items()} if isinstance(spec, Mapping) else {
            int(k): f"{name}_dim{k}" for k in spec}
    method = choose_exporter(exporter)

    with tempfile.TemporaryDirectory(prefix="trtkit-export-") as folder:
        raw = Path(folder) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                kwargs: dict[str, Any] = dict(
                    input_names=names, output_names=outputs, opset_version=int(opset),
                    dynamic_axes=axes or None,
                )
                if method == "dynamo":
                    torch.onnx.export(module, example, str(raw), dynamo=True, verbose=False, **kwargs)
                else:
                    torch.onnx.export(module, example, str(raw), dynamo=False, do_constant_folding=True, **kwargs)
            except TrtkitError:
                raise
            except Exception as exc:
                text = str(exc).strip().splitlines()
                detail = next((line for line in text if "Unsupported" in line or "not supported" in line),
                              text[0] if text else type(exc).__name__)
                raise OptionError(f"torch {method} export of {description} failed: {detail[:300]}") from None
        try:
            onnx.checker.check_model(str(raw), full_check=False)
        except Exception as exc:
            raise NumericalCheckError(f"exported model fails the onnx checker: {str(exc).splitlines()[0]}") from None
        model = onnx.load(str(raw))  # external data (dynamo writes some) read into memory here
    model = infer_shapes(model)
    metadata: dict[str, Any] = {
        "export": {
            "source": description, "exporter": method, "opset": int(opset), "inputs": dict(zip(names, shapes,
                                                                                               strict=True)),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in sorted(axes.items())},
            "checkpoint": Path(checkpoint).name if checkpoint else None,
        }
    }
    artifact = ModelArtifact.from_model(model, metadata)
    if check:
        errors = _compare_with_torch(artifact, names, outputs, example, reference, rtol, atol, method)
        metadata["export"]["max_abs_diff"] = max(errors.values()) if errors else 0.0
        metadata["export"]["max_abs_diff_per_output"] = errors
        artifact.metadata = metadata
    path = artifact.save(output)
    artifact.source, artifact.base_dir = path, path.parent
    _ = np  # numpy used by the comparison helper
    return artifact


def _compare_with_torch(artifact: ModelArtifact, names: list[str], outputs: list[str], example: tuple[Any, ...],
                        reference: list[Any], rtol: float, atol: float, method: str) -> dict[str, float]:
    import numpy as np

    from trtkit.runtime import run, session

    feeds = {name: tensor.numpy() for name, tensor in zip(names, example, strict=True)}
    session_inputs = {i.name for i in session(artifact).get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in session_inputs}
    got = run(session(artifact, optimization="disable"), feeds)
    errors: dict[str, float] = {}
    for name, ref_tensor in zip(outputs, reference, strict=True):
        ref = ref_tensor.detach().numpy().astype(np.float64)
        if name not in got:
            continue
        new = got[name].astype(np.float64)
        if new.shape != ref.shape:
            raise NumericalCheckError(
                f"exported output '{name}' has shape {list(new.shape)}, torch gives {list(ref.shape)}"
            )
        diff = float(np.max(np.abs(new - ref))) if ref.size else 0.0
        bound = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
        if not diff <= bound:
            raise NumericalCheckError(
                f"{method} export: onnxruntime output '{name}' differs from torch by {diff:.3g} (> {bound:.3g})"
            )
        errors[name] = diff
    return errors


def _export(source: Any, output: str | os.PathLike[str], **options: Any) -> ModelArtifact:
    return export_torch(source, output, **options)


def _load_model(source: Any, checkpoint: str | None = None) -> Any:
    module, _ = resolve_module(source)
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    return module.eval()


EXPORTER = Exporter(
    name="torch",
    description="torch.nn.Module or file.py:factory spec to ONNX (dynamo or TorchScript), checked against torch",
    options={
        "input_shapes": Option("list", None, "input shapes, e.g. 1x3x224x224 (several: comma-separated)",
                               required=False),
        "input_names": Option("list", None, "input names (default: input, or input_0, input_1, ...)"),
        "output_names": Option("list", None, "output names (default: output, or output_0, ...)"),
        "dynamic_batch": Option("bool", False, "make axis 0 of every input and output dynamic ('batch')"),
        "dynamic_axes": Option("dict", None, 'torch-style dynamic axes, e.g. {"image": {"0": "batch"}}'),
        "opset": Option("int", 17, "ONNX opset"),
        "exporter": Option("str", "auto", "auto (dynamo if onnxscript is installed), dynamo or torchscript",
                           choices=EXPORTERS),
        "checkpoint": Option("path", None, "state dict loaded with torch.load(weights_only=True)"),
        "check": Option("bool", True, "compare onnxruntime with torch on a random input"),
        "rtol": Option("float", 1e-3, "check tolerance relative to max |torch output|"),
        "atol": Option("float", 1e-4, "absolute check tolerance"),
        "input_range": Option("list", None, "low,high of the random check input (default -1,1)"),
        "seed": Option("int", 0, "seed of the check input"),
    },
    export=_export,
    load_model=_load_model,
    default=True,  # the exporter used when none is named
)


@hookimpl
def register_exporters(register: Callable[[Exporter], None]) -> None:
    register(EXPORTER)
