"""2:4 semi-structured sparsity for TensorRT's sparse tensor cores (Ampere and later, Jetson Orin included).

TensorRT's rule (TensorRT developer guide, "Structured Sparsity"): for a Convolution with kernel weights
[K, C, R, S], every group of 4 consecutive input channels (for each output channel k and kernel position
r, s) holds at least 2 zeros; for a fully connected layer / MatMul with constant weights, every group of 4
consecutive input elements of each output. trtkit makes that pattern by magnitude: in every group of 4 the 2
largest |w| stay, the others become 0. TensorRT then decides per layer, by timing, whether a sparse kernel
is faster (`BuilderFlag.SPARSE_WEIGHTS` must be set; the tensorrt builder's `sparse_weights` option).

Eligibility, per layer, as `eligibility()` reports it:
- Conv with constant weights, 1 group (grouped/depthwise convolutions have no sparse kernels), 2D; Gemm or
  MatMul with a constant 2-D weight; ConvTranspose and weights computed in the graph are left alone.
- input channels (C per group, or K of the GEMM) a multiple of 4 (the pattern is defined on groups of 4).
- `aligned`: output and input channels multiples of 32 for INT8 (16 for FP16): NVIDIA's guidance for
  layers whose sparse kernels run faster than dense ones; layers that are eligible but not aligned get
  the mask (it is valid) and are listed, since TensorRT will likely pick a dense kernel for them.

Everything here works on numpy arrays (the ONNX pass) or torch tensors (`apply_torch`); torch is imported
inside functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from trtkit.errors import OptionError

ALIGNMENT = {"int8": 32, "fp16": 16, "fp32": 16}


def mask_2of4(weight: np.ndarray, axis: int = 1) -> np.ndarray:
    """A 0/1 mask (weight's dtype) keeping the 2 largest |w| of every 4 consecutive values along `axis`."""
    import numpy as np

    moved = np.moveaxis(np.asarray(weight), axis, -1)
    if moved.shape[-1] % 4:
        raise OptionError(f"2:4 sparsity needs a multiple of 4 along axis {axis}, got {moved.shape[-1]}")
    groups = np.abs(moved).reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    order = np.argsort(-groups, axis=-1, kind="stable")  # ties: the first positions stay
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis).astype(np.asarray(weight).dtype)


def is_2of4(weight: np.ndarray, axis: int = 1) -> bool:
    """Every 4 consecutive values along `axis` hold at least 2 zeros."""
    import numpy as np

    moved = np.moveaxis(np.asarray(weight), axis, -1)
    if moved.shape[-1] % 4:
        return False
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    return bool(((groups == 0).sum(-1) >= 2).all())


def _row(name: str, op: str, shape: list[int], in_channels: int, out_channels: int, groups: int,
         precision: str, axis: int) -> dict[str, Any]:
    reason = ""
    if groups != 1:
        reason = f"grouped convolution ({groups} groups): TensorRT has no sparse kernels for it"
    elif in_channels % 4:
        reason = f"{in_channels} input channels: not a multiple of 4"
    align = ALIGNMENT[precision]
    aligned = not reason and in_channels % align == 0 and out_channels % align == 0
    return {"layer": name, "op": op, "shape": shape, "in_channels": in_channels, "out_channels": out_channels,
            "groups": groups, "eligible": not reason, "aligned": aligned, "axis": axis,
            "reason": reason or ("" if aligned else f"channels not multiples of {align} ({precision}): valid "
                                 f"pattern, TensorRT will likely keep a dense kernel")}


def eligibility(model: Any, precision: str = "int8") -> list[dict[str, Any]]:
    """One row per Conv/Gemm/MatMul of an ONNX model with constant weights: can TensorRT run it 2:4 sparse?"""
    if precision not in ALIGNMENT:
        raise OptionError(f"precision must be one of {', '.join(ALIGNMENT)}, got {precision!r}")
    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        name = node.name or node.output[0]
        if node.op_type == "Conv":
            if len(dims) != 4:
                continue
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            rows.append(_row(name, "Conv", dims, dims[1], dims[0], groups, precision, 1))
        elif len(dims) == 2:
            trans_b = node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transB"), 0)
            k, n = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
            rows.append(_row(name, node.op_type, dims, k, n, 1, precision, 1 if trans_b else 0))
    return rows


def sparsify_onnx(artifact: Any, precision: str = "int8", layers: Iterable[str] | None = None,
                  aligned_only: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """A copy of the ONNX model with 2:4 magnitude masks on every eligible layer's weight initializer.

    layers: only these layer (node) names; aligned_only: only layers TensorRT will likely run sparse.
    Returns (artefact, eligibility rows with `masked` set). A weight shared by several nodes is left alone.
    """
    import numpy as np
    from onnx import numpy_helper

    from trtkit.model import as_artifact

    source = as_artifact(artifact, "model")
    result = source.copy()
    model = result.model
    wanted = set(layers) if layers is not None else None
    rows = eligibility(model, precision)
    if wanted is not None:
        unknown = wanted - {row["layer"] for row in rows}
        if unknown:
            from trtkit.errors import unknown_name

            raise unknown_name("layer", sorted(unknown)[0], [row["layer"] for row in rows])
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    by_name = {node.name or node.output[0]: node for node in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    for row in rows:
        weight_name = by_name[row["layer"]].input[1]
        chosen = row["eligible"] and (wanted is None or row["layer"] in wanted) and (row["aligned"] or not aligned_only)
        row["masked"] = bool(chosen and uses.get(weight_name, 0) == 1)
        if not row["masked"]:
            continue
        tensor = inits[weight_name]
        weight = numpy_helper.to_array(tensor)
        masked = (weight * mask_2of4(weight, row["axis"])).astype(weight.dtype)
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(masked), weight_name))
    result.metadata["sparsity"] = {"pattern": "2:4", "precision": precision,
                                   "masked": [row["layer"] for row in rows if row["masked"]]}
    return result, rows


def apply_torch(model: Any, precision: str = "int8", aligned_only: bool = False,
                skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Put 2:4 magnitude masks on the eligible Conv2d/Linear weights of a torch model, in place.

    Returns one eligibility row per Conv2d/Linear (`masked` says whether it got the mask). `trtkit.distill`
    keeps the zeros while it fine-tunes (it re-applies the pattern it finds when it starts).
    """
    import torch
    from torch import nn

    if precision not in ALIGNMENT:
        raise OptionError(f"precision must be one of {', '.join(ALIGNMENT)}, got {precision!r}")
    skipped = set(skip)
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shape = list(module.weight.shape)
            row = _row(name, "Conv", shape, shape[1], shape[0], module.groups, precision, 1)
        elif isinstance(module, nn.Linear):
            shape = list(module.weight.shape)
            row = _row(name, "Gemm", shape, shape[1], shape[0], 1, precision, 1)
        else:
            continue
        row["masked"] = row["eligible"] and name not in skipped and (row["aligned"] or not aligned_only)
        if row["masked"]:
            with torch.no_grad():
                weight = module.weight.detach().cpu().numpy()
                mask = torch.from_numpy(mask_2of4(weight, 1)).to(module.weight.device)
                module.weight.mul_(mask)
        rows.append(row)
    return rows
