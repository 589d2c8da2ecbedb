"""The HTML report renders in a real browser (headless Chromium): tables and embedded images show."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import run_cli
from eval_helpers import mlp_fp32, mlp_inputs, quantize_max

from trtkit.evaluation import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    fp32 = mlp_fp32(folder / "mlp.onnx")
    x = mlp_inputs(64)
    np.save(folder / "x.npy", x)
    qdq = quantize_max(fp32, folder / "mlp.int8.onnx", {"x": x})
    context = {"passes": [{"name": "fold-constants", "options": {}, "detail": "0 nodes removed"}, "fuse-bn"],
               "notes": ["recorded by the test"]}
    (folder / "context.json").write_text(json.dumps(context))
    result = run_cli("eval", "report", str(fp32), str(qdq), "--data", str(folder / "x.npy"), "-o",
                     str(folder / "out" / "report.html"), "-O", f"context={folder / 'context.json'}",
                     "-O", "duration_s=0.2", "--json")
    assert result.returncode == 0, result.stderr
    return folder / "out" / "report.html", json.loads(result.stdout)["data"]


def test_report_files_and_markdown(report):
    html_path, data = report
    md = html_path.with_suffix(".md").read_text()
    for heading in ("## Accuracy", "## Speed", "## Per-layer error", "## Activation histograms", "## Passes applied",
                    "## Calibration scales", "## Graph: mlp.onnx", "## Notes"):
        assert heading in md, heading
    assert "| act2 |" in md  # the outlier tensor's scale is listed
    assert data["html"] == str(html_path)
    assert {"accuracy", "speed", "layers", "histograms", "calibration", "passes"} <= set(data["sections"])
    # Self-contained: no external references.
    text = html_path.read_text()
    assert not re.search(r'(src|href)="(?!data:)', text)


def test_report_is_deterministic(tmp_path):
    context = {"title": "t", "accuracy": {"reference": "a.onnx", "candidate": "b.onnx", "outputs": {
        "y": {"cosine": 0.99, "sqnr_db": 30.0, "max_abs": 0.1, "mean_abs": 0.01, "max_rel": 1.0, "p99_abs": 0.05}},
        "checks": [{"output": "y", "metric": "sqnr_db", "limit": 40.0, "value": 30.0, "passed": False}]},
        "histograms": {"t": {"edges": [0, 1, 2, 3], "counts": [5, 2, 1], "threshold": 2.5, "method": "entropy"}}}
    first = write_report(tmp_path / "a.html", context)
    second = write_report(tmp_path / "b.html", context)
    assert first[0].read_bytes() == second[0].read_bytes()
    assert first[1].read_text().replace("a.html", "") == second[1].read_text().replace("b.html", "")
    assert "FAIL" in first[0].read_text()


@needs_chromium
def test_report_renders_in_chromium(report, tmp_path):
    html_path, _ = report
    dom = _chromium(tmp_path, "--dump-dom", html_path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    tables = re.findall(r"<table>.*?</table>", dom.stdout, re.S)
    assert len(tables) >= 6
    assert "Q/DQ emulated in float" in dom.stdout and "fold-constants" in dom.stdout
    assert re.search(r"<td[^>]*>act2</td>", dom.stdout)
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', dom.stdout)
    titles = [title for title, _ in images]
    assert any("Per-layer" in t for t in titles) and any("histograms" in t for t in titles)
    assert any("Latency" in t for t in titles)
    # Every embedded image decodes in the browser: a probe page loads each and records its natural size.
    probe = tmp_path / "probe.html"
    tags = "".join(f'<img id="i{i}" src="data:image/png;base64,{b64}">' for i, (_, b64) in enumerate(images))
    probe.write_text(
        f"<html><body>{tags}<pre id='out'></pre><script>window.onload=function(){{"
        "var s='';document.querySelectorAll('img').forEach(function(i){s+=i.id+':'+i.naturalWidth+'x'+"
        "i.naturalHeight+';'});document.getElementById('out').textContent=s;}</script></body></html>")
    probed = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    sizes = re.findall(r"i(\d+):(\d+)x(\d+);", probed.stdout)
    assert len(sizes) == len(images)
    for index, width, height in sizes:
        png = base64.b64decode(images[int(index)][1])
        assert int(width) > 100 and int(height) > 100
        assert (int(width), int(height)) == (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
    # And the page paints: a screenshot is far from blank.
    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", html_path.as_uri())
    assert result.returncode == 0 and shot.is_file()
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3].reshape(-1, 3)
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 50
