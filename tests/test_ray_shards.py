"""Sharded execution without Ray: statistics merge exactly, and an engine plugin (real worker processes, a
third-party-style Engine) gives scales byte-identical to one in-process pass for every calibrator.

The Ray engine itself is tested in tests/test_ray.py (a real local Ray cluster).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from process_engine import process_engine_registry
from qdq_models import residual_model

from trtkit.calibration import TensorStats, collect
from trtkit.engine import Execution, split
from trtkit.errors import DataError, OptionError
from trtkit.registry import get_registry, set_registry

METHODS = ("minmax", "entropy", "percentile", "mse")


@pytest.fixture(scope="module")
def engine():
    registry = process_engine_registry()
    set_registry(registry)
    yield registry.get("engines", "processes")
    set_registry(None)


def _grown(values: np.ndarray, parts: list[slice]) -> list[TensorStats]:
    result = []
    for part in parts:
        stats = TensorStats("t")
        stats.update(values[part])
        result.append(stats)
    return result


def test_merged_statistics_equal_one_pass_whatever_the_split_and_order():
    rng = np.random.default_rng(0)
    # ranges that differ by many powers of two between parts (histograms grow when merged), zeros-only parts
    values = np.concatenate([rng.standard_normal(5000) * 1e-3, np.zeros(300), rng.standard_normal(7000) * 40,
                             rng.standard_normal(4000), [-900.0, 0.0]]).astype(np.float32)
    one = TensorStats("t")
    for start in range(0, len(values), 64):  # one pass, batch by batch
        one.update(values[start:start + 64])
    for cuts in ([0, 5000, 5300, 12300, len(values)], [0, 17, 4999, 5301, 16000, len(values)]):
        parts = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for order in (list(range(len(parts))), list(range(len(parts)))[::-1]):
            pieces = _grown(values, [parts[i] for i in order])
            merged = functools.reduce(TensorStats.merge, pieces)
            assert (merged.count, merged.min, merged.max, merged.range) == (one.count, one.min, one.max, one.range)
            np.testing.assert_array_equal(merged.hist, one.hist)
    assert one.hist.sum() == len(values)


def test_split_on_batch_boundaries():
    assert split(100, 3, 8) == [(0, 32), (32, 64), (64, 100)]
    assert split(10, 8, 4) == [(0, 4), (4, 8), (8, 10)]  # never more parts than batches
    assert split(5, 1, 8) == [(0, 5)]
    for total, parts, step in ((1000, 7, 32), (33, 2, 1), (64, 64, 8)):
        ranges = split(total, parts, step)
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a % step == 0 and a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    model = residual_model()
    model_path = folder / "model.onnx"
    onnx.save(model, model_path)
    rng = np.random.default_rng(1)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    # later samples reach larger values: the merged histograms grow across shards
    x = rng.standard_normal((100, *shape[1:])).astype(np.float32) * np.geomspace(0.01, 50, 100, dtype=np.float32)[
        :, None, None, None]
    data = folder / "calib.npy"
    np.save(data, x)
    return model_path, data, x


@pytest.mark.parametrize("positions", ["every", 97])
def test_process_engine_scales_byte_identical(engine, model_and_data, tmp_path, positions):
    model, data, _ = model_and_data
    histogram_positions = None if positions == "every" else positions
    kwargs = {"tensors": "all", "batch_size": 8, "limit": 90, "progress": False,
              "histogram_positions": histogram_positions}
    here = collect(model, str(data), **kwargs)
    there = collect(model, str(data), execution=Execution(engine, workers=3), **kwargs)
    assert here.num_samples == there.num_samples == 96  # the limit's last batch overruns it, in both
    assert here.data == there.data and list(here.tensors) == list(there.tensors)
    for method in METHODS:
        a, b = here.compute(method), there.compute(method)
        a.save(tmp_path / f"a_{method}.json")
        b.save(tmp_path / f"b_{method}.json")
        assert (tmp_path / f"a_{method}.json").read_bytes() == (tmp_path / f"b_{method}.json").read_bytes(), method


def test_failing_shard_names_file_and_samples(engine, model_and_data, tmp_path):
    model, _, x = model_and_data
    bad = x.copy()
    bad[70, 0, 0, 0] = np.nan
    data = tmp_path / "bad.npy"
    np.save(data, bad)
    with pytest.raises(DataError) as error:
        collect(model, str(data), tensors="all", batch_size=8, progress=False, execution=Execution(engine, workers=2))
    message = str(error.value)
    assert f"{data.resolve()} samples 48-99" in message and "\n" not in message, message


def test_workers_need_data_by_path(engine, model_and_data):
    model, _, x = model_and_data
    with pytest.raises(OptionError, match="by path"):
        collect(model, x, tensors="all", progress=False, execution=Execution(engine, workers=2))


def test_one_worker_is_in_process_and_bad_counts_are_refused():
    assert Execution.create(workers=1).in_process and Execution.create().in_process
    with pytest.raises(OptionError, match="--workers: workers must be an integer >= 1, got 0"):
        Execution.create(workers=0)
    assert "ray" in get_registry().stages["engines"]


def test_without_ray_workers_is_a_one_line_error_naming_the_extra(model_and_data, tmp_path):
    """Ray hidden from the process (as if not installed): --workers 2 exits 2 with one line."""
    model, data, _ = model_and_data
    code = ("import sys; sys.modules['ray'] = None; from trtkit.cli import main; sys.argv = ['trtkit'] + "
            "sys.argv[1:]; main()")
    result = subprocess.run([sys.executable, "-c", code, "calibrate", str(model), "-d", str(data), "--workers", "2",
                             "-o", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'trtkit[ray]'" in lines[0], result.stderr
    assert not Path(tmp_path / "s.json").exists()


def test_one_worker_never_imports_ray(model_and_data, tmp_path):
    model, data, _ = model_and_data
    code = ("import sys\nfrom trtkit.cli import main\nsys.argv = ['trtkit'] + sys.argv[1:]\ntry:\n    main()\n"
            "finally:\n    print('RAY', 'ray' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, "calibrate", str(model), "-d", str(data), "--workers", "1",
                             "-o", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "RAY False" in result.stderr


def test_unknown_engine_is_named():
    from trtkit.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="engine 'rayy'"):
        Execution.create(engine="rayy", workers=2)


def test_image_folder_shards_byte_identical(engine, model_and_data, tmp_path):
    """An image folder is sharded by file ranges (sorted names), each worker decoding and preprocessing its own."""
    from PIL import Image

    model, _, _ = model_and_data
    rng = np.random.default_rng(3)
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(21):
        pixels = (rng.random((10, 12, 3)) * (40 + 10 * index)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:03d}.png")
    kwargs = {"tensors": "all", "batch_size": 4, "progress": False, "preprocess": {"resize": "8x8"}}
    here = collect(model, str(folder), **kwargs)
    there = collect(model, str(folder), execution=Execution(engine, workers=3), **kwargs)
    assert here.num_samples == there.num_samples == 21 and here.data == there.data
    for method in ("entropy", "percentile"):
        here.compute(method).save(tmp_path / "a.json")
        there.compute(method).save(tmp_path / "b.json")
        assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes(), method


def test_fixed_batch_model_shards_byte_identical(engine, tmp_path):
    """A model with a fixed batch runs whole batches (a remainder dropped) in one pass and in shards alike."""
    from build_models import fp32_conv

    model = fp32_conv(tmp_path / "fixed.onnx", batch=4, spatial=6)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((30, 16, 6, 6)) * np.geomspace(0.1, 30, 30)[:, None, None, None]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    kwargs = {"tensors": "all", "progress": False, "histogram_positions": None}
    here = collect(model, str(tmp_path / "x.npy"), **kwargs)
    there = collect(model, str(tmp_path / "x.npy"), execution=Execution(engine, workers=3), **kwargs)
    assert here.num_samples == there.num_samples == 28 and here.data == there.data
    here.compute("entropy").save(tmp_path / "a.json")
    there.compute("entropy").save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
