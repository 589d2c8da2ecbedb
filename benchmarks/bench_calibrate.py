"""Single-machine calibration against the floor, every method, N in {32, 256, 1024}, on a real zoo model
(issue 15, item 1).

    python -m benchmarks.bench_calibrate                 # effnet-lite1, one run of each configuration
    python -m benchmarks.bench_calibrate --repeat 3 --write

Each configuration runs in a fresh subprocess that reports its wall time (the work only: imports and
plugin discovery excluded, the session creation included), its CPU seconds and its peak RSS (VmHWM):
- fp32: plain FP32 onnxruntime inference over the samples, all cores, batches of 32 (the issue's floor);
- exposed: the same with every tensor a calibrator observes returned as an output and no statistics (the
  floor of any calibrator built on onnxruntime);
- <method>: `trtkit.calibration.collect` + the scales of that calibrator (what `trtkit calibrate` does).
N = 1024 repeats the zoo's 256 calibration crops four times (timing and memory only). The machine may be
shared: the load average before and after is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BATCH = 32
METHODS = ("minmax", "percentile", "mse", "entropy")
SIZES = (32, 256, 1024)
VALUES_PER_SAMPLE = {"effnet-lite1": 11.47e6}  # values of the observed tensors per sample (per-value costs)
NUMPY_ENTROPY = "entropy-numpy"  # optional row (--kinds): entropy with numpy's bin counting, for comparison


def _cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.bench_quantize import _batches, peak_rss_mb

    kind, model, data = job["kind"], job["model"], job["data"]
    import onnx

    from trtkit.calibration import CalibrationSettings, tensors_to_observe
    from trtkit.registry import get_registry
    from trtkit.runtime import session

    get_registry()  # plugin discovery happens at start-up (the CLI does it first)
    input_name = onnx.load(model, load_external_data=False).graph.input[0].name
    start, cpu = time.perf_counter(), _cpu()
    if kind == "fp32":
        sess = session(model)
        for feeds in _batches(data, input_name, BATCH):
            sess.run(None, feeds)
    elif kind == "exposed":
        observed = [n for n in tensors_to_observe(onnx.load(model)) if n != input_name]
        sess = session(model, extra_outputs=observed)
        for feeds in _batches(data, input_name, BATCH):
            sess.run(observed, feeds)
    else:
        if kind == NUMPY_ENTROPY:  # the exact histograms counted by numpy, without trtkit.native_count's kernel
            os.environ["TRTKIT_NATIVE"] = "0"
        settings = CalibrationSettings.create(method=kind.split("-")[0], batch_size=BATCH)
        settings.calibrate(model, data, progress=False)
    return {"seconds": time.perf_counter() - start, "cpu_s": _cpu() - cpu, "rss_mb": peak_rss_mb()}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_calibrate", "--child", json.dumps(job)],
                            capture_output=True, text=True, cwd=root, timeout=3600)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(folder: Path, source: Path) -> dict[int, Path]:
    import numpy as np

    from trtkit.data import NpyFile

    data = NpyFile(source)
    paths = {}
    for n in SIZES:
        path = folder / f"calib{n}.npy"
        if not path.exists():
            rows = data[0:min(n, len(data))]
            np.save(path, np.concatenate([rows] * -(-n // len(rows)))[:n])
        paths[n] = path
    return paths


def run(name: str, folder: Path, repeat: int, kinds: tuple[str, ...] = ("fp32", "exposed", *METHODS),
        sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    from benchmarks import zoo

    model = zoo.get(name)
    folder.mkdir(parents=True, exist_ok=True)
    paths = prepare(folder, Path(model.calib_data))
    result: dict[str, Any] = {"model": name, "load_before": os.getloadavg(), "rows": {}}
    for n, path in paths.items():
        if n not in sizes:
            continue
        for kind in kinds:
            runs = [run_child({"kind": kind, "model": str(model.onnx_path), "data": str(path)})
                    for _ in range(repeat)]
            failed = [r for r in runs if "error" in r]
            result["rows"][f"{kind}@{n}"] = failed[0] if failed else {
                key: statistics.median(r[key] for r in runs) for key in runs[0]}
            print(kind, n, result["rows"][f"{kind}@{n}"], file=sys.stderr)
    result["load_after"] = os.getloadavg()
    result["repeat"] = repeat
    from trtkit.native_count import count_function

    result["native_counter"] = count_function() is not None  # the children ran with the same environment
    return result


def markdown(result: dict[str, Any]) -> str:
    from benchmarks._report import markdown_table

    rows = result["rows"]
    time_rows, rss_rows = [], []
    extra = (NUMPY_ENTROPY,) if any(key.startswith(f"{NUMPY_ENTROPY}@") for key in rows) else ()
    for kind in ("fp32", "exposed", *METHODS, *extra):
        cells, rss = [kind], [kind]
        for n in SIZES:
            row, floor = rows.get(f"{kind}@{n}", {"error": "not run"}), rows[f"fp32@{n}"]
            if row.get("error") == "not run":
                cells += ["-", "", ""]
                rss.append("-")
                continue
            if "error" in row:
                cells += ["failed", "", ""]
                rss += ["failed"]
                continue
            cells += [f"{row['seconds']:.2f}", f"{row['seconds'] / floor['seconds']:.2f}",
                      f"{row['cpu_s'] / floor['cpu_s']:.2f}"]
            rss.append(f"{row['rss_mb']:.0f}")
        ends = [rows.get(f"{kind}@{n}", {}).get("rss_mb") for n in (1024, 32)]
        rss.append(f"{ends[0] / ends[1]:.2f}" if all(ends) else "")
        time_rows.append(cells)
        rss_rows.append(rss)
    meets, misses = [], []
    for kind in METHODS:
        ratios = [rows[f"{kind}@{n}"]["cpu_s"] / rows[f"fp32@{n}"]["cpu_s"] for n in (256, 1024)
                  if "error" not in rows[f"{kind}@{n}"]]
        (meets if ratios and max(ratios) <= 1.3 else misses).append(
            f"{kind} ({'-'.join(f'{r:.2f}' for r in ratios)}x)")
    headers = ["configuration"] + [f"{label} N={n}" for n in SIZES for label in ("s", "/ fp32 wall", "/ fp32 CPU")]
    load = ", ".join(f"{v:.2f}" for v in result["load_before"])
    load_after = ", ".join(f"{v:.2f}" for v in result["load_after"])
    runs = "one run" if result["repeat"] == 1 else f"medians of {result['repeat']} runs"
    note = f"\n{result['note']}" if result.get("note") else ""  # e.g. how merged runs were put together
    values = VALUES_PER_SAMPLE.get(result["model"])
    per_value = ", ".join(
        f"{(rows[f'{kind}@{n}']['cpu_s'] - rows[f'minmax@{n}']['cpu_s']) / (n * values) * 1e9:.2f}"
        for kind in ("entropy", *extra) for n in (256, 1024) if f"{kind}@{n}" in rows) if values else "?"
    budget = ", ".join(f"{(1.3 * rows[f'fp32@{n}']['cpu_s'] - rows[f'minmax@{n}']['cpu_s']) / (n * values) * 1e9:.2f}"
                       for n in (256, 1024)) if values else "?"
    counter = ("trtkit.native_count's compiled kernel (built here with the machine's C compiler)"
               if result.get("native_counter") else "numpy (no compiled kernel in this run)")
    return f"""`python -m benchmarks.bench_calibrate`: `{result['model']}` (real pretrained EfficientNet-Lite1,
zoo calibration crops; N = 1024 repeats the 256 crops), batches of 32, {runs} per configuration, each in
a fresh subprocess (work only: imports and plugin discovery excluded, session creation included). The
machine was shared with other sessions' benchmarks: load average {load} before, {load_after} after,
on 2 cores, so wall-time ratios are noisy; the CPU-time ratio (all threads of the process) is given too.{note}
fp32: plain FP32 inference on all cores (the issue's floor); exposed: the same returning every observed
tensor, no statistics (the floor of any calibrator on onnxruntime); the methods: `collect` + scales, as
`trtkit calibrate` runs them (percentile and mse histogram 4096 positions per sample, entropy every value).

{markdown_table(headers, time_rows)}

Peak RSS (MB; target: flat in N, ratio <= 1.1):

{markdown_table(["configuration", *(f"N={n}" for n in SIZES), "1024 / 32"], rss_rows)}

Reading (the issue's goal: <= 1.3x the floor and RSS <= 1.1x from N = 32 to 1024, per method): within 1.3x
of the fp32 floor in CPU time at N = 256 and 1024: {", ".join(meets) or "none"}; above it:
{", ".join(misses) or "none"}. onnxruntime returning the observed tensors of whole batches (exposed) costs far
more than plain inference and peaks at gigabytes; trtkit runs slices of each batch holding about 4 MiB of
observed activations, which keeps it near the plain floor and its memory near 400 MB (one data batch in
memory at a time). Entropy histograms every value of every observed tensor (11.5 M values a sample on this
model; its KL threshold depends on the counts in sparse tail bins), counted here by {counter}; the
same counts bit for bit as numpy's path. Its cost over minmax (which reads the same tensors without a
histogram), per value, entropy{"" if not extra else " then entropy-numpy"} at N = 256 and 1024: {per_value} ns.
Measured apart on the real activations of 2 zoo crops (every observed tensor; `TensorStats.update`, CPU time):
numpy's path 2.1-2.3 ns a value (min/max 0.27, dropping exact zeros 0.8, abs and the multiply cast to intp
0.5, np.bincount 1.7-2.0 a counted value: its min/max pre-pass and a scalar loop that stalls on runs of one
bin); the compiled kernel 0.9-1.1 ns (min/max 0.27, one pass computing |v| * 2^k truncated and counting it in
four interleaved sub-histograms about 0.6, the Python loop over 128K-value chunks the rest). 1.3x the floor
leaves the histogram (1.3 x fp32 CPU - minmax CPU) / values = {budget} ns a value at N = 256 and 1024 in this
run: less than the kernel's one counting pass alone costs here, so exact entropy stays above 1.3x on a model
that exposes this many values per unit of compute (depthwise convolutions); the sampled methods meet it.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="effnet-lite1")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/trtkit-bench-calibrate"))
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="format results written by --json instead of measuring")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    parser.add_argument("--kinds", default=",".join(("fp32", "exposed", *METHODS)),
                        help="configurations to run, comma-separated (a subset cannot be written as the section)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="N values to run, comma-separated")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    kinds, sizes = tuple(args.kinds.split(",")), tuple(int(n) for n in args.sizes.split(","))
    result = (json.loads(args.from_json.read_text()) if args.from_json
              else run(args.model, args.folder, args.repeat, kinds, sizes))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if len(result["rows"]) < len(SIZES) * (2 + len(METHODS)):  # a subset: the rows only
        print(json.dumps(result, indent=2))
        return 0
    text = markdown(result)
    print(text)
    if args.write:
        from benchmarks._report import write_section

        write_section("calibrate-floor", "Calibration against the floor on a real model (issue 15)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
