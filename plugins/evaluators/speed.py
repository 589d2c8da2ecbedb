"""The `speed` evaluator: a trtexec-style benchmark of one or more artefacts, compared in one table.

Per model: warm up for `warmup_ms`, then run for `duration_s` (or exactly `iterations`, never fewer than
`min_iterations`), timing each synchronous inference with perf_counter. Reports latency min/max/mean/median/
p90/p95/p99, throughput (queries and samples per second), the coefficient of variation (a warning when above
`max_cov`), and the speed-up against the first model. TensorRT engine runners are timed like trtexec (device
buffers allocated once, CUDA events around H2D copy, enqueue and D2H copy: the `split`); any other runner that
sets `last_timings` = {"h2d_ms", "compute_ms", "d2h_ms"} after each run gets the split as well.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from trtkit import metrics
from trtkit.errors import DataError, OptionError, first_line
from trtkit.evaluation import load_batches, open_model, run_mode
from trtkit.stages import EvaluationResult


def evaluate_speed(models: list[str], data: str | None, batch_size: int, warmup_ms: float, duration_s: float,
                   iterations: int, min_iterations: int, threads: int, runtime_kernels: bool,
                   max_cov: float, on_iteration: Any = None) -> EvaluationResult:
    if warmup_ms < 0 or duration_s <= 0 or iterations < 0 or min_iterations < 1:
        raise OptionError("speed: warmup_ms >= 0, duration_s > 0, iterations >= 0 and min_iterations >= 1")
    # An artefact that cannot run (cannot be loaded here, fails on the data) is reported with its reason and
    # fails the evaluation; the others are still measured. Only when none can run is it an error.
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    first_error: Exception | None = None
    for path in models:
        try:
            rows.append(benchmark(path, data, batch_size, warmup_ms, duration_s, iterations, min_iterations,
                                  threads, runtime_kernels, max_cov, on_iteration))
        except Exception as exc:  # noqa: BLE001 - any failure of one artefact: reported, the rest go on
            first_error = first_error or exc
            failed.append({"model": path, "error": first_line(exc)})
    if not rows:
        assert first_error is not None
        raise first_error
    base = rows[0]["latency"]["median_ms"]
    for row in rows:
        row["speedup"] = base / row["latency"]["median_ms"] if row["latency"]["median_ms"] > 0 else float("nan")
    data_out: dict[str, Any] = {"models": rows, "batch_size": batch_size,
                                "unstable": any(r["unstable"] for r in rows)}
    summary = summary_table(rows)
    if failed:
        data_out["failed"] = failed
        summary += "".join(f"\nFAILED {Path(f['model']).name}: {f['error']}" for f in failed)
    return EvaluationResult(data=data_out, summary=summary, passed=not failed)


def benchmark(path: str, data: str | None, batch_size: int, warmup_ms: float, duration_s: float,
              iterations: int, min_iterations: int, threads: int, runtime_kernels: bool, max_cov: float,
              on_iteration: Any = None) -> dict[str, Any]:
    emulate = not runtime_kernels
    runner = open_model(path, emulate_qdq=emulate, threads=threads or None)
    feeds = _feeds(path, data, batch_size, runner)
    samples = int(len(next(iter(feeds.values())))) if feeds and next(iter(feeds.values())).ndim else 1
    deadline = time.perf_counter() + warmup_ms / 1000.0
    warm = 0
    while warm == 0 or time.perf_counter() < deadline:
        runner.run(feeds)
        warm += 1
    timer = EngineTimer.wrap(runner, feeds)
    run = timer.run if timer is not None else runner.run
    latencies: list[float] = []
    splits: dict[str, list[float]] = {}
    start = time.perf_counter()
    end_by = start + duration_s
    while True:
        t0 = time.perf_counter()
        run(feeds)
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        timings = timer.last_timings if timer is not None else getattr(runner, "last_timings", None)
        if isinstance(timings, dict):
            for key, value in timings.items():
                splits.setdefault(key, []).append(float(value))
        if on_iteration is not None:
            on_iteration(t0, t1)
        count = len(latencies)
        if iterations:
            if count >= max(iterations, min_iterations):
                break
        elif count >= min_iterations and t1 >= end_by:
            break
    wall = time.perf_counter() - start
    if timer is not None:
        timer.close()
    stats = metrics.latency_stats(latencies)
    row: dict[str, Any] = {
        "model": path, "mode": run_mode(path, emulate), "iterations": len(latencies), "warmup_iterations": warm,
        "batch": samples, "latency": stats, "total_s": wall,
        "throughput_qps": len(latencies) / wall, "samples_per_s": len(latencies) * samples / wall,
        "unstable": stats["cov"] > max_cov,
    }
    if splits:
        row["split"] = {key: {"median_ms": float(np.median(v)), "mean_ms": float(np.mean(v))}
                        for key, v in sorted(splits.items())}
        copies = sum(row["split"].get(k, {}).get("median_ms", 0.0) for k in ("h2d_ms", "d2h_ms"))
        compute = row["split"].get("compute_ms", {}).get("median_ms")
        # trtexec's hint: when copies take longer than the compute, the run is transfer-bound.
        row["transfer_bound"] = bool(compute is not None and copies > compute)
    if row["mode"] == "onnxruntime int8 kernels":
        row["cpu_int8"] = cpu_int8_layers(path)
    return row


# What onnxruntime's CPU EP runs after its graph optimizations: int8 kernels (its QDQ fusions turned
# DQ -> op -> Q into one) or float ones (a Q/DQ placed for TensorRT, which has no Q after many ops, is left
# as DequantizeLinear in front of a float Conv/MatMul: slower than FP32, while TensorRT fuses it into int8).
INT8_COMPUTE = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul"}
FLOAT_COMPUTE = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ConvTranspose"}
CPU_INT8_NOTE = ("CPU speed of a TensorRT-placed QDQ model is not what TensorRT will give: onnxruntime's CPU "
                 "kernels fuse only DequantizeLinear -> op -> QuantizeLinear, so {float} of {total} Conv/MatMul "
                 "layers of {name} run in float behind Q/DQ")


def cpu_int8_layers(path: str) -> dict[str, int]:
    """{"int8": n, "float": m}: compute layers onnxruntime's CPU EP runs in int8 / float after optimizing."""
    import tempfile

    import onnx

    from trtkit.runtime import session_options

    options = session_options(emulate_qdq=False)
    with tempfile.TemporaryDirectory(prefix="trtkit-ort-") as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        import onnxruntime as ort

        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    return {"int8": sum(op in INT8_COMPUTE for op in ops), "float": sum(op in FLOAT_COMPUTE for op in ops)}


def cpu_int8_note(row: dict[str, Any]) -> str | None:
    """The one line that explains a slow INT8 model on onnxruntime's CPU kernels, or None."""
    layers = row.get("cpu_int8")
    if not layers or not layers["float"]:
        return None
    return CPU_INT8_NOTE.format(float=layers["float"], total=layers["float"] + layers["int8"],
                                name=Path(row["model"]).name)


def _feeds(path: str, data: str | None, batch_size: int, runner: Any) -> dict[str, np.ndarray]:
    batches = load_batches(data, path, batch_size, batch_size, seed=0)
    if not batches:
        raise DataError(f"{data}: no samples")
    batch = batches[0]
    missing = [n for n in runner.input_names if n not in batch]
    if missing:
        raise DataError(f"{path}: the data has no input '{missing[0]}'")
    return {n: np.ascontiguousarray(batch[n]) for n in runner.input_names}


def summary_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'model':<28} {'mode':<26} {'iters':>6} {'median':>8} {'mean':>8} {'p90':>8} {'p99':>8} "
              f"{'min':>8} {'max':>8} {'CoV':>6} {'qps':>9} {'speedup':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lat = row["latency"]
        lines.append(
            f"{Path(row['model']).name[:28]:<28} {row['mode'][:26]:<26} {row['iterations']:>6} "
            f"{lat['median_ms']:>8.3f} {lat['mean_ms']:>8.3f} {lat['p90_ms']:>8.3f} {lat['p99_ms']:>8.3f} "
            f"{lat['min_ms']:>8.3f} {lat['max_ms']:>8.3f} {lat['cov']:>6.1%} {row['throughput_qps']:>9.1f} "
            f"{row.get('speedup', 1.0):>6.2f}x")
        for key, value in (row.get("split") or {}).items():
            lines.append(f"    {key}: median {value['median_ms']:.3f} ms, mean {value['mean_ms']:.3f} ms")
    lines.append("latencies in ms, batch " + ", ".join(sorted({str(r["batch"]) for r in rows})))
    for row in rows:
        note = cpu_int8_note(row)
        if note:
            lines.append(f"note: {note}")
        if row.get("transfer_bound"):
            lines.append(f"warning: {Path(row['model']).name}: transfer-bound (H2D + D2H copies take longer than the "
                         "compute); keep data on the device or batch more")
        if row["unstable"]:
            lines.append(f"warning: {Path(row['model']).name}: unstable timings (CoV {row['latency']['cov']:.1%}); "
                         "close other programs, pin threads (-O threads=N) or run longer")
    return "\n".join(lines)


class EngineTimer:
    """trtexec-style timing of a TensorRT engine runner: device buffers allocated once, CUDA events around the
    host-to-device copies, the enqueue and the device-to-host copies -> last_timings {h2d_ms, compute_ms,
    d2h_ms}. Used for runners with a TensorRT execution context (trtkit.plugins.tensorrt.engine.EngineRunner)."""

    def __init__(self, runner: Any, feeds: dict[str, np.ndarray]) -> None:
        from trtkit.plugins.tensorrt.cuda import check, cuda_malloc, cudart

        self.cudart = cudart()
        self._check = check
        self.runner = runner
        self.stream = runner.stream
        self.pointers: list[int] = []
        self.inputs: list[tuple[np.ndarray, int]] = []
        self.outputs: list[tuple[np.ndarray, int]] = []
        context = runner.context
        for spec in runner.info["inputs"]:
            array = np.ascontiguousarray(feeds[spec["name"]], dtype=spec["dtype"])
            if not context.set_input_shape(spec["name"], array.shape):
                raise DataError(f"{runner.path}: input '{spec['name']}' shape {array.shape} is outside the "
                                "engine's profile")
            pointer = cuda_malloc(array.nbytes)
            self.pointers.append(pointer)
            context.set_tensor_address(spec["name"], pointer)
            self.inputs.append((array, pointer))
        for spec in runner.info["outputs"]:
            result = np.empty(tuple(context.get_tensor_shape(spec["name"])), dtype=spec["dtype"])
            pointer = cuda_malloc(result.nbytes)
            self.pointers.append(pointer)
            context.set_tensor_address(spec["name"], pointer)
            self.outputs.append((result, pointer))
        self.events = [self._check(self.cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        self.last_timings: dict[str, float] = {}

    @classmethod
    def wrap(cls, runner: Any, feeds: dict[str, np.ndarray]) -> EngineTimer | None:
        if not all(hasattr(runner, name) for name in ("context", "stream", "info")):
            return None
        return cls(runner, feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> None:
        from trtkit.plugins.tensorrt.cuda import cuda_memcpy_dtoh, cuda_memcpy_htod

        cudart, check, events = self.cudart, self._check, self.events
        check(cudart.cudaEventRecord(events[0], self.stream), "cudaEventRecord")
        for array, pointer in self.inputs:
            cuda_memcpy_htod(pointer, array, self.stream)
        check(cudart.cudaEventRecord(events[1], self.stream), "cudaEventRecord")
        if not self.runner.context.execute_async_v3(self.stream):
            raise DataError(f"{self.runner.path}: TensorRT execution failed")
        check(cudart.cudaEventRecord(events[2], self.stream), "cudaEventRecord")
        for result, pointer in self.outputs:
            cuda_memcpy_dtoh(result, pointer, self.stream)
        check(cudart.cudaEventRecord(events[3], self.stream), "cudaEventRecord")
        check(cudart.cudaEventSynchronize(events[3]), "cudaEventSynchronize")
        elapsed = [float(check(cudart.cudaEventElapsedTime(events[i], events[i + 1]), "cudaEventElapsedTime"))
                   for i in range(3)]
        self.last_timings = {"h2d_ms": elapsed[0], "compute_ms": elapsed[1], "d2h_ms": elapsed[2]}

    def close(self) -> None:
        from trtkit.plugins.tensorrt.cuda import cuda_free

        for event in self.events:
            self.cudart.cudaEventDestroy(event)
        for pointer in self.pointers:
            cuda_free(pointer)
        self.pointers = []
