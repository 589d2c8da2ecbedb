"""tegrastats parsing on recorded-format lines of JetPack 4, 5 and 6; profiler alignment and energy."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from eval_helpers import mlp_fp32

from trtkit.plugins.jetson import TegraSample, energy_joules, parse_file, parse_line, summarize

DATA = Path(__file__).parent / "data"


def test_jetpack5_orin_line():
    orin, busy, xavier = parse_file(DATA / "tegrastats_jp5.txt")
    assert orin.timestamp == "11-25-2026 22:10:01"
    assert (orin.ram_used_mb, orin.ram_total_mb, orin.swap_used_mb) == (3286, 30593, 0)
    assert orin.cpu_load == [2, 1, 0, 0, None, None, None, None]
    assert orin.cpu_freq[:4] == [729] * 4
    assert (orin.emc_load, orin.emc_freq) == (0, 2133)
    assert (busy.gpu_load, busy.gpu_freq) == (87, [1300, 1300])
    assert busy.rails["VDD_GPU_SOC"] == (11535.0, 7357.0)
    assert "NC" not in busy.rails
    assert busy.power_mw == 11535 + 1985 + 4431 + 906
    assert busy.temperatures["GPU"] == pytest.approx(48.906)
    assert "CV0" not in busy.temperatures  # -256C marks an absent sensor
    assert "GPU" not in orin.temperatures
    # Xavier on JetPack 5: no timestamp, single GPU frequency, short rail names.
    assert xavier.timestamp is None
    assert (xavier.gpu_load, xavier.gpu_freq) == (0, [114])
    assert xavier.rails["SYS5V"] == (1603.0, 1603.0) and xavier.rails["CPU"] == (311.0, 311.0)
    assert xavier.temperatures["PMIC"] == 50.0


def test_jetpack6_lines():
    agx_idle, agx_busy, nano = parse_file(DATA / "tegrastats_jp6.txt")
    assert len(agx_idle.cpu_load) == 12
    assert agx_busy.gpu_load == 64 and agx_busy.gpu_freq == []
    assert agx_busy.emc_load is None  # JetPack 6 AGX lines carry no EMC_FREQ
    assert agx_busy.temperatures == pytest.approx(
        {"cpu": 46.1, "soc2": 43.0, "soc0": 43.9, "gpu": 44.218, "tj": 46.1, "soc1": 43.3})
    assert agx_busy.power_mw == 9583 + 1597 + 4839
    # Orin Nano: the module input rail is the total; engines reported "off" are not rails.
    assert nano.power_source == "VDD_IN" and nano.power_mw == 7208
    assert (nano.gpu_load, nano.gpu_freq) == (45, [612])
    assert nano.cpu_freq[-2:] == [729, 729]
    assert set(nano.rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}


def test_jetpack4_line_and_non_sample_lines():
    (nano,) = parse_file(DATA / "tegrastats_jp4.txt")
    assert nano.rails["POM_5V_IN"] == (2395.0, 2195.0) and nano.power_mw == 2395
    assert "IRAM" not in nano.rails
    assert (nano.gpu_load, nano.gpu_freq, nano.emc_freq) == (38, [921], 1600)
    assert parse_line("") is None and parse_line("tegrastats: some warning") is None


def test_summary_and_energy_are_consistent():
    samples = parse_file(DATA / "tegrastats_jp6.txt")[:2]
    summary = summarize(samples)
    assert summary["power_mw"]["mean"] == pytest.approx((samples[0].power_mw + samples[1].power_mw) / 2)
    assert summary["gpu_load"]["max"] == 64
    # Energy: power linear between samples; a constant 5 W over 2 s is 10 J.
    timed = [TegraSample(host_time=t, rails={"VDD_IN": (5000.0, 5000.0)}) for t in (0.0, 1.0, 2.0, 3.0)]
    assert energy_joules(timed, 0.5, 2.5) == pytest.approx((10.0, 5.0))
    ramp = [TegraSample(host_time=t, rails={"VDD_IN": (1000.0 * t, 0.0)}) for t in (0.0, 4.0)]
    assert energy_joules(ramp, 1.0, 3.0)[0] == pytest.approx(4.0)  # integral of t W from 1 to 3 s


def test_parse_command_json():
    result = run_cli("jetson", "parse", str(DATA / "tegrastats_jp5.txt"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["samples"] == 3 and data["gpu_load"]["max"] == 87
    missing = run_cli("jetson", "parse", str(DATA / "nope.txt"))
    assert missing.returncode == 2 and "nope.txt" in missing.stderr


def test_absent_tegrastats_is_said_clearly(tmp_path):
    model = mlp_fp32(tmp_path / "m.onnx")
    result = run_cli("eval", "jetson", str(model), "-O", "tegrastats=no-such-tegrastats")
    assert result.returncode == 2
    assert "tegrastats not found" in result.stderr and "Jetson" in result.stderr


@pytest.fixture
def fake_tegrastats(tmp_path):
    """A stand-in for the device tool: prints a recorded JetPack 6 Orin Nano line every --interval ms."""
    script = tmp_path / "tegrastats"
    line = (DATA / "tegrastats_jp6.txt").read_text().splitlines()[2]
    script.write_text(
        f"#!{sys.executable}\nimport sys, time\n"
        "interval = float(sys.argv[sys.argv.index('--interval') + 1]) / 1000\n"
        f"line = {line!r}\n"
        "while True:\n    print(line, flush=True)\n    time.sleep(interval)\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.skipif(os.name != "posix", reason="the stand-in tegrastats is a POSIX script")
def test_profile_aligns_samples_and_reports_energy(tmp_path, fake_tegrastats):
    model = mlp_fp32(tmp_path / "m.onnx")
    result = run_cli("jetson", "profile", str(model), "-O", f"tegrastats={fake_tegrastats}", "-O", "interval_ms=20",
                     "-O", "duration_s=0.5", "-O", "warmup_ms=0", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["data"]["models"][0]
    jetson = row["jetson"]
    # The stand-in draws a constant 7.208 W (VDD_IN), so energy = 7.208 W x the measured window.
    assert jetson["mean_power_w"] == pytest.approx(7.208)
    assert jetson["energy_j"] == pytest.approx(7.208 * jetson["window_s"], rel=1e-6)
    assert jetson["energy_per_inference_mj"] == pytest.approx(1000 * jetson["energy_j"] / row["iterations"])
    # Relations that hold however loaded the machine is (no wall-clock threshold: a busy machine once gave a
    # window of 0.4999995 s for duration_s=0.5): the window spans every timed iteration and lies inside the
    # benchmark's own wall time, and a run that caught fewer than 2 samples says so.
    iterations_s = row["latency"]["mean_ms"] * row["iterations"] / 1000
    assert iterations_s * (1 - 1e-9) <= jetson["window_s"] <= row["total_s"]
    assert (jetson["samples_in_run"] < 2) == ("warning" in jetson)
    assert jetson["summary"]["power_source"] == "VDD_IN"
    assert "mJ/inference" in result.stderr
