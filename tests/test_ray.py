"""The Ray engine on a real local Ray cluster (one per module, 2 CPUs): results identical to in-process,
failing shards named, dead workers retried. Skipped, with the reason, where Ray is missing or cannot start.

The CLI runs in subprocesses connected to this module's cluster (--ray-address), so each call does not
start a Ray of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from qdq_models import residual_model

from trtkit.calibration import collect
from trtkit.engine import Execution
from trtkit.errors import first_line

METHODS = ("minmax", "entropy", "percentile", "mse")


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'trtkit[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # e.g. no shared memory in a sandbox
        pytest.skip(f"Ray cannot start here: {first_line(exc)}")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    model = residual_model()
    onnx.save(model, folder / "model.onnx")
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(2)
    scale = np.geomspace(0.01, 50, 60, dtype=np.float32)[:, None, None, None]  # ranges grow across shards
    x = rng.standard_normal((60, *shape[1:])).astype(np.float32) * scale
    np.save(folder / "calib.npy", x)
    return folder / "model.onnx", folder / "calib.npy", x


def test_statistics_on_ray_equal_in_process_for_every_method(ray_address, model_and_data, tmp_path):
    model, data, _ = model_and_data
    kwargs = {"tensors": "all", "batch_size": 8, "progress": False, "histogram_positions": None}
    here = collect(model, str(data), **kwargs)
    there = collect(model, str(data), execution=Execution.create(workers=2), **kwargs)
    assert here.data == there.data
    for method in METHODS:
        here.compute(method).save(tmp_path / "a.json")
        there.compute(method).save(tmp_path / "b.json")
        assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes(), method


def test_calibrate_cli_workers_identical_scales(ray_address, model_and_data, tmp_path):
    model, data, _ = model_and_data
    common = ["calibrate", str(model), "-d", str(data), "-m", "entropy", "-b", "8", "--tensors", "all"]
    local = run_cli(*common, "-o", str(tmp_path / "local.json"))
    assert local.returncode == 0, local.stderr
    remote = run_cli(*common, "-o", str(tmp_path / "ray.json"), "--workers", "2", "--ray-address", ray_address)
    assert remote.returncode == 0, remote.stderr
    assert (tmp_path / "local.json").read_bytes() == (tmp_path / "ray.json").read_bytes()


def test_failing_shard_names_file_and_samples(ray_address, model_and_data, tmp_path):
    model, _, x = model_and_data
    bad = x.copy()
    bad[45, 0, 1, 1] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    result = run_cli("calibrate", str(model), "-d", str(tmp_path / "bad.npy"), "-b", "8", "-o",
                     str(tmp_path / "s.json"), "--workers", "2", "--ray-address", ray_address)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{(tmp_path / 'bad.npy').resolve()} samples 32-59" in lines[0], result.stderr
    assert not (tmp_path / "s.json").exists()


def _die_once(folder: str, item: int) -> int:
    """Kills its worker process the first time it runs an item (a crashed machine, an OOM kill)."""
    marker = Path(folder) / str(item)
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return item * 10


def test_dead_worker_is_retried(ray_address, tmp_path):
    results = Execution.create(workers=2).map(_die_once, str(tmp_path), [0, 1, 2])
    assert results == [0, 10, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]


@pytest.fixture(scope="module")
def qdq_pair(tmp_path_factory):
    from eval_helpers import mlp_fp32, mlp_inputs, quantize_max

    folder = tmp_path_factory.mktemp("ray_eval")
    fp32 = mlp_fp32(folder / "mlp.onnx")
    x = mlp_inputs(45)
    np.save(folder / "x.npy", x)
    return str(fp32), str(quantize_max(fp32, folder / "mlp.int8.onnx", {"x": x})), str(folder / "x.npy")


def test_eval_accuracy_and_layers_identical_on_ray(ray_address, qdq_pair):
    import trtkit
    from trtkit.evaluation import to_json

    fp32, qdq, data = qdq_pair
    for name, options in (("accuracy", {"batch_size": 4, "num_samples": 42, "min_sqnr": 10.0}),
                          ("layers", {"batch_size": 8, "target_sqnr": 25.0}),
                          ("layers", {"sensitivity": "leave-one-out"})):
        here = trtkit.evaluate(name, [fp32, qdq], data=data, **options)
        there = trtkit.evaluate(name, [fp32, qdq], data=data, workers=2, **options)
        assert to_json(here.data) == to_json(there.data), name
        assert (here.summary, here.passed) == (there.summary, there.passed)
    assert there.data["num_samples"] == 45 and len(there.data["sensitivity"]) == len(there.data["layers"])


def test_eval_workers_cli(ray_address, qdq_pair, tmp_path):
    fp32, qdq, data = qdq_pair
    result = run_cli("eval", "accuracy", fp32, qdq, "--data", data, "--workers", "2", "--ray-address", ray_address,
                     "--json")
    assert result.returncode == 0, result.stderr
    assert '"num_samples": 45' in result.stdout
    speed = run_cli("eval", "speed", qdq, "--workers", "2")
    assert speed.returncode == 2 and "runs in this process only" in speed.stderr


def test_recipe_execution_section_identical_scales(ray_address, model_and_data, tmp_path):
    model, data, _ = model_and_data
    base = (f'[model]\nonnx = "{model}"\n[calibration]\ndata = "{data}"\nmethod = "percentile"\nbatch_size = 8\n'
            '[quantize]\nadaptive_round = false\n[report]\nenabled = false\n')
    scales = []
    for name, extra in (("local", ""), ("ray", f'[execution]\nworkers = 2\naddress = "{ray_address}"\n')):
        (tmp_path / f"{name}.toml").write_text(base + extra)
        result = run_cli("run", str(tmp_path / f"{name}.toml"), "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-2000:]
        scales.append((tmp_path / name / "scales.json").read_bytes())
    assert scales[0] == scales[1]


def test_adaptive_rounding_on_ray_gives_the_in_process_model(ray_address, model_and_data, tmp_path):
    """`quantize --data --workers 2`: calibration and adaptive rounding's Gram sums on Ray workers; the
    quantized model is the one a single process writes, byte for byte (and so through a recipe's
    [execution])."""
    from trtkit.plugins.ptq.adaptive_round import adaptive_round
    from trtkit.plugins.qdq.insert import quantize

    model, data, x = model_and_data
    qdq = quantize(str(model), collect(model, x, progress=False).compute("percentile"))
    options = {"limit": 40, "batch_size": 8, "blocks": 2, "positions": 16}
    here, _ = adaptive_round(qdq, str(model), x, **options)
    there, report = adaptive_round(qdq, str(model), x, **options, execution=Execution.create(workers=2))
    assert report.layers and here.model.SerializeToString() == there.model.SerializeToString()

    common = ("quantize", str(model), "--data", str(data), "--json")
    local = run_cli(*common, "-o", str(tmp_path / "local.onnx"))
    assert local.returncode == 0, local.stderr
    remote = run_cli(*common, "-o", str(tmp_path / "ray.onnx"), "--workers", "2", "--ray-address", ray_address)
    assert remote.returncode == 0, remote.stderr
    assert '"adaptive-round"' in remote.stdout
    assert (tmp_path / "local.onnx").read_bytes() == (tmp_path / "ray.onnx").read_bytes()

