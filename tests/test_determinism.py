"""Determinism: the same inputs and options give byte-identical ONNX, scales and caches.

Across runs (separate processes with different PYTHONHASHSEED, so set/dict-order accidents show), across
thread counts (OMP/onnxruntime intra-op threads, calibration threads) and across calibration batch sizes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SAVE_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from trtkit.model import ModelArtifact

    art = ModelArtifact.load(sys.argv[1])
    # Metadata built in a process-dependent order (set iteration depends on PYTHONHASHSEED).
    art.metadata = {name: {"length": len(name)} for name in {"zeta", "alpha", "mid", "beta", "omega"}}
    art.metadata["passes"] = sorted({"simplify", "optimize"})
    out = Path(sys.argv[2])
    art.save(out / "inline.onnx", external_data=False)
    art.save(out / "ext.onnx", external_data=True)
    files = ["inline.onnx", "ext.onnx", "ext.onnx.data"]
    print(json.dumps({f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files}))
""")


def test_model_save_is_byte_identical_across_processes(digits_onnx, tmp_path):
    runs = []
    for index, (seed, threads) in enumerate((("1", "1"), ("2", "2"), ("random", "2"))):
        out = tmp_path / f"run{index}"
        env = {"PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads}
        import os

        proc = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(digits_onnx), str(out)], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] == runs[2]
    # A loaded-and-resaved model is a fixed point: load(save(x)).save() gives the same bytes again.
    from trtkit.model import ModelArtifact

    again = tmp_path / "again"
    ModelArtifact.load(tmp_path / "run0" / "ext.onnx").save(again / "ext.onnx")
    assert digest(again / "ext.onnx") == runs[0]["ext.onnx"]
    assert digest(again / "ext.onnx.data") == runs[0]["ext.onnx.data"]


def _run_pinned(args: tuple[str, ...], env: dict[str, str], cpus: set[int] | None) -> subprocess.CompletedProcess[str]:
    """`trtkit ARGS` in a subprocess, optionally pinned to `cpus` (onnxruntime sizes its pools by affinity)."""
    import os

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return subprocess.run([sys.executable, "-m", "trtkit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300, preexec_fn=pin)


def _cli_pipeline(folder: Path, model: Path, data: Path, env: dict[str, str],
                  cpus: set[int] | None = None) -> dict[str, str]:
    """optimize -> calibrate (scales + TensorRT cache) -> quantize through the CLI; hashes of every artefact."""
    folder.mkdir(parents=True)
    steps = [
        ("optimize", str(model), "-o", str(folder / "opt.onnx")),
        ("calibrate", str(folder / "opt.onnx"), "-d", str(data), "-m", "entropy", "-o", str(folder / "scales.json"),
         "--cache", str(folder / "calib.cache")),
        ("quantize", str(folder / "opt.onnx"), "-s", str(folder / "scales.json"), "-o", str(folder / "int8.onnx")),
    ]
    for args in steps:
        result = _run_pinned(args, env, cpus)
        assert result.returncode == 0, f"{args[0]}: {result.stderr[-2000:]}"
    return {p.name: digest(p) for p in sorted(folder.iterdir())}


def test_cli_pipeline_is_byte_identical_across_runs_and_threads(digits_onnx, digits_data, tmp_path):
    data = tmp_path / "calib.npy"
    np.save(data, digits_data[0][:128])
    model = tmp_path / "digits.onnx"
    shutil.copy(digits_onnx, model)
    import os

    envs = [{"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}, {"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "2"}]
    # One run pinned to a single CPU (onnxruntime then uses one intra-op thread), the other on all CPUs.
    cpus = [{min(os.sched_getaffinity(0))} if hasattr(os, "sched_setaffinity") else None, None]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda i: _cli_pipeline(tmp_path / f"run{i}", model, data, envs[i], cpus[i]),
                                 range(2))
    assert set(first) == {"opt.onnx", "scales.json", "calib.cache", "int8.onnx"}
    assert first == second


def test_calibration_identical_across_threads_and_batch_sizes(digits_onnx, digits_data, tmp_path):
    """Statistics are mergeable: threads and batch size must not change scales, caches or the QDQ model."""
    from trtkit.calibration import calibrate
    from trtkit.plugins.qdq.insert import quantize
    from trtkit.trtcache import write_cache

    x = digits_data[0][:96]
    hashes = []
    for threads, batch_size in ((1, 8), (2, 32), (None, 96)):
        folder = tmp_path / f"t{threads}-b{batch_size}"
        for method in ("entropy", "percentile", "minmax"):
            scales = calibrate(digits_onnx, x, method=method, threads=threads, batch_size=batch_size,
                               progress=False, tensors="all", output=folder / f"{method}.json")
            write_cache(scales, folder / f"{method}.cache")
        quantize(digits_onnx, folder / "entropy.json", output=folder / "int8.onnx")
        hashes.append({p.name: digest(p) for p in sorted(folder.iterdir())})
    assert hashes[0] == hashes[1] == hashes[2]
