"""A recipe's [prune] and [distill] sections: the torch model is pruned and/or distilled before export, and
the report compares every artefact with the dense FP32 original in one table.

    [prune]
    criterion = "l1"          # any registered pruning criterion (`trtkit plugins`)
    target_flops = 0.7        # or ratio = 0.3, ratios = {"features.3" = 0.5}
    ignore = ["classifier"]
    [distill]
    epochs = 20               # data: the calibration data unless given
    device = "cuda"

The export step loads the model through its exporter's `load_model` capability, prunes it
(`trtkit.pruning.prune`), distils it from the unpruned original (`trtkit.distill.distill`), then exports
both: `model.onnx` (what the later steps work on, unchanged) and `dense.onnx` (the reference of the
compression table). `compression.json` records what was done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import OptionError

# recipe [prune] key -> trtkit.pruning.prune keyword
PRUNE_KEYS = {"criterion": "criterion", "ratio": "ratio", "ratios": "ratios", "global": "global_ranking",
              "target_flops": "target_flops", "ignore": "ignore", "round_to": "round_to", "options": "options",
              "reconstruct": "reconstruct", "keep_coupled": "keep_coupled"}


def example_shape(options: Mapping[str, Any], where: str) -> list[int]:
    """The first input's shape from the exporter options (pruning traces the model on it)."""
    shapes = options.get("input_shapes")
    if not shapes:
        raise OptionError(f"{where}: [prune] and [distill] need the input shape: [model] options.input_shapes")
    if isinstance(shapes, Mapping):  # {input name: shape}
        shapes = list(shapes.values())
    first = shapes[0] if isinstance(shapes, (list, tuple)) and not isinstance(shapes[0], int) else shapes
    text = first if isinstance(first, str) else "x".join(str(d) for d in first)
    dims = [int(d) for d in text.replace("*", "x").split("x") if d.strip()]
    if not dims or any(d <= 0 for d in dims):
        raise OptionError(f"{where}: input shape {text!r} must be positive dims, e.g. 1x3x224x224")
    return dims


def compress(model: Any, shape: list[int], prune: Mapping[str, Any] | None, distill: Mapping[str, Any] | None,
             data: str | None) -> tuple[Any, dict[str, Any]]:
    """(the pruned and/or distilled copy, what was done). The original `model` is the distillation teacher."""
    import torch

    from . import distill as kd
    from . import pruning

    report: dict[str, Any] = {}
    student = model
    samples = kd.load_samples(data) if data is not None else None
    if prune:
        given = {PRUNE_KEYS[key]: value for key, value in prune.items() if key in PRUNE_KEYS}
        start = time.perf_counter()
        student, report["prune"] = pruning.prune(model, torch.zeros(shape), data=samples, **given)
        report["prune"]["seconds"] = round(time.perf_counter() - start, 2)
    if distill:
        if samples is None:
            raise OptionError("[distill] needs data: give [distill] data or [calibration] data")
        if student is model:
            import copy

            student = copy.deepcopy(model)
        teacher = kd.teacher_copy(model)
        options = kd.options_from(distill)
        start = time.perf_counter()
        history = kd.distill(student, teacher, samples, **options)
        student.cpu()
        report["distill"] = {"loss": history, "seconds": round(time.perf_counter() - start, 2),
                             "samples": len(samples) if options.get("limit") is None else
                             min(len(samples), int(options["limit"])), **options}
    return student, report


# ---- the report's table -------------------------------------------------------------------------------------
def onnx_counts(path: str | Path) -> dict[str, int]:
    """{"macs": multiply-accumulates of Conv/Gemm/MatMul for batch 1, "params": initializer elements} from an
    ONNX file (QDQ models count their int8 weights). Output shapes come from one onnxruntime run on zeros
    (batch 1): shape inference loses them behind computed paddings."""
    import numpy as np
    import onnx

    from .runtime import session

    model = onnx.load(str(path))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [node.output[0] for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted if name not in known)
    sess = session(probe, emulate_qdq=False)
    feeds = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], np.float32)
             for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    shapes: dict[str, list[int]] = {name: list(value.shape) for name, value in zip(names, sess.run(None, feeds),
                                                                                    strict=True)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # weights behind DequantizeLinear keep their initializer's shape
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or weight is None:
            continue
        if node.op_type == "Conv":
            macs += int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            macs += int(np.prod(out)) * (weight[1] if node.op_type == "Gemm" and any(
                a.name == "transB" and a.i for a in node.attribute) else weight[0])
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 1 and
                 t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16))
    return {"macs": macs, "params": params}


def table(artefacts: list[tuple[str, Path]], data: str | None, runs: int = 20) -> dict[str, Any]:
    """One row per artefact (the first is the dense FP32 reference): MACs, params, onnxruntime CPU latency
    (batch 1, median of `runs`) and top-1 agreement with the reference on `data` (up to 256 samples)."""
    import numpy as np

    from .distill import load_samples
    from .runtime import session

    samples = load_samples(data)[:256] if data is not None else None
    rows = []
    reference = None
    for label, path in artefacts:
        sess = session(str(path), emulate_qdq=False)
        name = sess.get_inputs()[0].name
        example = samples[:1] if samples is not None else None
        if example is None:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]
            example = np.zeros(shape, np.float32)
        for _ in range(3):
            sess.run(None, {name: example})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            sess.run(None, {name: example})
            times.append(time.perf_counter() - start)
        row: dict[str, Any] = {"artefact": label, **onnx_counts(path), "latency_ms": float(np.median(times) * 1e3)}
        if samples is not None:
            top1 = np.concatenate([sess.run(None, {name: samples[i:i + 32]})[0].reshape(len(samples[i:i + 32]), -1)
                                   .argmax(1) for i in range(0, len(samples), 32)])
            reference = top1 if reference is None else reference
            row["agreement"] = float((top1 == reference).mean())
        rows.append(row)
    return {"rows": rows, "samples": 0 if samples is None else len(samples)}


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    from .fileio import write_text

    write_text(path, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
