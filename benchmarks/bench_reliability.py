"""Benchmark: a model over the 2 GB protobuf limit through trtkit, wall time and peak memory per stage.

    python -m benchmarks.bench_reliability [--folder /tmp/trtkit-bench-reliability] [--layers 33] [--no-write]

The model is a MatMul+Relu chain of LAYERS weights of 4096x4096 float32 (64 MiB each; 33 layers = 2.06 GiB),
written tensor by tensor straight into external data (never one protobuf). Each stage runs in a fresh
subprocess; peak memory is that process's own VmHWM (not ru_maxrss, which Linux carries across fork + exec).
Stages: ModelArtifact load + tensor() of every weight + save (the streaming path), then the CLI pipeline
`trtkit optimize` (default passes, with its per-pass numerical check) -> `trtkit calibrate` (minmax) ->
`trtkit quantize` on the optimized model, and `trtkit optimize --no-check` on its own.
Every subprocess is capped (RLIMIT_AS = 4 x model + 2 GiB) so a stage that blows up fails instead of taking
the machine down. Results go to the `reliability` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

WIDTH = 4096


def measured(code: str, args: list[str], limit: int) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS MiB, last stderr line) of `python -c code args` under RLIMIT_AS."""
    from tests.test_large_model import PEAK_MB  # the tests' reading of the child's own peak (VmHWM)

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        wrapper = PEAK_MB + textwrap.dedent(f"""
            import atexit, resource, sys
            atexit.register(lambda: open({rss.name!r}, "w").write(str(_peak_mb() * 1024)))
        """) + textwrap.dedent(code)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        seconds = time.perf_counter() - start
        text = Path(rss.name).read_text().strip()
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, seconds, float(text) / 1024 if text else float("nan"), last


STREAM = """
from trtkit.model import ModelArtifact
art = ModelArtifact.load(sys.argv[1])
for name in art.initializers():
    art.tensor(name)
art.save(sys.argv[2])
"""
CLI = """
sys.argv = ["trtkit", *sys.argv[1:]]
from trtkit.cli import main
main()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/trtkit-bench-reliability")
    parser.add_argument("--layers", type=int, default=33)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    from tests.test_large_model import write_big_model  # the generator the >2 GB tests use

    info = write_big_model(folder / "model", layers=args.layers)
    model, size = info["path"], info["bytes"]
    generate = time.perf_counter() - start
    data = folder / "calib.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (4, WIDTH)).astype(np.float32))
    limit = 4 * size + (2 << 30)
    optimized = folder / "opt" / "big.onnx"
    stages = [
        ("load + tensor() x all + save (API)", STREAM, [str(model), str(folder / "copy" / "big.onnx")]),
        ("trtkit optimize (default passes, checked)", CLI, ["optimize", str(model), "-o", str(optimized)]),
        ("trtkit calibrate -m minmax (optimized model)", CLI,
         ["calibrate", str(optimized), "-d", str(data), "-m", "minmax", "-o", str(folder / "scales.json")]),
        ("trtkit quantize (optimized model)", CLI, ["quantize", str(optimized), "-s", str(folder / "scales.json"),
                                                    "-o", str(folder / "int8.onnx")]),
        ("trtkit optimize --no-check", CLI,
         ["optimize", str(model), "-o", str(folder / "opt2" / "big.onnx"), "--no-check"]),
    ]
    model_mb = size / 2**20
    rows = [["generate (tensor by tensor)", f"{generate:.1f}", "", "", "ok"]]
    for label, code, stage_args in stages:
        code_rc, seconds, rss, last = measured(code, stage_args, limit)
        result = "ok" if code_rc == 0 else f"exit {code_rc}: {last[:120]}"
        rows.append([label, f"{seconds:.1f}", f"{rss:.0f}", f"{rss / model_mb:.2f}", result])
        print(json.dumps({"stage": label, "seconds": round(seconds, 1), "peak_rss_mib": round(rss),
                          "result": result}), flush=True)
        shutil.rmtree(folder / "copy", ignore_errors=True)
        shutil.rmtree(folder / "opt2", ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    if args.no_write:
        return
    from benchmarks._report import markdown_table, write_section

    body = (
        f"A {args.layers}-layer MatMul+Relu chain, weights {model_mb:.0f} MiB ({size / 1e9:.2f} GB, over the "
        "2 GiB protobuf limit) in external data. Each stage is a fresh process; peak = its VmHWM.\n\n"
        + markdown_table(["stage", "wall (s)", "peak RSS (MiB)", "peak / model size", "result"], rows)
        + "\n\nThe streaming path holds a few tensors at a time. calibrate and quantize hold the weights about "
        "once (onnxruntime's session). optimize keeps the weights on disk (a pass reads only those it "
        "rewrites; the output's data file is streamed from the input's); with the check on, the peak is one "
        "onnxruntime session at a time, which maps the weights once. See docs/reliability.md."
    )
    print(write_section("reliability", "Reliability: a model over 2 GB through trtkit", body))


if __name__ == "__main__":
    main()
