"""Benchmark: trtkit calibrate + quantize against onnxruntime.quantization.quantize_static (QDQ, per-channel,
symmetric int8, MinMax / Entropy / Percentile), same models, same data, same run.

    python -m benchmarks.bench_quantize [--samples 256 --small 32] [--models resnet,mobilenet,yolo,transformer]
                                        [--no-digits] [--folder /tmp/trtkit-bench-quantize] [--no-write]

Every configuration runs in its own subprocess (fresh interpreter, same calibration .npy file read batch by
batch), which reports its wall time (work only, imports excluded) and its peak RSS (VmHWM; ru_maxrss is inherited
from the parent across fork + exec on Linux, so it would report the parent's peak):
- fp32: plain onnxruntime inference over the calibration samples (the time reference);
- trtkit-<method>: `trtkit.calibrate` (one pass, statistics) + `trtkit.quantize` (minmax, entropy,
  percentile, and mse, which onnxruntime does not have);
- ort-<method>: `quantize_static(QuantFormat.QDQ, per_channel=True, QInt8/QInt8, ActivationSymmetric,
  WeightSymmetric)` with onnxruntime's default calibrator options.
Accuracy of each INT8 model against FP32 is measured on held-out samples with Q/DQ emulated in float (what
TensorRT computes): top-1 agreement (classifiers), cosine, SQNR dB; for the detector also the SQNR of the
score columns; for digits (real data and labels) also top-1 accuracy. Each INT8 model is also parsed and built
with tensorrt_rtx on the CPU (dynamic batch 1..32).

Results go to the `quantize` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 32
METHODS = ("minmax", "entropy", "percentile")
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# ---- child side --------------------------------------------------------------------------------------------

def _batches(data_path: str, input_name: str, batch: int):
    """Batches read with plain reads (a memory map would keep every page read resident: RSS would grow with N
    for every tool alike). trtkit reads .npy files the same way."""
    from trtkit.data import NpyFile

    data = NpyFile(data_path)
    for start in range(0, len(data), batch):
        yield {input_name: data[start:start + batch]}


def child(job: dict[str, Any]) -> dict[str, Any]:
    kind, model, data, output = job["kind"], job["model"], job["data"], job.get("output")
    import onnx

    input_name = onnx.load(model, load_external_data=False).graph.input[0].name
    if kind.startswith("trtkit-"):  # plugin discovery happens at start-up, like imports (the CLI does it first)
        from trtkit.registry import get_registry

        get_registry()
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if kind == "fp32":
        from trtkit.runtime import session

        sess = session(model)
        for feeds in _batches(data, input_name, BATCH):
            sess.run(None, feeds)
    elif kind == "exposed":  # the floor of any calibrator on onnxruntime: the observed tensors as outputs
        from trtkit.calibration import tensors_to_observe
        from trtkit.runtime import session

        observed = [n for n in tensors_to_observe(onnx.load(model)) if n != input_name]
        sess = session(model, extra_outputs=observed)
        for feeds in _batches(data, input_name, BATCH):
            sess.run(observed, feeds)
    elif kind.startswith("trtkit-"):
        import trtkit

        scales = trtkit.calibrate(model, data, method=kind.split("-", 1)[1], batch_size=BATCH, progress=False)
        extra["calibrate_s"] = time.perf_counter() - start
        trtkit.quantize(model, scales, output=output)
    elif kind.startswith("ort-"):
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.iterator = _batches(data, input_name, BATCH)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.iterator, None)

        quantize_static(
            model, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, ORT_METHODS[kind.split("-", 1)[1]]),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": peak_rss_mb(), **extra}


def peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM (reset by exec) rather than ru_maxrss, which Linux carries over
    from the parent across fork + exec: a parent that imported torch would inflate every child's figure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_repeated(job: dict[str, Any], repeat: int) -> dict[str, Any]:
    """run_child `repeat` times; the median of each figure (a shared machine's noise is one-sided)."""
    import statistics

    runs = [run_child(job) for _ in range(repeat)]
    if any("error" in run for run in runs):
        return next(run for run in runs if "error" in run)
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]} | {"runs": runs}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_quantize", "--child", json.dumps(job)],
                            capture_output=True, text=True, cwd=root, timeout=3600)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:160]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- parent side -------------------------------------------------------------------------------------------

def accuracy_rows(name: str, fp32: Path, candidate: Path, x: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    from trtkit.metrics import cosine, sqnr_db, top1_agreement
    from trtkit.runtime import session

    input_name = session(fp32).get_inputs()[0].name
    ref = np.concatenate([session(fp32).run(None, {input_name: x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])
    sess = session(candidate, emulate_qdq=True)
    got = np.concatenate([sess.run(None, {input_name: x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])
    row: dict[str, Any] = {"cosine": cosine(ref, got), "sqnr": sqnr_db(ref, got)}
    if name == "yolo":
        row["score_sqnr"] = sqnr_db(ref[..., 4:], got[..., 4:])
        row["top1"] = float("nan")
    else:
        row["top1"] = top1_agreement(ref, got)["agreement"]
    if labels is not None:
        row["accuracy"] = float((got.argmax(1) == labels).mean())
        row["fp32_accuracy"] = float((ref.argmax(1) == labels).mean())
    return row


def tensorrt_rtx_builds(path: Path) -> str:
    """'yes' when tensorrt_rtx parses the model and builds an engine on this CPU, else why not."""
    try:
        import tensorrt_rtx as trt
    except ImportError:
        return "n/a"
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        error = str(parser.get_error(0)).splitlines()[0] if parser.num_errors else "?"
        return "no: parser: " + error.split("(parseNode): ")[-1][:70]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    profile.set_shape(tensor.name, *[tuple(n if d == -1 else d for d in shape) for n in (1, 8, 32)])
    config.add_optimization_profile(profile)
    return "yes" if builder.build_serialized_network(network, config) is not None else "no: build failed"


def prepare(folder: Path, names: list[str], digits: bool, samples: int, small: int, large: int
            ) -> dict[str, dict[str, Any]]:
    from benchmarks.models import build_zoo, sample_inputs

    models: dict[str, dict[str, Any]] = {}
    for name, path in build_zoo(folder, names=names, dynamic_batch=True).items():
        calib = sample_inputs(path, n=samples, seed=0)
        x = next(iter(calib.values()))
        np.save(folder / f"{name}_calib{samples}.npy", x)
        np.save(folder / f"{name}_calib{small}.npy", x[:small])
        if large:
            np.save(folder / f"{name}_calib{large}.npy", next(iter(sample_inputs(path, n=large, seed=0).values())))
        held_out = next(iter(sample_inputs(path, n=128, seed=1).values()))
        models[name] = {"path": path, "eval": held_out, "labels": None}
    if digits:
        from trtkit.examples.digits import export_digits_onnx, load_digits_split, train_digits_cnn

        x_train, y_train, x_test, y_test = load_digits_split()
        path = folder / "digits.onnx"
        if not path.exists():
            export_digits_onnx(train_digits_cnn(x_train, y_train), path)
        rng = np.random.default_rng(0)
        calib = x_train[rng.choice(len(x_train), size=min(samples, len(x_train)), replace=False)]
        np.save(folder / f"digits_calib{samples}.npy", calib)
        np.save(folder / f"digits_calib{small}.npy", calib[:small])
        if large:
            np.save(folder / f"digits_calib{large}.npy", x_train[rng.choice(len(x_train), size=large, replace=True)])
        models["digits"] = {"path": path, "eval": x_test, "labels": y_test}
    return models


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--small", type=int, default=32)
    parser.add_argument("--large", type=int, default=1024,
                        help="also measure fp32, trtkit-entropy and ort-entropy at this N (0: skip)")
    parser.add_argument("--models", default="resnet,mobilenet,yolo,transformer")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--folder", default="/tmp/trtkit-bench-quantize")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (medians are reported)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n]
    models = prepare(folder, names, not args.no_digits, args.samples, args.small, args.large)
    large_kinds = ("fp32", "trtkit-entropy", "ort-entropy") if args.large else ()
    tools = [f"trtkit-{m}" for m in (*METHODS, "mse")] + [f"ort-{m}" for m in METHODS]
    speed_rows, memory_rows, accuracy_table = [], [], []
    raw: dict[str, Any] = {}
    for name, info in models.items():
        print(f"[{name}]", file=sys.stderr)
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for n in (args.small, args.samples, args.large):
            if not n:
                continue
            data = str(folder / f"{name}_calib{n}.npy")
            for kind in ["fp32", "exposed", *tools]:
                if (n == args.large and kind not in large_kinds) or (kind == "exposed" and n != args.samples):
                    continue
                output = str(folder / f"{name}_{kind}_{n}.onnx")
                results[(kind, n)] = run_repeated({"kind": kind, "model": str(info["path"]), "data": data,
                                                   "output": output}, args.repeat)
                shown = {k: v for k, v in results[(kind, n)].items() if k != "runs"}
                print(f"  {kind} N={n}: {shown}", file=sys.stderr)
        raw[name] = {f"{k}@{n}": v for (k, n), v in results.items()}
        fp32 = results[("fp32", args.samples)].get("seconds")
        for kind in tools:
            big, small = results[(kind, args.samples)], results[(kind, args.small)]
            if "error" in big:
                speed_rows.append([name, kind, "failed: " + big["error"], "", ""])
                continue
            calib_s = big.get("calibrate_s", big["seconds"])
            speed_rows.append([name, kind, fmt(big["seconds"], 2), fmt(calib_s / fp32, 2) if fp32 else "-",
                               fmt(big["seconds"] / fp32, 2) if fp32 else "-"])
            if "error" not in small:
                huge = results.get((kind, args.large), {})
                memory_rows.append([name, kind, fmt(small["rss_mb"], 0), fmt(big["rss_mb"], 0),
                                    fmt(big["rss_mb"] / small["rss_mb"], 2), fmt(huge.get("rss_mb"), 0),
                                    fmt(huge["rss_mb"] / big["rss_mb"], 2) if "rss_mb" in huge else "-"])
            row = accuracy_rows(name, info["path"], Path(folder / f"{name}_{kind}_{args.samples}.onnx"),
                                info["eval"], info["labels"])
            row["tensorrt_rtx"] = tensorrt_rtx_builds(folder / f"{name}_{kind}_{args.samples}.onnx")
            raw[name][f"accuracy:{kind}"] = row
            accuracy_table.append([name, kind, fmt(row["top1"]), fmt(row["cosine"], 4), fmt(row["sqnr"], 1),
                                   fmt(row.get("score_sqnr"), 1),
                                   fmt(row.get("accuracy")) + (f" (fp32 {row['fp32_accuracy']:.3f})"
                                                               if "accuracy" in row else ""), row["tensorrt_rtx"]])
        fp32_small = results[("fp32", args.small)]
        fp32_big, fp32_huge = results[("fp32", args.samples)], results.get(("fp32", args.large), {})
        memory_rows.append([name, "fp32 inference", fmt(fp32_small.get("rss_mb"), 0), fmt(fp32_big.get("rss_mb"), 0),
                            "", fmt(fp32_huge.get("rss_mb"), 0), ""])
        speed_rows.append([name, "fp32 inference", fmt(fp32, 2), "1.00", "1.00"])
        exposed = results[("exposed", args.samples)].get("seconds")
        speed_rows.append([name, "fp32, observed tensors as outputs, no statistics", fmt(exposed, 2),
                           fmt(exposed / fp32, 2) if exposed and fp32 else "-", ""])

    from benchmarks._report import markdown_table, write_section

    body = "\n\n".join([
        f"Calibration on N = {args.samples} samples (batch {BATCH}) of realistic inputs "
        "(`benchmarks.models.sample_inputs`; digits: real scikit-learn images), held-out samples for accuracy. "
        f"Every configuration runs {args.repeat} times, each in a fresh subprocess, and the medians are shown; "
        "time excludes imports (and trtkit's plugin discovery, done at CLI start-up). trtkit's default method is "
        "percentile (99.99), histogramming 4096 positions per sample per tensor; entropy histograms every value. "
        "onnxruntime: "
        "`quantize_static(QDQ, per_channel=True, QInt8 weights and activations, ActivationSymmetric, "
        "WeightSymmetric)` with its default calibrator options.",
        "### Wall time (ratio to plain FP32 onnxruntime inference over the same samples; target <= 1.3 for "
        "calibration)",
        "The row 'observed tensors as outputs, no statistics' is onnxruntime alone (all cores) returning the "
        "tensors a calibrator must observe: the floor of any calibrator built on onnxruntime. On these "
        "NCHWc-optimized CNNs onnxruntime then reorders every exposed tensor back to NCHW.",
        markdown_table(["model", "tool", "calibrate + quantize s", "calibration / fp32", "total / fp32"], speed_rows),
        f"### Peak RSS (MB) at N = {args.small}, {args.samples} and {args.large} (target: ratio <= 1.1)",
        f"N = {args.small} is a single batch of {BATCH}. trtkit runs a dynamic-batch model in slices of each batch "
        "holding about 4 MiB of observed activations (one slice reduced while onnxruntime runs the next), so its "
        "peak does not depend on the batch size or on N; plain FP32 inference of whole batches of 32 peaks higher.",
        markdown_table(["model", "tool", f"N={args.small}", f"N={args.samples}", f"ratio {args.samples}/{args.small}",
                        f"N={args.large}", f"ratio {args.large}/{args.samples}"], memory_rows),
        "### Accuracy of the INT8 model against FP32 (Q/DQ emulated in float, as TensorRT computes)",
        markdown_table(["model", "tool", "top-1 agreement", "cosine", "SQNR dB", "score SQNR dB", "accuracy",
                        "tensorrt_rtx parse + build"], accuracy_table),
    ])
    (folder / "results.json").write_text(json.dumps(raw, indent=2, sort_keys=True, default=str))
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('quantize', 'Calibration and QDQ quantization vs onnxruntime', body)}",
              file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
