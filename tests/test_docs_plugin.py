"""The calibrator plugin in docs/plugins.md, installed with pip exactly as written, and used from the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def code_block(doc: str, language: str, after: str) -> str:
    start = doc.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(doc, start)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def test_documented_calibrator_plugin_installs_and_calibrates(tmp_path, digits_onnx, digits_data):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    project = tmp_path / "trtkit-sigma"
    project.mkdir()
    (project / "pyproject.toml").write_text(code_block(doc, "toml", "`trtkit-sigma/pyproject.toml`"))
    (project / "trtkit_sigma.py").write_text(code_block(doc, "python", "`trtkit-sigma/trtkit_sigma.py`"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", site, project], check=True, capture_output=True)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    listing = json.loads(run_cli("plugins", "--json", "--hook", "register_calibrators", env=env).stdout)
    sigma = {p["name"]: p for p in listing["plugins"]}["sigma"]
    assert sigma["registers"] == {"calibrators": ["sigma"]} and sigma["distribution"] == "trtkit-sigma"

    x_train = digits_data[0]
    data = tmp_path / "calib.npy"
    np.save(data, x_train[:64])
    outputs = {}
    for method, extra in (("sigma", ["-O", "k=3"]), ("minmax", [])):
        out = tmp_path / f"{method}.json"
        result = run_cli("calibrate", str(digits_onnx), "--data", str(data), "--method", method, *extra,
                         "-o", str(out), env=env)
        assert result.returncode == 0, result.stderr
        outputs[method] = json.loads(out.read_text())
    sigma_tensors = outputs["sigma"]["tensors"]
    minmax_tensors = outputs["minmax"]["tensors"]
    assert outputs["sigma"]["method"] == "sigma"
    assert sigma_tensors.keys() == minmax_tensors.keys()
    # mean + 3 std clips below the observed maximum on at least some activations, never above it
    below = [name for name in sigma_tensors if sigma_tensors[name]["amax"] < minmax_tensors[name]["amax"] * 0.999]
    assert below
    assert all(sigma_tensors[n]["amax"] <= minmax_tensors[n]["amax"] * (1 + 1e-6) for n in sigma_tensors)
