"""Packaging, for real: build the wheel, install it and the contrib plugin with pip into a fresh venv.

The fresh venv gets trtkit's dependencies from this interpreter's site-packages through a .pth file (so
the test needs no network), but trtkit itself and trtkit-onnxslim are installed into it by pip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def expected_modules() -> set[str]:
    modules = set()
    for folder, package in (("core", "trtkit"), ("plugins", "trtkit.plugins")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.add(".".join((package, *parts)))
    return modules


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ensurepip may bring an old setuptools that shadows the current one pip builds with
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], capture_output=True)
    return folder


MODULES = expected_modules()  # listed before the build, so both see the same tree


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
                    ROOT], check=True, capture_output=True)
    return next(out.glob("trtkit-*.whl"))


def pip_install(python: Path, *args: str | Path) -> None:
    result = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--no-index", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_wheel_contains_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name[:-3].replace("/", ".").removesuffix(".__init__") for name in names if name.endswith(".py")}
    missing = MODULES - shipped
    assert not missing, f"wheel lacks {sorted(missing)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[trtkit]" in text and "passes = trtkit.plugins.passes" in text


def test_installed_wheel_imports_every_module(fresh_venv, wheel):
    python = fresh_venv / "bin" / "python"
    pip_install(python, wheel)
    code = (
        "import importlib, json, sys\n"
        "import trtkit\n"
        f"mods = {sorted(MODULES)!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps({'file': trtkit.__file__, 'count': len(mods)}))\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=fresh_venv)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["file"].startswith(str(fresh_venv)), report  # the installed wheel, not the source tree


def test_pip_install_contrib_plugin_makes_it_appear(fresh_venv, wheel):
    python = fresh_venv / "bin" / "python"
    trtkit = fresh_venv / "bin" / "trtkit"
    pip_install(python, wheel)
    before = subprocess.run([trtkit, "plugins", "--json"], capture_output=True, text=True, cwd=fresh_venv)
    assert before.returncode == 0, before.stderr
    assert "onnxslim" not in {p["name"] for p in json.loads(before.stdout)["plugins"]}

    pip_install(python, ROOT / "plugins_contrib" / "trtkit-onnxslim")
    after = subprocess.run([trtkit, "plugins", "--json"], capture_output=True, text=True, cwd=fresh_venv)
    assert after.returncode == 0, after.stderr
    plugin = {p["name"]: p for p in json.loads(after.stdout)["plugins"]}["onnxslim"]
    assert plugin["distribution"] == "trtkit-onnxslim"
    assert plugin["source"] == "third-party"
    assert plugin["registers"] == {"passes": ["onnxslim"]}

    # usable by name, with no change to the core: run the pass and check outputs are unchanged
    code = """
import numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
from trtkit.registry import get_registry
from trtkit.model import ModelArtifact
from trtkit.runtime import session, random_inputs, run
rng = np.random.default_rng(0)
w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["c"], ["i"]),
         helper.make_node("Relu", ["i"], ["r"]),
         helper.make_node("Reshape", ["r", "shape"], ["y"])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
original = ModelArtifact.from_model(model)
slim = get_registry().graph_pass("onnxslim")
result = slim.apply(original, **slim.resolve_options({}))
feeds = random_inputs(model)
a = run(session(original), feeds)["y"]; b = run(session(result), feeds)["y"]
print(len(model.graph.node), len(result.model.graph.node), float(np.abs(a - b).max()))
"""
    used = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=fresh_venv)
    assert used.returncode == 0, used.stderr[-2000:]
    before_nodes, after_nodes, diff = used.stdout.split()
    assert int(after_nodes) < int(before_nodes)  # the Identity is gone
    assert float(diff) <= 1e-5
