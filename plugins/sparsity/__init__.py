"""Built-in graph pass `sparse-2of4`: 2:4 magnitude masks on the weights TensorRT can run sparse.

For users who only have the ONNX file; `trtkit.plugins.sparsity.masks.apply_torch` does the same on a
torch model before fine-tuning (`trtkit.distill` keeps the zeros). The pass changes outputs by design
(exact=False): it reports the eligibility of every layer and measures the output difference it made on a
seeded random input. Build with the TensorRT builder's `sparse_weights=true` so TensorRT may pick sparse
kernels. Imported lazily: numpy and onnx load when the pass runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trtkit import hookimpl
from trtkit.stages import GraphPass, Option

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


def _apply(artifact: ModelArtifact, precision: str = "int8", layers: list[str] | None = None,
           aligned_only: bool = False, verify: bool = True) -> ModelArtifact:
    from trtkit.ui import console

    from .masks import sparsify_onnx

    result, rows = sparsify_onnx(artifact, precision=precision, layers=layers, aligned_only=aligned_only)
    masked = sum(row["masked"] for row in rows)
    result.metadata["sparsity"]["layers"] = rows
    if verify:
        from trtkit.runtime import random_inputs, run, session

        feeds = random_inputs(artifact.model)
        reference, got = run(session(artifact.model), feeds), run(session(result.model), feeds)
        result.metadata["sparsity"]["max_abs_diff"] = max(float(abs(reference[k] - got[k]).max()) for k in reference)
    console.print(f"2:4 masks on {masked} of {len(rows)} Conv/Gemm/MatMul layers "
                  f"({sum(r['eligible'] for r in rows)} eligible, {sum(r['aligned'] for r in rows)} aligned for "
                  f"{precision})")
    return result


def _difference(result: ModelArtifact) -> float | None:
    value = result.metadata.get("sparsity", {}).get("max_abs_diff")
    return float(value) if value is not None else None


@hookimpl
def register_passes(register: Callable[[GraphPass], None]) -> None:
    register(GraphPass(
        name="sparse-2of4",
        description="2:4 magnitude masks on weights TensorRT can run on sparse tensor cores (changes outputs)",
        options={
            "precision": Option("str", "int8", "precision the engine runs in (sets the channel alignment)",
                                choices=("int8", "fp16", "fp32")),
            "layers": Option("list", None, "only these layer names (default: every eligible layer)"),
            "aligned_only": Option("bool", False, "only layers whose channels suit sparse kernels"),
            "verify": Option("bool", True, "measure the output difference on a random input"),
        },
        apply=_apply, exact=False, measured_difference=_difference))


def describe(rows: list[dict[str, Any]]) -> str:
    """One line per layer for a report: name, shape, eligible, aligned, why not."""
    return "\n".join(f"{r['layer']}: {r['op']} {r['shape']} eligible={r['eligible']} aligned={r['aligned']}"
                     + (f" ({r['reason']})" if r["reason"] else "") for r in rows)
