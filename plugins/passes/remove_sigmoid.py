"""The `remove-sigmoid` pass: drop Sigmoids feeding graph outputs (scores become logits, which a detector
thresholds just as well and TensorRT computes for free); probability thresholds become logit thresholds.

It changes outputs by design (exact=False): it proves sigmoid(new) == old on the changed elements and
new == old everywhere else itself, with onnxruntime on random inputs.
"""

from __future__ import annotations

import math
from typing import Any

from trtkit.errors import DataError, NumericalCheckError, OptionError
from trtkit.graph import bypass, editable, is_graph_output, rewrite
from trtkit.model import ModelArtifact

_LAYOUT_OPS = ("Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise OptionError(f"remove-sigmoid: threshold {p!r} must be a probability strictly between 0 and 1")
    return math.log(p / (1.0 - p))


def remove_sigmoid(artifact: ModelArtifact, thresholds: dict[str, Any] | None = None,
                   threshold: float | None = None, verify: bool = True, seed: int = 0) -> ModelArtifact:
    """Remove Sigmoids feeding graph outputs (directly or through Concat/Reshape/Transpose/... chains).

    Consumers of a Sigmoid that are not on such a chain keep their Sigmoid. Probability thresholds become logit
    thresholds ln(p / (1 - p)) in metadata["thresholds"].
    """
    original = ModelArtifact(editable(artifact), artifact.base_dir, dict(artifact.metadata), artifact.source)
    removed: list[dict[str, Any]] = []

    def on_output_chain(tensor: Any, graph: Any, depth: int = 0) -> bool:
        """True if every path from tensor leads to graph outputs through layout ops only."""
        if depth > 32:
            return False
        if is_graph_output(tensor, graph):
            return not tensor.outputs  # an output also consumed inside the graph is not a pure output
        if not tensor.outputs:
            return False
        for node in tensor.outputs:
            if node.op not in _LAYOUT_OPS or node.inputs[0] is not tensor and node.op != "Concat":
                return False
            if not all(on_output_chain(out, graph, depth + 1) for out in node.outputs):
                return False
        return True

    def edit(graph: Any) -> None:
        for node in list(graph.nodes):
            if node.op != "Sigmoid" or not node.outputs:
                continue
            y = node.outputs[0]
            chain_consumers = [c for c in y.outputs if c.op in _LAYOUT_OPS and all(
                on_output_chain(out, graph) for out in c.outputs)]
            direct = is_graph_output(y, graph)
            if direct and y.outputs:
                continue
            if direct:
                name = y.name
                if not bypass(node, graph):  # input -> Sigmoid -> output: keep the names with an Identity
                    node.op, node.attrs = "Identity", {}
                removed.append({"node": node.name, "outputs": [name]})
                continue
            if not chain_consumers:
                continue
            for consumer in chain_consumers:
                for i, inp in enumerate(consumer.inputs):
                    if inp is y:
                        consumer.inputs[i] = node.inputs[0]
            removed.append({"node": node.name})

    result = rewrite(original, edit, fold=False)
    if not removed:
        return ModelArtifact(original.model, original.base_dir, dict(artifact.metadata), artifact.source)
    affected = _sigmoid_masks(original, result, seed, verify)
    probabilities: dict[str, float] = {}
    if threshold is not None:
        probabilities.update({name: float(threshold) for name in affected})
    for name, p in (thresholds or {}).items():
        probabilities[str(name)] = float(p)
    result.metadata["sigmoid_removed"] = {"nodes": [r["node"] for r in removed], "outputs": affected}
    if probabilities:
        converted = {name: {"probability": p, "logit": _logit(p)} for name, p in sorted(probabilities.items())}
        result.metadata["thresholds"] = {**result.metadata.get("thresholds", {}), **converted}
    return result


def _sigmoid_masks(original: ModelArtifact, result: ModelArtifact, seed: int, verify: bool) -> dict[str, Any]:
    """Per output: which elements became logits (channels along the last axis when it is a channel split).

    Proves the relation on random inputs: sigmoid(new) == old on the affected elements, new == old elsewhere.
    Which elements are affected is decided from the data: an element is a logit if sigmoid(new) matches old
    and new does not; the check then demands that every other element is identical.
    """
    import numpy as np

    from trtkit.check_feeds import runnable_feeds
    from trtkit.errors import TrtkitError
    from trtkit.runtime import run, session

    try:  # inputs the model runs on (int64 scalars, sizes subgraphs need: see trtkit.check_feeds)
        feeds, old = runnable_feeds(original, seed=seed, value_range=(-3.0, 3.0))
    except TrtkitError as exc:
        raise NumericalCheckError(f"pass 'remove-sigmoid' cannot tell which outputs became logits: {exc}") from None
    new = run(session(result, optimization="disable"), feeds)
    report: dict[str, Any] = {}
    for name, ref in old.items():
        got = new[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        same = np.abs(got - ref64) <= 1e-6 + 1e-5 * np.abs(ref64)
        sig = 1.0 / (1.0 + np.exp(-got))
        logit_match = np.abs(sig - ref64) <= 1e-5 + 1e-4 * np.abs(ref64)
        mask = ~same
        if verify and not bool(np.all(same | logit_match)):
            bad = int(np.count_nonzero(~(same | logit_match)))
            raise NumericalCheckError(
                f"pass 'remove-sigmoid': output '{name}' has {bad} elements that are neither unchanged nor the "
                "logit of the original"
            )
        if not mask.any():
            continue
        entry: dict[str, Any] = {"elements": int(mask.sum()), "of": int(mask.size)}
        # Describe the changed elements as channels of one axis when they are (e.g. YOLO score columns).
        for axis in reversed(range(mask.ndim)):
            others = tuple(i for i in range(mask.ndim) if i != axis)
            cols = mask.any(axis=others)
            selector = [slice(None)] * mask.ndim
            selector[axis] = cols
            rest = [slice(None)] * mask.ndim
            rest[axis] = ~cols
            if bool(logit_match[tuple(selector)].all()) and bool(same[tuple(rest)].all()):
                entry["axis"] = axis - mask.ndim
                entry["channels"] = [int(i) for i in np.nonzero(cols)[0]]
                break
        report[name] = entry
    return report


def check_thresholds(options: dict[str, Any]) -> None:
    """Each per-output threshold of the pass's options is a number (a recipe may give anything)."""
    for name, value in (options.get("thresholds") or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(f"remove-sigmoid: threshold for '{name}' must be a number, got {value!r}")
