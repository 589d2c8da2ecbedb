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
    assert row["total_s"] >= 0.2 and row["iterations"] >= 5
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
