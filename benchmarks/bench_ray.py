"""Calibration on Ray workers vs in-process, on a real pretrained model of the zoo (issue 15).

    python -m benchmarks.bench_ray                      # effnet-lite1, 64 samples, percentile and entropy
    python -m benchmarks.bench_ray --samples 128 --write  # and write docs/benchmarks.md's section

One run of each configuration (the machine is shared: the load average before and after is recorded):
- in-process `collect` (what `trtkit calibrate` does with one worker: onnxruntime on all CPUs but one, the
  statistics of one run reduced while the next runs),
- the Ray engine with 1 and 2 workers on a local Ray of 2 CPUs started once (its start-up timed apart),
- plain FP32 inference with one onnxruntime thread over the same samples (the per-sample cost of a worker),
- the merge of two shards' statistics (the driver's cost per shard: tensors x bins, whatever N).
Scales from the Ray runs are compared byte for byte with the in-process ones, for every calibrator.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("minmax", "entropy", "percentile", "mse")


def _timed(function: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def _scales_bytes(stats: Any, tmp: Path) -> dict[str, bytes]:
    out = {}
    for method in METHODS:
        stats.compute(method).save(tmp / f"{method}.json")
        out[method] = (tmp / f"{method}.json").read_bytes()
    return out


def _warm() -> float:
    """In a Ray worker: import what a calibration task imports (paid once per worker process)."""
    start = time.perf_counter()
    import onnxruntime  # noqa: F401

    import trtkit.calibration  # noqa: F401

    time.sleep(0.5)  # both warm-up tasks run at once, so each lands on its own worker process
    return time.perf_counter() - start


def _floor(model: Path, data: Path, samples: int, batch: int) -> float:
    """Plain FP32 inference, one onnxruntime thread, whole batches: what one worker's inference costs."""
    import numpy as np

    from trtkit.runtime import session

    sess = session(str(model), threads=1)
    x = np.load(data, mmap_mode="r")[:samples]
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    for first in range(0, samples, batch):
        sess.run(None, {name: np.ascontiguousarray(x[first:first + batch])})
    return time.perf_counter() - start


def run(name: str, samples: int, batch: int, methods: list[str], tmp: Path) -> dict[str, Any]:
    import ray

    from benchmarks import zoo
    from trtkit.calibration import CalibrationSettings
    from trtkit.engine import Execution

    model = zoo.get(name)
    model_path, data = Path(model.onnx_path), Path(model.calib_data)
    load_before = os.getloadavg()
    result: dict[str, Any] = {"model": name, "samples": samples, "batch": batch, "load_before": load_before,
                              "rows": []}
    floor = _floor(model_path, data, samples, batch)
    result["floor_1thread_s"] = floor
    (_, start_s) = _timed(lambda: ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                                           log_to_driver=False))
    result["ray_start_s"] = start_s
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import benchmarks/
    warm = ray.remote(num_cpus=1)(_warm)
    _, warm_s = _timed(lambda: ray.get([warm.remote() for _ in range(2)]))
    result["warm_s"] = warm_s
    for method in methods:
        settings = CalibrationSettings.create(method=method, batch_size=batch, limit=samples)
        here, here_s = _timed(lambda s=settings: s.collect(model_path, str(data), progress=False))
        reference = _scales_bytes(here, tmp)
        row: dict[str, Any] = {"method": method, "in_process_s": here_s, "tensors": len(here.tensors)}
        for workers in (1, 2):
            execution = Execution.create(engine="ray", workers=workers)
            there, there_s = _timed(lambda s=settings, e=execution: s.collect_on(e, model_path, str(data)))
            row[f"ray{workers}_s"] = there_s
            row[f"ray{workers}_identical"] = _scales_bytes(there, tmp) == reference
        parts = [here.tensors, here.tensors]
        _, merge_s = _timed(lambda p=parts: {n: functools.reduce(type(t).merge, (q[n] for q in p))
                                             for n, t in p[0].items()})
        row["merge_s"] = merge_s
        result["rows"].append(row)
    ray.shutdown()
    result["load_after"] = os.getloadavg()
    return result


def markdown(result: dict[str, Any]) -> str:
    from benchmarks._report import markdown_table

    n, floor = result["samples"], result["floor_1thread_s"]
    rows = []
    for row in result["rows"]:
        rows.append([row["method"], f"{row['in_process_s']:.2f}", f"{row['ray1_s']:.2f}", f"{row['ray2_s']:.2f}",
                     f"{row['in_process_s'] / row['ray2_s']:.2f}x", f"{row['ray1_s'] / row['ray2_s']:.2f}x",
                     "yes" if row["ray1_identical"] and row["ray2_identical"] else "NO",
                     f"{row['merge_s'] * 1000:.1f}"])
    table = markdown_table(["method", "in-process s", "Ray 1 worker s", "Ray 2 workers s",
                            "speed-up vs in-process", "speed-up vs Ray 1", "scales identical (4 methods)",
                            "merge of 2 shards ms"], rows)
    load = ", ".join(f"{v:.2f}" for v in result["load_before"])
    load_after = ", ".join(f"{v:.2f}" for v in result["load_after"])
    tensors = result["rows"][0]["tensors"]
    return f"""`python -m benchmarks.bench_ray --samples {n} --write`: `{result['model']}` (real pretrained
EfficientNet-Lite, zoo calibration crops), N = {n} samples, batch {result['batch']}, one run of each
(the machine is shared with other sessions: load average {load} before, {load_after} after, so these
times are noisy). In-process: `collect` as `trtkit calibrate` runs it with one worker (onnxruntime on all
CPUs but one, the reduction of one run overlapping the next). Ray: a local Ray of 2 CPUs started once
({result['ray_start_s']:.1f} s, and {result['warm_s']:.1f} s for each worker process to import onnxruntime and
trtkit: one-off costs of a command, not counted), tasks of one CPU with one onnxruntime thread each, the data
sharded on batch boundaries. Plain FP32 inference over the same samples with one onnxruntime thread:
{floor:.2f} s ({floor / n * 1000:.1f} ms per sample), the per-sample cost of a worker's inference.

{table}

"scales identical": the scales files of minmax, entropy, percentile and mse computed from the Ray
statistics are byte-identical to the in-process ones (both worker counts). The merge column is the driver's
cost per extra shard ({tensors} tensors x 8192 bins, independent of N); scaling is argued in
[scale.md](scale.md).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="effnet-lite1")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default="percentile,entropy")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.model, args.samples, args.batch, args.methods.split(","), Path(tmp))
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.write:
        from benchmarks._report import write_section

        write_section("ray", "Scale: calibration on Ray workers", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
