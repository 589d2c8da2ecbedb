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
    for method in METHODS if stats.histograms else ("minmax",):  # range-only statistics: minmax alone
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


def _cpu() -> float:
    """CPU seconds of this process, every thread (user + system)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _shard_cpu(model: Any, job: Any) -> tuple[float, float]:
    """In a Ray worker: one shard's collection (trtkit's own task function), its wall and CPU seconds."""
    from trtkit.calibration import _collect_shard

    wall, cpu = time.perf_counter(), _cpu()
    _collect_shard(model, job)
    return time.perf_counter() - wall, _cpu() - cpu


def _worker_cpu(ray: Any, model_path: Path, data: Path, settings: Any, workers: int) -> list[float]:
    """CPU seconds each worker spends on its shard (the same shards and task function as collect_on): what
    each would take on a core of its own, whatever the other processes of a shared machine do."""
    from trtkit.calibration import _ShardJob, tensors_to_observe
    from trtkit.data import load_data, shard_data
    from trtkit.model import as_artifact

    artifact = as_artifact(model_path)
    source = load_data(str(data), artifact.model, batch_size=settings.batch_size, limit=settings.limit)
    names = tuple(tensors_to_observe(artifact.model, settings.tensors))
    jobs = [_ShardJob(shard, names, settings.histograms, settings.histogram_positions)
            for shard in shard_data(str(data), source, workers)]
    model = ray.put(artifact.model.SerializeToString())
    task = ray.remote(num_cpus=1)(_shard_cpu)
    return [cpu for _, cpu in ray.get([task.remote(model, job) for job in jobs])]


def _floor(model: Path, data: Path, samples: int, batch: int) -> tuple[float, float]:
    """Plain FP32 inference, one onnxruntime thread, whole batches: what one worker's inference costs."""
    import numpy as np

    from trtkit.runtime import session

    sess = session(str(model), threads=1)
    x = np.load(data, mmap_mode="r")[:samples]
    name = sess.get_inputs()[0].name
    start, cpu = time.perf_counter(), _cpu()
    for first in range(0, samples, batch):
        sess.run(None, {name: np.ascontiguousarray(x[first:first + batch])})
    return time.perf_counter() - start, _cpu() - cpu


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
    floor, floor_cpu = _floor(model_path, data, samples, batch)
    result["floor_1thread_s"], result["floor_1thread_cpu_s"] = floor, floor_cpu
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
        cpu = _cpu()
        here, here_s = _timed(lambda s=settings: s.collect(model_path, str(data), progress=False))
        here_cpu = _cpu() - cpu
        reference = _scales_bytes(here, tmp)
        row: dict[str, Any] = {"method": method, "in_process_s": here_s, "in_process_cpu_s": here_cpu,
                               "tensors": len(here.tensors)}
        for workers in (1, 2):
            execution = Execution.create(engine="ray", workers=workers)
            there, there_s = _timed(lambda s=settings, e=execution: s.collect_on(e, model_path, str(data)))
            row[f"ray{workers}_s"] = there_s
            row[f"ray{workers}_identical"] = _scales_bytes(there, tmp) == reference
        for workers in (1, 2):
            row[f"ray{workers}_worker_cpu_s"] = _worker_cpu(ray, model_path, data, settings, workers)
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

    n, floor, floor_cpu = result["samples"], result["floor_1thread_s"], result["floor_1thread_cpu_s"]
    rows = []
    for row in result["rows"]:
        one, two = row["ray1_worker_cpu_s"], row["ray2_worker_cpu_s"]
        rows.append([row["method"], f"{row['in_process_s']:.2f}", f"{row['ray1_s']:.2f}", f"{row['ray2_s']:.2f}",
                     f"{row['ray1_s'] / row['ray2_s']:.2f}x",
                     f"{row['in_process_s'] / row['ray2_s']:.2f}x", f"{row['in_process_cpu_s']:.2f}",
                     f"{one[0]:.2f}", " + ".join(f"{c:.2f}" for c in two), f"{one[0] / max(two):.2f}x",
                     "yes" if row["ray1_identical"] and row["ray2_identical"] else "NO",
                     f"{row['merge_s'] * 1000:.1f}"])
    table = markdown_table(["method", "in-process s", "Ray 1 worker s", "Ray 2 workers s",
                            "wall speed-up, 2 workers vs 1", "wall speed-up, 2 workers vs in-process",
                            "in-process CPU s",
                            "CPU s, 1 worker", "CPU s per worker, 2 workers",
                            "speed-up with a core per worker (CPU 1 worker / max CPU of 2)",
                            "scales identical", "merge of 2 shards ms"], rows)
    fractions = [max(row["ray2_worker_cpu_s"]) / row["ray1_worker_cpu_s"][0] for row in result["rows"]]
    walls = [row["in_process_s"] / row["ray2_s"] for row in result["rows"]]
    low, high, wall_low, wall_high = min(fractions), max(fractions), min(walls), max(walls)
    versus_one = ", ".join(f"{row['method']} {row['ray1_s'] / row['ray2_s']:.2f}x" for row in result["rows"])
    busiest = max(result["load_before"][0], result["load_after"][0])
    machine = (f"The machine was quiet when the run started (load average {', '.join(f'{v:.2f}' for v in result['load_before'])}), "
               f"{', '.join(f'{v:.2f}' for v in result['load_after'])} when it ended, on 2 cores"
               if result["load_before"][0] < 1 else
               f"The machine is shared with other sessions' benchmarks: load average {', '.join(f'{v:.2f}' for v in result['load_before'])} "
               f"before, {', '.join(f'{v:.2f}' for v in result['load_after'])} after, on 2 cores")
    fast_low, fast_high = 1 / high, 1 / low
    tensors = result["rows"][0]["tensors"]
    two_cores = [row["method"] for row in result["rows"] if row["ray1_worker_cpu_s"][0] > 1.05 * row["ray1_s"]]
    overlap = "" if not two_cores else (
        f"\nOne worker spent more CPU seconds than wall seconds ({', '.join(two_cores)}): it used a second core, its "
        "task reducing each run in a second thread while onnxruntime computed the next, so 2 workers on 2 cores "
        "could not halve its time (since then a task runs and reduces in one thread: one CPU, as Ray counts it).")
    return f"""`python -m benchmarks.bench_ray --samples {n} --write`: `{result['model']}` (real pretrained
EfficientNet-Lite, zoo calibration crops), N = {n} samples, batch {result['batch']}, one run of each.
{machine}: wall times depend on the other processes of the machine (a 1-minute load of {busiest:.2f} at the
worst), so CPU seconds are measured too. In-process: `collect` as
`trtkit calibrate` runs it with one worker (onnxruntime on all CPUs but one, the reduction of one run
overlapping the next, so it already uses both cores when the reduction is heavy). Ray: a local Ray of 2
CPUs started once ({result['ray_start_s']:.1f} s, and {result['warm_s']:.1f} s for each worker process to import
onnxruntime and trtkit: one-off costs of a command, not counted), tasks of one CPU with one onnxruntime
thread each, the data sharded on batch boundaries. The CPU columns run the same shards with trtkit's own
task function and count each worker process's CPU seconds: with a core per worker, its wall time. Plain
FP32 inference over the same samples, one onnxruntime thread: {floor:.2f} s wall, {floor_cpu:.2f} s CPU
({floor_cpu / n * 1000:.1f} ms per sample).

{table}

"scales identical": the scales files computed from the Ray statistics are byte-identical to the
in-process ones, for both worker counts and for every calibrator the statistics allow (minmax, entropy,
percentile and mse from histograms; minmax alone from the range-only statistics minmax collects). The merge column is the driver's
cost per extra shard ({tensors} tensors x 8192 bins, independent of N); scaling is argued in
[scale.md](scale.md).

Reading: the work divides evenly between the workers (each of 2 workers spends about half the CPU of one),
so with a core per worker 2 workers take {low:.2f}-{high:.2f} of one worker's time ({fast_low:.2f}-{fast_high:.2f}x).
The wall clock of 2 workers against 1: {versus_one}; against in-process {wall_low:.2f}-{wall_high:.2f}x.{overlap}
With 2 workers on 2 cores the driver's own pass over the data (checks and SHA-256 fingerprint, about 0.5 ms
of CPU a sample here) shares the cores with them. The CPU columns count the workers only; the driver's
model load, tensor selection and data hash are in the in-process column.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="effnet-lite1")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default="minmax,percentile,entropy")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="format results written by --json instead of measuring")
    args = parser.parse_args(argv)
    import tempfile

    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
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
