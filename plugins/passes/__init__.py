"""Built-in graph passes: simplify, optimize, fold-batchnorm, fuse-preprocess, remove-sigmoid.

One pass per module (`simplify.py`, `optimize.py`, `fold_batchnorm.py`, `fuse_preprocess.py`,
`remove_sigmoid.py`; `common.py` holds what several of them share); this module only declares them and
registers them through `register_passes`, exactly as a third-party plugin does. A pass module is imported
when its pass runs, so `trtkit --help` never loads them (nor numpy, onnx or onnx-graphsurgeon).

Every pass takes a ModelArtifact and returns a new one (the input is never modified) through
`trtkit.graph.rewrite`: it works on the main graph through onnx-graphsurgeon, rewrites only patterns it fully
understands (constant operands, known shapes, single consumers) and leaves everything else alone, so models
with control flow (If/Loop/Scan) or recurrent ops (LSTM/GRU) keep running. Constant folding is
onnxruntime-evaluated, shape-aware, and redone after every rewrite.

The passes are plain functions too: `trtkit.plugins.passes.simplify.simplify(artifact, ...)`, and likewise
`optimize.optimize`, `fuse_preprocess.fuse_preprocess`, `remove_sigmoid.remove_sigmoid`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trtkit import hookimpl
from trtkit.stages import GraphPass, Option

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


def _simplify(artifact: ModelArtifact, **options: Any) -> ModelArtifact:
    from .simplify import simplify

    return simplify(artifact, **options)


def _optimize(artifact: ModelArtifact, **options: Any) -> ModelArtifact:
    from .optimize import optimize

    return optimize(artifact, **options)


def _fold_batchnorm(artifact: ModelArtifact) -> ModelArtifact:
    from .optimize import optimize

    return optimize(artifact, fold_affine=False, merge_transposes=False, merge_reshapes=False)


def _fuse_preprocess(artifact: ModelArtifact, **options: Any) -> ModelArtifact:
    from trtkit.ui import console

    from .fuse_preprocess import fuse_preprocess

    result = fuse_preprocess(artifact, **options)
    info = result.metadata.get("preprocess")
    if info is not None and info is not artifact.metadata.get("preprocess"):  # folded now, not in an earlier run
        convs = ", ".join(f["conv"] for f in info.get("folded_into", []))
        console.print(f"fused preprocessing of input '{info['input']}' into {convs}; the model now takes raw "
                      f"input in {info.get('raw_range')}")
    return result


def _preprocess_difference(result: ModelArtifact) -> float | None:
    """What fuse-preprocess measured when it proved its relation (None when it did not check)."""
    value = result.metadata.get("preprocess", {}).get("max_abs_diff")
    return None if value is None else float(value)


def _remove_sigmoid(artifact: ModelArtifact, **options: Any) -> ModelArtifact:
    from .remove_sigmoid import check_thresholds, remove_sigmoid

    check_thresholds(options)
    return remove_sigmoid(artifact, **options)


PASSES = [
    GraphPass(
        name="simplify",
        description="Shape inference, constant folding, no-op/duplicate/dead node removal; optional static shapes",
        options={
            "fold": Option("bool", True, "constant-fold (onnxruntime-evaluated, shape subgraphs included)"),
            "input_shapes": Option("dict", None, 'fix dynamic inputs to static shapes, e.g. {"image": [1,3,64,64]}'),
            "remove_noops": Option("bool", True, "remove Identity, Dropout, same-type Cast, x*1, x+0, ..."),
            "dedupe": Option("bool", True, "merge identical nodes (common subexpressions)"),
            "infer": Option("bool", True, "run onnx shape inference before and after"),
        },
        apply=_simplify,
        default=True,
    ),
    GraphPass(
        name="optimize",
        description="Fold BatchNorm and per-channel Mul/Add into Conv/Gemm, merge transposes and reshapes, refold",
        options={
            "fold_bn": Option("bool", True, "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"),
            "fold_affine": Option("bool", True, "fold per-channel Mul/Div/Add/Sub by constants into the Conv"),
            "merge_transposes": Option("bool", True, "compose consecutive Transposes"),
            "merge_reshapes": Option("bool", True, "skip a Reshape/Flatten/Squeeze/Unsqueeze feeding a Reshape"),
        },
        apply=_optimize,
        default=True,
    ),
    GraphPass(
        name="fold-batchnorm",
        description="Only the BatchNorm folding part of 'optimize'",
        options={},
        apply=_fold_batchnorm,
    ),
    GraphPass(
        name="fuse-preprocess",
        description="Fold input scaling, mean/std and RGB<->BGR swap into the first Conv (model takes raw input)",
        options={
            "input": Option("str", None, "the image input (default: the only float 4-D input)"),
            "scale": Option("list", None, "declared raw-input scale, e.g. 0.00392156862745098 (=1/255)"),
            "mean": Option("list", None, "declared mean per channel (after scaling)"),
            "std": Option("list", None, "declared std per channel (after scaling)"),
            "swap_rb": Option("bool", False, "the device feeds BGR to an RGB model (or the reverse)"),
            "input_dtype": Option("str", "float32", "type of the new raw input: float32, or uint8 (camera bytes; "
                                  "a Cast is added)", choices=("float32", "uint8")),
            "raw_range": Option("list", None, "low,high of the raw input for the check (default 0,255 if declared)"),
            "verify": Option("bool", True, "prove new(raw) == old(preprocess(raw)) with onnxruntime"),
            "seed": Option("int", 0, "seed of the verification inputs"),
        },
        apply=_fuse_preprocess,
        exact=False,
        measured_difference=_preprocess_difference,
    ),
    GraphPass(
        name="remove-sigmoid",
        description="Remove Sigmoids feeding outputs (scores become logits); thresholds converted to logits",
        options={
            "thresholds": Option("dict", None, 'probability thresholds per name, e.g. {"score": 0.25}'),
            "threshold": Option("float", None, "one probability threshold for every affected output"),
            "verify": Option("bool", True, "prove sigmoid(new) == old on changed elements, identical elsewhere"),
            "seed": Option("int", 0, "seed of the verification inputs"),
        },
        apply=_remove_sigmoid,
        exact=False,
    ),
]


@hookimpl
def register_passes(register: Callable[[GraphPass], None]) -> None:
    for graph_pass in PASSES:
        register(graph_pass)
