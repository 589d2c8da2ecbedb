"""trtkit: from a trained network to a fast, accurate edge deployment through ONNX and TensorRT.

The Python API mirrors the CLI. Heavy modules (onnx, onnxruntime, torch, tensorrt) load only when an API
function is first used, so `import trtkit` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .hookspecs import hookimpl

__version__ = "0.1.0"

# Public API name -> module that defines it (imported on first attribute access).
_LAZY = {
    "export": "trtkit.exporting",
    "optimize": "trtkit.optimizing",
    "calibrate": "trtkit.calibration",
    "quantize": "trtkit.plugins.qdq.insert",  # the qdq builder's rewrite, in its plugin
    "build": "trtkit.building",
    "evaluate": "trtkit.evaluation",
    "run_recipe": "trtkit.pipeline",
    "ModelArtifact": "trtkit.model",
    "load_model": "trtkit.model",
    # the PTQ passes as functions returning (new artefact, report); they live in the `ptq` plugin
    "equalize": "trtkit.plugins.ptq.equalize",
    "bias_correct": "trtkit.plugins.ptq.bias_correct",
    "qdq_tune": "trtkit.plugins.ptq.qdq_tune",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trtkit' has no attribute {name!r}")
