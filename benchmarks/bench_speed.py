"""Benchmark: FP32 vs INT8 (QDQ) speed on onnxruntime CPU for the model zoo, with the speed evaluator.

    python -m benchmarks.bench_speed [--models resnet,mobilenet,yolo,transformer] [--batch 8] [--duration 3]
                                     [--threads 0] [--folder /tmp/trtkit-bench-speed] [--no-write]

For each zoo model (benchmarks/models.py, dynamic batch): calibrate (entropy) on 64 realistic images with
trtkit.calibrate, insert Q/DQ with trtkit.quantize (TensorRT placement, per-channel int8 weights), then run
`trtkit.evaluate("speed", [fp32, qdq])`: 200 ms warm-up, `--duration` s per model, latency statistics and
throughput. The QDQ model runs on onnxruntime's own int8 kernels (the only way onnxruntime gets faster from
INT8); its accuracy against FP32 is reported both ways (Q/DQ emulated in float = what TensorRT computes,
and onnxruntime's kernels, which saturate on CPUs without VNNI).

Results go to the `speed` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def run(models: list[str], folder: Path, batch: int, duration: float, threads: int) -> list[dict[str, Any]]:
    import trtkit
    from benchmarks.models import build_zoo, sample_inputs

    paths = build_zoo(folder, names=models, dynamic_batch=True)
    rows = []
    for name, fp32 in paths.items():
        calib = sample_inputs(name, n=64, seed=0)
        evaluation = sample_inputs(name, n=64, seed=1)
        np.savez(folder / f"{name}.eval.npz", **evaluation)
        scales = trtkit.calibrate(fp32, calib, method="entropy", progress=False)
        qdq = folder / f"{name}.int8.onnx"
        trtkit.quantize(fp32, scales, output=qdq)
        speed = trtkit.evaluate("speed", [fp32, qdq], batch_size=batch, duration_s=duration, warmup_ms=200.0,
                                threads=threads)
        data = str(folder / f"{name}.eval.npz")
        emulated = trtkit.evaluate("accuracy", [fp32, qdq], data=data, runtime_kernels=False)
        kernels = trtkit.evaluate("accuracy", [fp32, qdq], data=data, runtime_kernels=True)
        f, q = speed.data["models"]
        output = next(iter(emulated.data["outputs"]))
        rows.append({
            "model": name, "fp32": f, "int8": q,
            "sqnr_emulated": emulated.data["outputs"][output]["sqnr_db"],
            "sqnr_kernels": kernels.data["outputs"][output]["sqnr_db"],
            "agreement": emulated.data["task"].get("agreement"),
        })
        print(f"{name}: fp32 {f['latency']['median_ms']:.3f} ms, int8 {q['latency']['median_ms']:.3f} ms "
              f"({q['speedup']:.2f}x), SQNR {rows[-1]['sqnr_emulated']:.1f} dB emulated / "
              f"{rows[-1]['sqnr_kernels']:.1f} dB kernels", flush=True)
    return rows


def table(rows: list[dict[str, Any]], batch: int, duration: float, threads: int) -> str:
    from benchmarks._report import markdown_table

    body = []
    for row in rows:
        f, q = row["fp32"], row["int8"]
        body.append([
            row["model"], f"{f['latency']['median_ms']:.3f}", f"{q['latency']['median_ms']:.3f}",
            f"{q['speedup']:.2f}x", f"{f['latency']['p99_ms']:.3f}", f"{q['latency']['p99_ms']:.3f}",
            f"{f['samples_per_s']:.0f}", f"{q['samples_per_s']:.0f}",
            f"{f['latency']['cov']:.1%} / {q['latency']['cov']:.1%}",
            f"{row['sqnr_emulated']:.1f}", f"{row['sqnr_kernels']:.1f}",
            "" if row["agreement"] is None else f"{row['agreement']:.3f}",
        ])
    headers = ["model", "FP32 median ms", "INT8 median ms", "INT8 speed-up", "FP32 p99 ms", "INT8 p99 ms",
               "FP32 img/s", "INT8 img/s", "CoV FP32 / INT8", "SQNR dB (Q/DQ in float)",
               "SQNR dB (ORT int8 kernels)", "top-1 agreement"]
    notes = (
        f"Batch {batch}, {duration:g} s per model after a 200 ms warm-up, onnxruntime CPU "
        f"({'default threads' if not threads else f'{threads} threads'}), `trtkit eval speed` statistics. "
        "INT8 = `trtkit calibrate` (entropy, 64 images) + `trtkit quantize` (TensorRT Q/DQ placement), run on "
        "onnxruntime's int8 kernels. Accuracy on 64 other images against FP32. The machine is shared (CoV "
        "shows how noisy the timings were); on a CPU without VNNI onnxruntime's int8 kernels are often not "
        "faster and can saturate (SQNR column 'ORT int8 kernels'): TensorRT on a GPU is the INT8 target, the "
        "float-emulated SQNR predicts its accuracy."
    )
    return markdown_table(headers, body) + "\n\n" + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenet,yolo,transformer")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/trtkit-bench-speed"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    rows = run([m for m in args.models.split(",") if m], args.folder, args.batch, args.duration, args.threads)
    text = table(rows, args.batch, args.duration, args.threads)
    print(text)
    if not args.no_write:
        from benchmarks._report import write_section

        print("written to", write_section("speed", "Speed: FP32 vs INT8 (QDQ) on onnxruntime CPU", text))


if __name__ == "__main__":
    main()
