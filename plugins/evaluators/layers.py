"""The `layers` evaluator: per-tensor INT8 error under ONNX node names, per-layer sensitivity, and a
mixed-precision search that keeps the fewest layers in float to meet an accuracy target.

models: [FP32 reference .onnx, QDQ candidate .onnx]. A "layer" is a node of the candidate (not a Q/DQ node)
with at least one input coming from a DequantizeLinear. Keeping a layer "in float" rewires its inputs
around the Q/DQ pairs (activations) and replaces its int8 weights by their dequantized float values: the
model `trtkit quantize --exclude NAME` builds, judged here without re-calibrating.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trtkit import metrics
from trtkit.errors import DataError, NotApplicable, OptionError, unknown_name
from trtkit.evaluation import check_same_inputs, load_batches, open_model, run_batches
from trtkit.model import ModelArtifact
from trtkit.stages import EvaluationResult

from .shards import execution, sharded_variants, variant_batches, variant_runner

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def evaluate_layers(models: list[str], data: str | None, num_samples: int, batch_size: int, seed: int,
                    output: str | None, sensitivity: str, target_sqnr: float | None, target_cosine: float | None,
                    top: int, workers: int = 1, address: str | None = None) -> EvaluationResult:
    if len(models) != 2:
        raise OptionError("layers needs exactly two models: FP32_REFERENCE.onnx QDQ_CANDIDATE.onnx")
    reference, candidate = models
    for path in models:
        if not str(path).endswith(".onnx"):
            raise NotApplicable(f"{path}: layers works on ONNX models (per-layer debugging needs the graph)")
    if target_sqnr is not None and target_cosine is not None:
        raise OptionError("give one search target: target_sqnr or target_cosine, not both")
    run_on = execution(workers, address, data)
    ref_art, cand_art = ModelArtifact.load(reference), ModelArtifact.load(candidate)
    ref_runner, cand_runner = open_model(reference), open_model(candidate)
    check_same_inputs(reference, ref_runner, candidate, cand_runner)
    outputs = list(ref_runner.output_names)
    judged = output or outputs[0]
    if judged not in outputs:
        raise unknown_name("output", judged, outputs)
    if judged not in cand_runner.output_names:
        raise DataError(f"{candidate} has no output '{judged}'")
    batches = load_batches(data, reference, num_samples or (0 if data else 32), batch_size, seed)
    if not batches:
        raise DataError(f"{data}: no samples")

    layers = quantized_layers(cand_art.model)
    if not layers:
        raise NotApplicable(f"{candidate}: no quantized layer (no node reads a DequantizeLinear output)")

    tensors = _tensor_errors(ref_art, cand_art, batches)
    ref_out = run_batches(ref_runner, batches, "reference")[judged]

    def score(float_layers: Iterable[str]) -> tuple[float, float]:
        variant = keep_in_float(cand_art, float_layers)
        out = run_batches(open_model_from(variant), batches, "variant")[judged]
        return metrics.sqnr_db(ref_out, out), metrics.cosine(ref_out, out)

    cache: dict[frozenset[str], tuple[float, float]] = {}

    def cached(float_layers: Iterable[str]) -> tuple[float, float]:
        key = frozenset(float_layers)
        if key not in cache:
            cache[key] = score(key)
        return cache[key]

    names = [node.name for node in layers]
    ops = {node.name: node.op_type for node in layers}
    full = cached(())
    result: dict[str, Any] = {
        "reference": reference, "candidate": candidate, "output": judged, "num_samples": _count(batches),
        "mode": "Q/DQ emulated in float", "tensors": tensors, "layers": names,
        "output_sqnr_db": full[0], "output_cosine": full[1], "sensitivity_mode": sensitivity,
    }
    ranking: list[dict[str, Any]] = []
    from trtkit.ui import track

    def score_all(variants: list[tuple[str, ...]]) -> list[tuple[float, float]]:
        """The scores of several variants: on workers, those not cached yet run together, split between them."""
        if not run_on.in_process:
            missing = list({frozenset(v): v for v in variants if frozenset(v) not in cache}.values())
            if missing:
                assert data is not None  # execution() refuses workers without data
                outputs = sharded_variants(_variant_outputs, candidate, reference, judged, missing, data,
                                           num_samples, batch_size, run_on)
                for in_float, out in zip(missing, outputs, strict=True):
                    cache[frozenset(in_float)] = metrics.sqnr_db(ref_out, out), metrics.cosine(ref_out, out)
        return [cached(v) for v in variants]

    if not run_on.in_process and sensitivity != "none":  # the sweep's variants on the workers, into the cache
        score_all([tuple(n for n in names if n != name) if sensitivity == "single" else (name,) for name in names])

    if sensitivity == "single":
        for name in track(names, total=len(names), description="sensitivity"):
            sqnr, cos = cached(n for n in names if n != name)
            ranking.append({"node": name, "op": ops[name], "sqnr_db": sqnr, "cosine": cos})
        ranking.sort(key=lambda item: (item["sqnr_db"], item["node"]))
    elif sensitivity == "leave-one-out":
        for name in track(names, total=len(names), description="sensitivity"):
            sqnr, cos = cached([name])
            ranking.append({"node": name, "op": ops[name], "sqnr_db": sqnr, "cosine": cos,
                            "gain_db": sqnr - full[0]})
        ranking.sort(key=lambda item: (-item["gain_db"], item["node"]))
    result["sensitivity"] = ranking
    if ranking:
        result["offenders"] = [item["node"] for item in ranking]
    else:
        node_of = {t["node"]: t for t in tensors}
        result["offenders"] = [t["node"] for t in sorted(node_of.values(), key=lambda t: _key(t["sqnr_db"]))]

    passed = True
    if target_sqnr is not None or target_cosine is not None:
        order = result["offenders"] + [n for n in names if n not in result["offenders"]]
        order = [n for n in order if n in ops]
        search = _search(order, score_all, 1 if run_on.in_process else run_on.slots(), target_sqnr, target_cosine)
        result["search"] = search
        result["exclude"] = search["exclude"]
        passed = search["met"]
    summary = _summary(result, top)
    return EvaluationResult(data=result, summary=summary, passed=passed)


def _variant_outputs(shared: tuple[Any, str], item: tuple[Any, Any, list[tuple[str, ...]]]) -> list[np.ndarray]:
    """On a worker (`eval layers` with workers): the judged output of each variant of the item."""
    import onnx

    candidate, judged = shared
    artifact = ModelArtifact.from_model(onnx.load_from_string(candidate.onnx))
    batches = variant_batches(item)
    return [run_batches(variant_runner(candidate, keep_in_float(artifact, in_float).model), batches, "variant")[judged]
            for in_float in item[2]]


def _count(batches: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(b.values()))) for b in batches)


def _key(value: float) -> float:
    return float("inf") if value is None or np.isnan(value) else float(value)


def open_model_from(artifact: ModelArtifact) -> Any:
    from trtkit.runners import OrtRunner

    return OrtRunner(artifact, emulate_qdq=True)


# ---- graph helpers ---------------------------------------------------------------------------------------
def quantized_layers(model: Any) -> list[Any]:
    """Non-Q/DQ nodes reading at least one DequantizeLinear output, in graph order."""
    dq_outputs = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [node for node in model.graph.node
            if node.op_type not in _QDQ and any(name in dq_outputs for name in node.input)]


def keep_in_float(artifact: ModelArtifact, names: Iterable[str]) -> ModelArtifact:
    """A copy where the named layers read float inputs: activation Q->DQ pairs are bypassed, int8 weights are
    replaced by dequantized float initializers; Q/DQ nodes left unused are removed."""
    from onnx import numpy_helper

    wanted = set(names)
    result = artifact.copy()
    graph = result.model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    known = {node.name for node in graph.node}
    missing = sorted(wanted - known)
    if missing:
        raise unknown_name("node", missing[0], known)
    added: dict[str, Any] = {}
    for node in graph.node:
        if node.name not in wanted:
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            if source in inits:
                float_name = f"{name}_float"
                if float_name not in added:
                    added[float_name] = numpy_helper.from_array(_dequantize(result, dq, inits), float_name)
                node.input[index] = float_name
            else:
                q = producers.get(source)
                if q is not None and q.op_type == "QuantizeLinear":
                    node.input[index] = q.input[0]
    graph.initializer.extend(added.values())
    _prune(result.model)
    return result


def _dequantize(artifact: ModelArtifact, dq: Any, inits: dict[str, Any]) -> np.ndarray:
    values = artifact.tensor(inits[dq.input[0]]).astype(np.float32)
    scale = artifact.tensor(inits[dq.input[1]]).astype(np.float32)
    zero = artifact.tensor(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else 0.0
    if np.ndim(scale) == 1 and values.ndim > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return ((values - zero) * scale).astype(np.float32)


def _prune(model: Any) -> None:
    """Remove nodes whose outputs nobody reads (repeatedly), then unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(graph.node) if not any(out in used for out in node.output)]
        if not dead:
            break
        for index in reversed(dead):
            del graph.node[index]
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _tensor_errors(ref_art: ModelArtifact, cand_art: ModelArtifact, batches: list[dict[str, np.ndarray]],
                   ) -> list[dict[str, Any]]:
    """SQNR/cosine of every tensor that both graphs produce (by name), in the reference's graph order."""
    from trtkit.runners import OrtRunner
    from trtkit.runtime import with_outputs

    cand_produced = {out for node in cand_art.model.graph.node if node.op_type not in _QDQ for out in node.output}
    order: list[tuple[str, str, str]] = []
    for node in ref_art.model.graph.node:
        for out in node.output:
            if out and out in cand_produced:
                order.append((out, node.name or out, node.op_type))
    if not order:
        raise DataError(f"{cand_art.source} and {ref_art.source} share no tensor names: cannot compare layers")
    names = [t for t, _, _ in order]
    ref_values = run_batches(OrtRunner(with_outputs(ref_art, names)), batches, "reference tensors")
    cand_values = run_batches(OrtRunner(with_outputs(cand_art, names)), batches, "candidate tensors")
    rows = []
    for tensor, node, op in order:
        a, b = ref_values[tensor], cand_values[tensor]
        if a.shape != b.shape:
            continue
        rows.append({"tensor": tensor, "node": node, "op": op, "sqnr_db": metrics.sqnr_db(a, b),
                     "cosine": metrics.cosine(a, b), "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0})
    return rows


# ---- mixed precision -----------------------------------------------------------------------------------------
def _search(order: list[str], score_all: Any, width: int, target_sqnr: float | None, target_cosine: float | None,
            ) -> dict[str, Any]:
    """Greedy: keep layers in float worst-first until the target is met, then drop any that is not needed.

    score_all(variants) -> [(sqnr, cosine)] scores `width` variants at a time (the workers' slots): the steps one
    at a time would take next, each assuming the ones before it in the round fail; the first that succeeds ends
    the round. The result is the one-at-a-time result; only scores past a success are spent for nothing."""

    def meets(score: tuple[float, float]) -> bool:
        sqnr, cos = score
        return sqnr >= target_sqnr if target_sqnr is not None else cos >= float(target_cosine)  # type: ignore[arg-type]

    target = {"target_sqnr": target_sqnr} if target_sqnr is not None else {"target_cosine": target_cosine}
    # Forward: the shortest prefix of `order` in float that meets the target.
    found: tuple[int, tuple[float, float]] | None = None
    score = (math.nan, math.nan)
    for first in range(0, len(order) + 1, width):
        sizes = range(first, min(first + width, len(order) + 1))
        for size, score in zip(sizes, score_all([tuple(order[:size]) for size in sizes]), strict=True):
            if meets(score):
                found = size, score
                break
        if found:
            break
    if found is None:
        return {**target, "met": False, "exclude": list(order), "sqnr_db": score[0], "cosine": score[1],
                "note": "the target is not met even with every quantized layer in float"}
    chosen, score = list(order[:found[0]]), found[1]
    # Prune: try dropping each chosen layer, least harmful (latest added) first.
    candidates, at = chosen[::-1], 0
    while at < len(candidates):
        batch = candidates[at:at + width]
        trials = [[n for n in chosen if n != name] for name in batch]
        at += len(batch)
        for offset, (trial, trial_score) in enumerate(zip(trials, score_all([tuple(t) for t in trials]), strict=True)):
            if meets(trial_score):
                chosen, score = trial, trial_score
                at -= len(batch) - offset - 1  # the later trials of this round assumed this one failed
                break
    exclude = [n for n in order if n in chosen]
    return {**target, "met": True, "exclude": exclude, "sqnr_db": score[0], "cosine": score[1],
            "quantized_layers": len(order) - len(exclude), "float_layers": len(exclude),
            "command": " ".join(f"--exclude {n}" for n in exclude)}


def _summary(result: dict[str, Any], top: int) -> str:
    lines = [f"{Path(result['candidate']).name} vs {Path(result['reference']).name}: output '{result['output']}' "
             f"SQNR {result['output_sqnr_db']:.2f} dB, cosine {result['output_cosine']:.5f} "
             f"({len(result['layers'])} quantized layers, {result['num_samples']} samples, Q/DQ in float)"]
    if result["sensitivity"]:
        mode = result["sensitivity_mode"]
        header = "only this layer in INT8" if mode == "single" else "this layer alone in float"
        lines.append(f"worst layers (output SQNR with {header}):")
        for item in result["sensitivity"][:top]:
            lines.append(f"  {item['node']:<32} {item['op']:<10} {item['sqnr_db']:8.2f} dB")
    lines.append("per-tensor error (graph order, worst first):")
    for row in sorted(result["tensors"], key=lambda t: _key(t["sqnr_db"]))[:top]:
        lines.append(f"  {row['tensor']:<32} {row['node']:<24} {row['sqnr_db']:8.2f} dB  cos {row['cosine']:.5f}")
    search = result.get("search")
    if search:
        if search["met"]:
            lines.append(f"mixed precision: {len(search['exclude'])} layer(s) kept in float -> output SQNR "
                         f"{search['sqnr_db']:.2f} dB, cosine {search['cosine']:.5f}")
            lines.append(f"  trtkit quantize ... {search['command']}" if search["exclude"] else
                         "  every layer can stay INT8")
        else:
            lines.append("mixed precision: " + search["note"])
    return "\n".join(lines)
