"""Built-in passes beyond plain PTQ: `equalize`, `smooth`, `bias-correct`, `adaptive-round`, `qdq-tune`,
`recenter`.

    trtkit optimize model.onnx -o model.eq.onnx --pass equalize
    trtkit optimize model.onnx -o model.sm.onnx --pass smooth -O data=calib.npz
    trtkit optimize model.int8.onnx -o model.bc.onnx --pass bias-correct \
        -O reference=model.eq.onnx -O data=calib.npz
    trtkit optimize model.int8.onnx -o model.tuned.onnx --pass qdq-tune
    trtkit optimize model.int8.onnx -o model.rc.onnx --pass recenter

One pass per module: `equalize.py`, `smooth.py`, `bias_correct.py`, `adaptive_round.py`, `qdq_tune.py`, `recenter.py`
(`common.py` holds what they share).
This module only declares and registers them; a pass module is imported when its pass runs (this one loads
at CLI start-up). As Python functions: `trtkit.equalize`, `trtkit.bias_correct`, `trtkit.qdq_tune`, each
returning (new artefact, report).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trtkit import hookimpl
from trtkit.stages import GraphPass, Option

if TYPE_CHECKING:
    from trtkit.model import ModelArtifact


def _equalize(artifact: ModelArtifact, iterations: int = 20, max_scale: float = 1e4, relu6: str = "skip",
              layers: list[str] | None = None) -> ModelArtifact:
    """Cross-layer equalization of an FP32 model (run it before calibration and quantization)."""
    from trtkit.ui import console

    from .equalize import equalize

    result, report = equalize(artifact, iterations=iterations, max_scale=max_scale, relu6=relu6, layers=layers)
    result.metadata.setdefault("ptq", {})["equalize"] = {
        **result.metadata.get("ptq", {}).get("equalize", {}), "report": report.as_dict()}
    worst = max((p.range_ratio_before for p in report.pairs), default=1.0)
    console.print(f"equalize: {len(report.pairs)} layer pairs in {report.iterations} sweeps (largest channel range "
                  f"ratio {worst:.1f} before); {len(report.skipped)} chains stopped (see metadata ptq.equalize)")
    return result


def _smooth(artifact: ModelArtifact, data: str = "", alpha: float = 1.0, limit: int = 256, batch_size: int = 32,
            verify: bool = True) -> ModelArtifact:
    """LayerNorm output and depthwise Conv input ranges moved into the weights reading them (FP32, exact)."""
    from trtkit.ui import console

    from .smooth import smooth

    result, report = smooth(artifact, data, alpha=alpha, limit=limit, batch_size=batch_size, verify=verify)
    check = "" if report.sqnr_db is None else f"; outputs {report.sqnr_db:.0f} dB from the input model's"
    kinds = [layer["kind"] for layer in report.layers]
    console.print(f"smooth: {kinds.count('layernorm')} LayerNorm outputs and {kinds.count('depthwise')} depthwise Conv "
                  f"inputs on {report.samples} samples (alpha {alpha:g})"
                  f"{check}; {len(report.skipped)} left (see metadata ptq.smooth)")
    return result


def _bias_correct(artifact: ModelArtifact, reference: str = "", data: str = "", limit: int = 256,
                  batch_size: int = 32, iterations: int = 1, verify: bool = True) -> ModelArtifact:
    """Empirical bias correction of a Q/DQ model against its FP32 reference on calibration data."""
    from trtkit.ui import console

    from .bias_correct import bias_correct

    result, report = bias_correct(artifact, reference, data, limit=limit, batch_size=batch_size,
                                  iterations=iterations, verify=verify)
    before = sum(c.shift_before for c in report.layers)
    after = "" if not verify else f" -> {sum(c.shift_after or 0.0 for c in report.layers):.4g}"
    console.print(f"bias-correct: {len(report.layers)} layers on {report.samples} samples; summed mean |shift| "
                  f"{before:.4g}{after}" + (f"; {report.skipped['*']}" if "*" in report.skipped else ""))
    return result


def _adaptive_round(artifact: ModelArtifact, reference: str = "", data: str = "", limit: int = 64,
                    batch_size: int = 8, positions: int = 256, blocks: int = 4, damp: float = 0.01) -> ModelArtifact:
    """Choose the int8 weights of a Q/DQ model against each layer's output on calibration data."""
    from trtkit.ui import console

    from .adaptive_round import adaptive_round

    result, report = adaptive_round(artifact, reference, data, limit=limit, batch_size=batch_size,
                                    positions=positions, blocks=blocks, damp=damp)
    result.metadata.setdefault("ptq", {})["adaptive_round"] = report.as_dict()
    gains = [x.error_adaptive_db - x.error_nearest_db for x in report.layers]
    console.print(f"adaptive-round: {len(report.layers)} layers on {report.samples} samples; layer output SQNR "
                  f"+{sum(gains) / max(len(gains), 1):.1f} dB on average; {len(report.skipped)} skipped")
    return result


def _qdq_tune(artifact: ModelArtifact, align_concat: bool = True, align_pool: bool = True,
              residual: bool = True, outputs: bool = True, verify: bool = True) -> ModelArtifact:
    """Remove redundant Q/DQ pairs and align scales across Concat / MaxPool for TensorRT."""
    from trtkit.ui import console

    from .qdq_tune import qdq_tune

    result, report = qdq_tune(artifact, align_concat=align_concat, align_pool=align_pool, residual=residual,
                              outputs=outputs, verify=verify)
    counts = ", ".join(f"{action} {n}" for action, n in report.counts().items()) or "nothing to change"
    sqnr = f"; SQNR vs input {report.sqnr_db:.1f} dB" if report.sqnr_db is not None else ""
    console.print(f"qdq-tune: {counts}{sqnr}")
    for change in report.changes:
        console.print(f"  {change['action']}: {change['where']}: {change['detail']}")
    return result


def _recenter(artifact: ModelArtifact, tensors: list[str] | None = None, verify: bool = True) -> ModelArtifact:
    """Shift ReLU/ReLU6 activations between linear layers of a Q/DQ model onto [-amax/2, amax/2] (exact)."""
    from trtkit.ui import console

    from .recenter import recenter

    result, report = recenter(artifact, tensors=tensors, verify=verify)  # records its report in metadata
    console.print(f"recenter: {len(report.shifted)} activations shifted onto [-amax/2, amax/2] (half the int8 "
                  f"step); {len(report.skipped)} quantized activations left (see metadata ptq.recenter)")
    return result


def _recenter_difference(result: ModelArtifact) -> float | None:
    value = result.metadata.get("ptq", {}).get("recenter", {}).get("max_abs_diff")
    return float(value) if value is not None else None


@hookimpl
def register_passes(register: Any) -> None:
    register(GraphPass(
        name="equalize",
        description="Cross-layer weight equalization (FP32, exact): evens per-channel ranges before INT8.",
        options={
            "iterations": Option("int", 20, "sweeps over all layer pairs (stops early at a fixed point)"),
            "max_scale": Option("float", 1e4, "per-channel scales are clipped to [1/max_scale, max_scale]"),
            "relu6": Option("str", "skip", "ReLU6 (Clip 0..6) blocks equalization (skip, exact) or is treated "
                            "as ReLU (relu, not exact)", choices=("skip", "relu")),
            "layers": Option("list", None, "only pairs starting at these node names (default: all)"),
        },
        apply=_equalize,
    ))
    register(GraphPass(
        name="smooth",
        description="LayerNorm output and depthwise Conv input ranges moved into the weights reading them (FP32, "
                    "exact; SmoothQuant).",
        options={
            "data": Option("path", required=True, help="calibration data (anything `trtkit calibrate` reads)"),
            "alpha": Option("float", 1.0, "migration strength: 1 evens the activation's channels, 0 the weights'"),
            "limit": Option("int", 256, "use at most this many samples"),
            "batch_size": Option("int", 32, "batch size for onnxruntime"),
            "verify": Option("bool", True, "compare the outputs with the input model's on one batch"),
        },
        apply=_smooth,
    ))
    register(GraphPass(
        name="bias-correct",
        description="Bias correction of a Q/DQ model: subtract each layer's mean INT8 output shift.",
        options={
            "reference": Option("path", required=True, help="the FP32 model the Q/DQ model was quantized from"),
            "data": Option("path", required=True, help="calibration data (anything `trtkit calibrate` reads)"),
            "limit": Option("int", 256, "use at most this many samples"),
            "batch_size": Option("int", 32, "batch size for onnxruntime"),
            "iterations": Option("int", 1, "sweeps over the layers (each layer is measured with the "
                                 "upstream corrections applied)"),
            "verify": Option("bool", True, "check that the mean output shift shrank on the data"),
        },
        apply=_bias_correct,
        exact=False,
    ))
    register(GraphPass(
        name="adaptive-round",
        description="Adaptive rounding of a Q/DQ model's int8 weights against each layer's output (GPTQ form).",
        options={
            "reference": Option("path", required=True, help="the FP32 model the Q/DQ model was quantized from"),
            "data": Option("path", required=True, help="calibration data (anything `trtkit calibrate` reads)"),
            "limit": Option("int", 64, "use at most this many samples"),
            "batch_size": Option("int", 8, "batch size for onnxruntime"),
            "positions": Option("int", 256, "output positions sampled per sample and layer"),
            "blocks": Option("int", 4, "layer groups solved in sequence (each sees the groups before rounded)"),
            "damp": Option("float", 0.01, "damping of X^T X, relative to its mean diagonal"),
        },
        apply=_adaptive_round,
        exact=False,
    ))
    register(GraphPass(
        name="qdq-tune",
        description="Q/DQ placement tuning: drop redundant pairs, share scales across Concat/MaxPool.",
        options={
            "align_concat": Option("bool", True, "give Concat inputs and output one shared scale"),
            "align_pool": Option("bool", True, "give MaxPool output the scale of its input"),
            "residual": Option("bool", True, "drop Q/DQ on the Conv branch of a residual Add (TensorRT fuses "
                               "the Add into that Conv)"),
            "outputs": Option("bool", True, "drop Q/DQ pairs that feed graph outputs"),
            "verify": Option("bool", True, "check the tuned model against the input model on random data"),
        },
        apply=_qdq_tune,
        exact=False,
    ))
    register(GraphPass(
        name="recenter",
        description="Q/DQ model: one-sided ReLU/ReLU6 activations shifted onto [-amax/2, amax/2] (half the step).",
        options={
            "tensors": Option("list", None, "only these quantized activation tensors (default: every one whose "
                              "chain can be shifted exactly)"),
            "verify": Option("bool", True, "prove on a random input that the float arithmetic is unchanged"),
        },
        apply=_recenter,
        exact=False,  # int8 outputs change by design (finer grid); the pass proves its float relation itself
        measured_difference=_recenter_difference,
    ))
