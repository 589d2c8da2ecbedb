"""The third-party pruning criterion plugins_contrib/trtkit-prune-fpgm, installed with pip into a fresh
virtual environment next to the trtkit wheel, found through its entry point and used by `trtkit prune`."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from test_packaging import clean_env, fresh_venv, pip_install, wheel  # noqa: E402,F401  (fixtures)

FPGM = Path(__file__).resolve().parent.parent / "plugins_contrib" / "trtkit-prune-fpgm"


def test_pip_installed_criterion_prunes_through_the_cli(fresh_venv, wheel, tmp_path):  # noqa: F811
    python, trtkit = fresh_venv / "bin" / "python", fresh_venv / "bin" / "trtkit"
    pip_install(python, wheel)
    pip_install(python, FPGM)
    listed = subprocess.run([trtkit, "plugins", "--json", "--hook", "register_pruning_criteria"],
                            capture_output=True, text=True, cwd=fresh_venv, env=clean_env())
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["prune-fpgm"]["source"] == "third-party"
    assert plugins["prune-fpgm"]["registers"] == {"pruning_criteria": ["fpgm"]}
    assert plugins["pruning"]["registers"] == {"pruning_criteria": ["bn-scale", "l1", "l2", "taylor"]}

    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def net():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(16, 4)).eval()
    """))
    out = tmp_path / "small.onnx"
    pruned = subprocess.run([trtkit, "prune", f"{model}:net", "-i", "1x3x8x8", "-o", out, "--criterion", "fpgm",
                             "--ratio", "0.5", "-O", "p=1.0", "--json"], capture_output=True, text=True,
                            cwd=fresh_venv, env=clean_env())
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert report["criterion"] == "fpgm" and report["narrowed"]["0"] == {"before": 16, "after": 8}
    assert out.is_file()


def test_the_criterion_scores_the_median_filter_lowest():
    import sys

    import torch

    sys.path.insert(0, str(FPGM))
    try:
        from trtkit_prune_fpgm import fpgm
    finally:
        sys.path.remove(str(FPGM))
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    assert int(fpgm(weight, "conv").argmin()) == 0  # the filter at the centre is the most replaceable
