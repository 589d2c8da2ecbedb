"""A third-party calibrator that needs exact histograms works exactly like the built-in `entropy`: the collection
reads what a calibrator declares (`Calibrator.statistics`), never its name.

The plugin is a real distribution installed by pip (`pip install --target`, no network) and found by entry-point
discovery in a `trtkit` subprocess. It registers the same KL rule under three declarations:
  kl-exact    statistics="exact-histogram"  (what `entropy` declares)
  kl-sampled  statistics="histogram"        (what `percentile` and `mse` declare)
  max-range   statistics="range"            (what `minmax` declares; min/max only)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import run_cli  # noqa: E402
from qdq_models import _Net, random_batch  # noqa: E402

PLUGIN = """
    from trtkit import hookimpl
    from trtkit.stages import Calibrator, Option


    def kl_amax(stats, bins=2048):
        # the numerics are any function of TensorStats; this one reuses TensorRT's KL rule as entropy does
        from trtkit.plugins.calibrators.entropy import amax_entropy

        return amax_entropy(stats, bins=bins)


    def range_amax(stats):
        assert int(stats.hist.sum()) == 0, "a statistics='range' calibrator gets no histogram"
        return stats.absmax


    @hookimpl
    def register_calibrators(register):
        options = {"bins": Option("int", 2048, "histogram bins over [0, max |x|]")}
        register(Calibrator(name="kl-exact", description="KL threshold on every value", options=options,
                            compute_amax=kl_amax, statistics="exact-histogram"))
        register(Calibrator(name="kl-sampled", description="KL threshold on sampled positions", options=options,
                            compute_amax=kl_amax, statistics="histogram"))
        register(Calibrator(name="max-range", description="largest |x| from min/max only",
                            compute_amax=range_amax, statistics="range"))
"""

BAD_PLUGIN = """
    from trtkit import hookimpl
    from trtkit.stages import Calibrator


    @hookimpl
    def register_calibrators(register):
        register(Calibrator(name="bad-stats", description="declares statistics nobody collects",
                            compute_amax=lambda stats: 1.0, statistics="quantiles"))
"""

PYPROJECT = """
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{dist}"
    version = "0.1.0"

    [project.entry-points.trtkit]
    {module} = "{module}"

    [tool.setuptools]
    py-modules = ["{module}"]
"""


def pip_install(project: Path, site: Path, dist: str, module: str, source: str) -> None:
    """Write a one-module project and install it with pip into `site` (offline: setuptools of this venv)."""
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT.format(dist=dist, module=module)))
    (project / f"{module}.py").write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(project)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plugin")
    pip_install(root / "kl", root / "site", "trtkit-kl-calibrator", "trtkit_kl_calibrator", PLUGIN)
    assert (root / "site" / "trtkit_kl_calibrator-0.1.0.dist-info" / "entry_points.txt").is_file()
    return {"PYTHONPATH": os.pathsep.join([str(root / "site"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """x -> conv -> relu -> conv at 32x32: the relu output has 16384 positions per sample (> the 4096 sampled)."""
    net = _Net(0)
    proto = net.model([net.conv(net.node("Relu", [net.conv("x", 3, 16, "c1")], "r1"), 16, 8, "c2")], 3, hw=32)
    folder = tmp_path_factory.mktemp("model")
    onnx.save(proto, folder / "m.onnx")
    np.save(folder / "d.npy", random_batch(proto, 24))
    return folder / "m.onnx", folder / "d.npy"


def calibrate_json(model: tuple[Path, Path], method: str, env: dict[str, str], out: Path, *extra: str) -> dict:
    done = run_cli("calibrate", str(model[0]), "-d", str(model[1]), "-m", method, "-o", str(out), *extra, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def amax(scales: dict) -> dict[str, float]:
    return {name: entry["amax"] for name, entry in scales["tensors"].items()}


def test_exact_histogram_plugin_matches_builtin_entropy(env, model, tmp_path):
    ours = calibrate_json(model, "kl-exact", env, tmp_path / "ours.json")
    builtin = calibrate_json(model, "entropy", env, tmp_path / "entropy.json")
    assert ours["method"] == "kl-exact" and builtin["method"] == "entropy"
    # every value histogrammed for both, because both declare statistics="exact-histogram"
    assert ours["data"]["histogram_positions_per_sample"] is None
    assert builtin["data"]["histogram_positions_per_sample"] is None
    assert ours["data"] == builtin["data"] and ours["model"] == builtin["model"]
    assert amax(ours) == amax(builtin)  # same statistics, same rule: the same floats
    for name, entry in ours["tensors"].items():
        assert entry["clipped"] == builtin["tensors"][name]["clipped"]
        assert entry["source"] == "kl-exact"
    # the knob still overrides the declared default, as it does for entropy
    explicit = calibrate_json(model, "kl-exact", env, tmp_path / "explicit.json", "--histogram-positions", "512")
    assert explicit["data"]["histogram_positions_per_sample"] == 512


def test_the_declaration_decides_what_is_collected_not_the_name(env, model, tmp_path):
    exact = calibrate_json(model, "kl-exact", env, tmp_path / "exact.json")
    sampled = calibrate_json(model, "kl-sampled", env, tmp_path / "sampled.json")
    percentile = calibrate_json(model, "percentile", env, tmp_path / "percentile.json")
    assert sampled["data"]["histogram_positions_per_sample"] == 4096
    assert sampled["data"] == percentile["data"]  # sampled exactly like the built-in histogram calibrators
    assert set(amax(sampled)) == set(amax(exact))
    assert amax(sampled) != amax(exact)  # the relu output was sampled, so its KL threshold moved
    assert all(value > 0 for value in amax(sampled).values())


def test_range_plugin_gets_min_max_only_like_builtin_minmax(env, model, tmp_path):
    ours = calibrate_json(model, "max-range", env, tmp_path / "range.json")  # range_amax asserts an empty hist
    builtin = calibrate_json(model, "minmax", env, tmp_path / "minmax.json")
    assert amax(ours) == amax(builtin)
    assert all("clipped" not in entry for entry in ours["tensors"].values())  # no histogram, no clipped fraction
    assert all("clipped" not in entry for entry in builtin["tensors"].values())


def test_plugin_listed_and_unknown_statistics_refused(env, tmp_path):
    listed = run_cli("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    plugin = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}["trtkit_kl_calibrator"]
    assert plugin["source"] == "third-party"
    assert plugin["registers"] == {"calibrators": ["kl-exact", "kl-sampled", "max-range"]}

    pip_install(tmp_path / "bad", tmp_path / "site", "trtkit-bad-stats", "trtkit_bad_stats", BAD_PLUGIN)
    both = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])}
    done = run_cli("plugins", "--json", env=both)
    assert done.returncode == 0, done.stderr
    names = {p["name"] for p in json.loads(done.stdout)["plugins"]}
    assert "trtkit_kl_calibrator" in names and "trtkit_bad_stats" not in names  # skipped whole, the rest work
    assert "plugin 'trtkit_bad_stats' skipped" in done.stderr and "statistics must be one of" in done.stderr
