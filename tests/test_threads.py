"""Threads follow the CPUs the process may use (affinity, cgroup quota), not os.cpu_count(); --threads and
the recipe's [run] threads set them. Affinity is restricted in a subprocess with os.sched_setaffinity,
which is what `taskset -c` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trtkit import cpus

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")


def one_cpu() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def run_on_one_cpu(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    return subprocess.run(args, preexec_fn=one_cpu, capture_output=True, text=True, env=env, **kwargs)


def test_pools_follow_the_affinity_set_not_cpu_count():
    code = """
import os, json
from trtkit import cpus
cpus.configure()
from trtkit.runtime import session_options
from trtkit.calibration import calibration_threads
print(json.dumps({"cpu_count": os.cpu_count(), "available": cpus.available_cpus(),
                  "ort": session_options().intra_op_num_threads, "calibration": calibration_threads(),
                  "omp": os.environ["OMP_NUM_THREADS"], "blas": os.environ["OPENBLAS_NUM_THREADS"]}))
"""
    result = run_on_one_cpu([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["available"] == 1 and seen["ort"] == 1 and seen["calibration"] == 1
    assert seen["omp"] == seen["blas"] == "1"
    assert seen["cpu_count"] == os.cpu_count()  # what the old code used, whatever the affinity


def test_threads_flag_sets_every_pool_and_torch():
    pytest.importorskip("torch")
    code = """
import json, os, torch
from trtkit import cpus
cpus.configure(3)
from trtkit.runtime import session_options
from trtkit.calibration import calibration_threads
print(json.dumps({"ort": session_options().intra_op_num_threads, "calibration": calibration_threads(),
                  "torch": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"]}))
"""
    result = run_on_one_cpu([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ort": 3, "calibration": 3, "torch": 3, "omp": "3"}


def test_cgroup_quota_caps_the_count(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path) is None


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("threads")
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "m.onnx")
    np.save(folder / "x.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    return folder / "m.onnx", folder / "x.npy"


def test_calibrate_cli_uses_the_usable_cpus_and_threads_flag(conv_model, tmp_path):
    model, data = conv_model
    cli = [sys.executable, "-m", "trtkit.cli", "calibrate", str(model), "--data", str(data), "--json"]
    default = run_on_one_cpu([*cli, "-o", str(tmp_path / "a.json")])
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout)["threads"] == 1
    flagged = run_on_one_cpu([*cli, "-o", str(tmp_path / "b.json"), "--threads", "2"])
    assert flagged.returncode == 0, flagged.stderr
    assert json.loads(flagged.stdout)["threads"] == 2
    # the thread count changes no number in the scales
    assert json.loads((tmp_path / "a.json").read_text())["tensors"] == json.loads((tmp_path / "b.json").read_text())["tensors"]
    bad = run_on_one_cpu([*cli, "-o", str(tmp_path / "c.json"), "--threads", "0"])
    assert bad.returncode == 2 and "--threads must be >= 1" in bad.stderr


@pytest.mark.parametrize("command", ["export", "optimize", "calibrate", "build", "eval", "run"])
def test_every_command_that_runs_a_model_takes_threads(command):
    result = subprocess.run([sys.executable, "-m", "trtkit.cli", command, "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0 and "--threads" in result.stdout, result.stdout[-500:]


def test_recipe_threads_key(conv_model, tmp_path):
    model, data = conv_model
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nonnx = "{model}"\n\n[calibration]\ndata = "{data}"\n\n[report]\nenabled = false\n\n'
                      '[run]\nthreads = 1\n')
    code = f"""
from trtkit import cpus
from trtkit.pipeline import run_recipe
run_recipe({str(recipe)!r}, output={str(tmp_path / "out")!r})
print(cpus.threads())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1"
    recipe.write_text(recipe.read_text().replace("threads = 1", "threads = 0"))
    bad = subprocess.run([sys.executable, "-m", "trtkit.cli", "run", str(recipe), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "threads" in bad.stderr
