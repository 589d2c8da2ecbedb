"""The run's report opens with a verdict and shows what was recorded: gates pass/fail, precision per artefact,
headline metric and speed-up first; the calibration sample count filled; every build listed (a skipped one with
its reason); the method label from the recorded scales; the latency plot on a log axis. Checked in the
Markdown, and in headless Chromium where it is installed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_report import _chromium, needs_chromium


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("verdict")
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
             for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (10, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "m.onnx")
    np.save(folder / "x.npy", rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    (folder / "recipe.toml").write_text(
        '[model]\nonnx = "m.onnx"\n\n[calibration]\ndata = "x.npy"\nmethod = "minmax"\n\n'
        '[[builders]]\nname = "onnxruntime"\n\n'
        '[[builders]]\nname = "tensorrt-rtx"\noptional = true\nprecisions = ["int8"]\n\n'
        '[[evaluators]]\nname = "accuracy"\ndata = "x.npy"\n\n[[evaluators]]\nname = "speed"\n'
        'options = { duration_s = 0.2 }\n\n[gates]\nmin_sqnr_db = 10.0\n')
    result = run_cli("run", str(folder / "recipe.toml"), "-o", str(folder / "out"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


def sections(markdown: str) -> list[str]:
    return re.findall(r"^## (.+)$", markdown, re.M)


def test_report_opens_with_the_verdict(run):
    markdown = (run / "report.md").read_text()
    assert sections(markdown)[:2] == ["Verdict", "Artefacts"]
    verdict = markdown.split("## Verdict", 1)[1].split("##", 1)[0]
    # no labels: the headline is INT8's top-1 agreement with FP32
    assert "PASS: all 2 gate(s) met. onnxruntime:int8: top-1 agreement with FP32 " in verdict
    assert re.search(r"speed-up [\d.]+x over FP32", verdict), verdict
    artefacts = markdown.split("## Artefacts", 1)[1].split("\n## ", 1)[0]
    assert "| onnxruntime:fp32 | FP32 |" in artefacts and "| onnxruntime:int8 | INT8 |" in artefacts
    assert re.search(r"\| onnxruntime:int8 \| INT8 \| top-1 agreement with FP32 [\d.]+ \| [\d.]+x \|", artefacts)


def test_calibration_samples_and_method_come_from_the_recorded_settings(run):
    markdown = (run / "report.md").read_text()
    calibration = markdown.split("## Calibration\n", 1)[1].split("\n## ", 1)[0]
    assert "| method | minmax |" in calibration
    assert "| samples | 40 |" in calibration
    assert "entropy" not in markdown and "percentile" not in markdown


def test_every_build_is_listed(run):
    summary = json.loads((run / "summary.json").read_text())
    models = (run / "report.md").read_text().split("## Models", 1)[1].split("\n## ", 1)[0]
    builds = [name for name in summary["steps"] if name.startswith("build:")]
    assert len(builds) == 3  # onnxruntime FP32 and INT8, and the TensorRT-RTX engine (built, or skipped here)
    for name in builds:
        _, builder, precision = name.split(":")
        assert f"| {builder} {precision.upper()} |" in models, (name, models)
        published = summary["artefacts"].get(name)
        if published:
            assert Path(published).name in models


def test_latency_plot_uses_a_log_axis(run):
    assert "## Latency (median bars, p90-p99 whiskers; log scale)" in (run / "report.md").read_text()


@needs_chromium
def test_verdict_is_the_first_thing_in_the_browser(run, tmp_path):
    dom = _chromium(tmp_path, "--dump-dom", (run / "report.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    headings = re.findall(r"<h2>(.*?)</h2>", dom.stdout)
    assert headings[:2] == ["Verdict", "Artefacts"]
    assert "PASS: all 2 gate(s) met" in dom.stdout
