"""Benchmark: the builders on the model zoo and the digits CNN, FP32 and QDQ (made by trtkit calibrate + quantize).

    python -m benchmarks.bench_build [--models resnet,mobilenet,yolo,transformer] [--no-digits]
                                     [--folder /tmp/trtkit-bench-build] [--no-write]

For each model:
- tensorrt-rtx (ahead of time, no GPU): parser capability, build wall time and engine size for FP32 and QDQ
  (dynamic batch, profile 1..8), and the QDQ rebuild time with the timing cache saved by the first build;
- onnxruntime: build time; CPU latency (median of 50 runs, batch 8, 1 thread) of the original FP32 model with
  graph optimizations disabled vs the built model; for the QDQ model, the error against FP32 (SQNR dB, top-1
  agreement; digits: accuracy on the held-out split) of Q/DQ emulated in float (what TensorRT computes), of
  onnxruntime's fused int8 kernels with 8-bit weights (`no_vnni=ignore`), and with the builder's default
  (7-bit weights on CPUs without VNNI).

Results go to the `build` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 8


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def latency_ms(path: Path, feeds: dict[str, np.ndarray], optimization: str, emulate_qdq: bool = True,
               runs: int = 50) -> float:
    from trtkit.runtime import session

    sess = session(path, threads=1, optimization=optimization, emulate_qdq=emulate_qdq)
    names = [o.name for o in sess.get_outputs()]
    for _ in range(5):
        sess.run(names, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def outputs(path: Path, feeds: dict[str, np.ndarray], emulate_qdq: bool) -> np.ndarray:
    from trtkit.runtime import run, session

    return next(iter(run(session(path, emulate_qdq=emulate_qdq), feeds).values()))


def prepare(folder: Path, names: list[str], digits: bool) -> dict[str, dict[str, Any]]:
    from benchmarks.models import build_zoo, sample_inputs

    models: dict[str, dict[str, Any]] = {}
    for name, path in build_zoo(folder, names=names, dynamic_batch=True).items():
        models[name] = {"path": path, "calib": sample_inputs(path, n=64, seed=0),
                        "eval": sample_inputs(path, n=64, seed=1), "labels": None}
    if digits:
        from trtkit.examples.digits import export_digits_onnx, load_digits_split, train_digits_cnn

        x_train, y_train, x_test, y_test = load_digits_split()
        path = folder / "digits.onnx"
        if not path.exists():
            export_digits_onnx(train_digits_cnn(x_train, y_train), path)
        models["digits"] = {"path": path, "calib": {"image": x_train[:256]}, "eval": {"image": x_test},
                            "labels": y_test}
    return models


def bench_model(name: str, entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    import trtkit
    from trtkit.building import check
    from trtkit.calibration import calibrate
    from trtkit.metrics import sqnr_db
    from trtkit.plugins.qdq.insert import quantize

    fp32 = entry["path"]
    qdq = folder / f"{name}_qdq.onnx"
    scales = calibrate(fp32, entry["calib"], method="entropy", progress=False)
    quantize(fp32, scales, output=qdq)
    row: dict[str, Any] = {"model": name}
    input_name = next(iter(entry["eval"]))
    shape = entry["eval"][input_name].shape[1:]
    dims = "x".join(str(d) for d in shape)
    profile = {"min_shapes": f"{input_name}:1x{dims}", "opt_shapes": f"{input_name}:{BATCH}x{dims}",
               "max_shapes": f"{input_name}:{BATCH}x{dims}"}

    for kind, path in (("fp32", fp32), ("qdq", qdq)):
        report = check(path, builder="tensorrt-rtx")
        row[f"rtx_{kind}_supported"] = "yes" if report["supported"] else ", ".join(report["unsupported_op_types"])
        if not report["supported"]:
            continue
        engine, seconds = timed(trtkit.build, path, folder / f"{name}_{kind}.engine", builder="tensorrt-rtx",
                                timing_cache=str(folder / f"{name}_{kind}.cache"), **profile)
        row[f"rtx_{kind}_s"] = seconds
        row[f"rtx_{kind}_mb"] = engine.stat().st_size / 1e6
        _, again = timed(trtkit.build, path, folder / f"{name}_{kind}_2.engine", builder="tensorrt-rtx",
                         timing_cache=str(folder / f"{name}_{kind}.cache"), **profile)
        row[f"rtx_{kind}_cached_s"] = again

    feeds = {k: v[:BATCH] for k, v in entry["eval"].items()}
    built, row["ort_fp32_s"] = timed(trtkit.build, fp32, folder / f"{name}.ort.onnx")
    row["ort_fp32_orig_ms"] = latency_ms(fp32, feeds, "disable")
    row["ort_fp32_built_ms"] = latency_ms(built, feeds, "disable")

    reference = outputs(fp32, entry["eval"], True)
    emulated = outputs(qdq, entry["eval"], True)
    kept = trtkit.build(qdq, folder / f"{name}_qdq_8bit.ort.onnx", no_vnni="ignore")
    fixed, row["ort_qdq_s"] = timed(trtkit.build, qdq, folder / f"{name}_qdq.ort.onnx")
    fused8 = outputs(kept, entry["eval"], False)
    fused7 = outputs(fixed, entry["eval"], False)
    row["ort_qdq_built_ms"] = latency_ms(fixed, feeds, "disable", emulate_qdq=False)
    for label, result in (("emulated", emulated), ("fused8", fused8), ("fused7", fused7)):
        row[f"sqnr_{label}"] = sqnr_db(reference, result)
        if reference.ndim == 2:
            row[f"agree_{label}"] = float((reference.argmax(1) == result.argmax(1)).mean())
        if entry["labels"] is not None:
            row[f"acc_{label}"] = float((result.argmax(1) == entry["labels"]).mean())
    if entry["labels"] is not None:
        row["acc_fp32"] = float((reference.argmax(1) == entry["labels"]).mean())
    return row


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report(rows: list[dict[str, Any]]) -> str:
    from benchmarks._report import markdown_table
    from trtkit.plugins.onnxruntime_builder import cpu_has_vnni

    rtx = markdown_table(
        ["model", "FP32 parses", "FP32 build s", "FP32 MB", "QDQ parses", "QDQ build s", "QDQ rebuild s (timing cache)",
         "QDQ MB"],
        [[r["model"], r.get("rtx_fp32_supported"), fmt(r.get("rtx_fp32_s")), fmt(r.get("rtx_fp32_mb")),
          r.get("rtx_qdq_supported"), fmt(r.get("rtx_qdq_s")), fmt(r.get("rtx_qdq_cached_s")), fmt(r.get("rtx_qdq_mb"))]
         for r in rows],
    )
    ort = markdown_table(
        ["model", "build s (FP32)", "FP32 unoptimized ms", "built FP32 ms", "built QDQ (int8 kernels) ms"],
        [[r["model"], fmt(r["ort_fp32_s"]), fmt(r["ort_fp32_orig_ms"]), fmt(r["ort_fp32_built_ms"]),
          fmt(r["ort_qdq_built_ms"])] for r in rows],
    )
    acc_rows = []
    for r in rows:
        acc_rows.append([
            r["model"], fmt(r["sqnr_emulated"], 1), fmt(r["sqnr_fused8"], 1), fmt(r["sqnr_fused7"], 1),
            " / ".join(fmt(r.get(f"agree_{k}"), 3) for k in ("emulated", "fused8", "fused7")) if "agree_emulated" in r else "-",
            " / ".join(fmt(r.get(f"acc_{k}"), 3) for k in ("fp32", "emulated", "fused8", "fused7")) if "acc_fp32" in r else "-",
        ])
    acc = markdown_table(
        ["model", "SQNR dB: Q/DQ in float (TensorRT)", "onnxruntime int8, 8-bit weights", "onnxruntime int8, builder default",
         "top-1 agreement with FP32 (float / 8-bit / default)", "digits accuracy (FP32 / float / 8-bit / default)"],
        acc_rows,
    )
    vnni = cpu_has_vnni()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"Machine load average while measuring: {load} (the CPU is shared; latencies are indicative).\n\n"
        f"TensorRT-RTX ahead-of-time builds (no GPU), dynamic batch profile 1..{BATCH}; QDQ from `trtkit calibrate` "
        f"(entropy, 64 samples; digits 256) + `trtkit quantize`. The RTX timing cache is a no-op (RTX compiles at run "
        f"time), so rebuild time only shows the cost of loading/saving it.\n\n{rtx}\n\n"
        f"onnxruntime builder (`optimization=extended`), CPU latency median of 50 runs, batch {BATCH}, 1 thread.\n\n{ort}\n\n"
        f"QDQ accuracy against FP32 on 64 held-out samples (digits: its 540-image test split). This CPU has VNNI: "
        f"{vnni}. Without VNNI, onnxruntime's fused int8 kernels saturate with 8-bit weights; the builder's "
        f"default (`no_vnni=requantize`, 7-bit weights) avoids it.\n\n{acc}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenet,yolo,transformer")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--folder", default="/tmp/trtkit-bench-build")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n]
    rows = []
    for name, entry in prepare(folder, names, not args.no_digits).items():
        rows.append(bench_model(name, entry, folder))
        print(rows[-1], flush=True)
    body = report(rows)
    print(body)
    if not args.no_write:
        from benchmarks._report import write_section

        write_section("build", "Builders (onnxruntime, TensorRT-RTX)", body)


if __name__ == "__main__":
    main()
