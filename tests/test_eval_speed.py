"""The speed evaluator: iteration control, consistent statistics, several models in one table."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from eval_helpers import mlp_fp32, mlp_inputs, quantize_max

import trtkit
from trtkit.errors import OptionError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed")
    fp32 = mlp_fp32(folder / "mlp.onnx")
    return fp32, quantize_max(fp32, folder / "mlp.int8.onnx", {"x": mlp_inputs(32)})


def test_iterations_and_statistics(pair):
    fp32, qdq = pair
    result = trtkit.evaluate("speed", [fp32, qdq], iterations=37, warmup_ms=10.0, batch_size=4)
    rows = result.data["models"]
    assert [r["model"] for r in rows] == [str(fp32), str(qdq)]
    assert [r["mode"] for r in rows] == ["onnxruntime float", "onnxruntime int8 kernels"]
    for row in rows:
        lat = row["latency"]
        assert row["iterations"] == 37 and row["batch"] == 4 and row["warmup_iterations"] >= 1
        assert lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert row["throughput_qps"] == pytest.approx(37 / row["total_s"])
        assert row["samples_per_s"] == pytest.approx(4 * row["throughput_qps"])
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[0]["latency"]["median_ms"] / rows[1]["latency"]["median_ms"])
    assert "speedup" in result.summary and "mlp.int8.onnx" in result.summary


def test_duration_and_min_iterations(pair):
    fp32, _ = pair
    result = trtkit.evaluate("speed", [fp32], duration_s=0.2, warmup_ms=0.0, min_iterations=5)
    row = result.data["models"][0]
    assert row["total_s"] >= 0.2 * (1 - 1e-9) and row["iterations"] >= 5  # the loop runs until 0.2 s (float slack)
    with pytest.raises(OptionError):
        trtkit.evaluate("speed", [fp32], duration_s=0.0)


def test_speed_cli_json_and_emulation_flag(pair):
    fp32, qdq = pair
    result = run_cli("eval", "speed", str(fp32), str(qdq), "-O", "iterations=10", "-O", "warmup_ms=0",
                     "--emulate-qdq", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["data"]["models"]
    assert rows[1]["mode"] == "Q/DQ emulated in float"
    assert "median" in result.stderr


def _gpu_reason() -> str | None:
    from trtkit.plugins.tensorrt.module import unavailable_reason

    return unavailable_reason("tensorrt")  # None only with full TensorRT and a usable GPU


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"needs NVIDIA TensorRT and a GPU: {_gpu_reason()}")
def test_tensorrt_engine_gets_h2d_compute_d2h_split(pair, tmp_path):
    fp32, _ = pair
    engine = trtkit.build(fp32, tmp_path / "m.engine", builder="tensorrt", max_batch=8)
    result = trtkit.evaluate("speed", [fp32, engine], iterations=50, warmup_ms=50.0, batch_size=8)
    row = result.data["models"][1]
    assert row["mode"] == "engine"
    split = row["split"]
    assert set(split) == {"h2d_ms", "compute_ms", "d2h_ms"}
    assert all(value["median_ms"] >= 0 for value in split.values())
    # The split covers part of the host-measured latency, never more.
    assert sum(v["median_ms"] for v in split.values()) <= row["latency"]["median_ms"] * 1.05
