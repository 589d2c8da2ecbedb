"""Packaging, for real: build the wheel, install it and the contrib plugin with pip into a fresh venv.

The fresh venv gets trtkit's dependencies from this interpreter's site-packages through a .pth file (so
the test needs no network), but trtkit itself and the contrib plugins are installed into it by pip. It is
hermetic: the .pth names a folder of links to this interpreter's packages *without* trtkit and without any
distribution that registers trtkit plugins (an editable trtkit-onnxslim from scripts/setup.sh, a plugin the
user installed by following the README), so what the fresh venv discovers is only what the test installs.
"""

from __future__ import annotations

import json
import os
import re
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


def registers_trtkit_plugins(dist_info: Path) -> bool:
    """A distribution that is trtkit or adds to its `trtkit` entry-point group."""
    entry_points = dist_info / "entry_points.txt"
    return dist_info.name.lower().startswith("trtkit-") or (
        entry_points.is_file() and "[trtkit]" in entry_points.read_text().replace(" ", ""))


def dependency_links(outer: Path, folder: Path) -> Path:
    """A folder of symlinks to `outer`'s packages, leaving out trtkit, trtkit plugin distributions and .pth
    files (editable installs): trtkit's dependencies, and nothing that registers a trtkit plugin."""
    folder.mkdir()
    for entry in outer.iterdir():
        name = entry.name.lower()
        if name.endswith(".pth") or name.startswith(("__editable__", "trtkit")):
            continue
        if name.endswith((".dist-info", ".egg-info")) and registers_trtkit_plugins(entry):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = dependency_links(Path(sysconfig.get_paths()["purelib"]), folder / "outer-deps")
    Path(site, "outer-deps.pth").write_text(f"{deps}\n")
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


def clean_env() -> dict[str, str]:
    """The environment without what would make plugin discovery depend on the user's settings."""
    drop = ("PYTHONPATH", "TRTKIT_LOAD_PLUGINS", "TRTKIT_DISABLE_PLUGIN_AUTOLOAD", "TRTKIT_BLOCK_PLUGINS")
    return {key: value for key, value in os.environ.items() if key not in drop}


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
    before = subprocess.run([trtkit, "plugins", "--json"], capture_output=True, text=True, cwd=fresh_venv,
                            env=clean_env())
    assert before.returncode == 0, before.stderr
    listed = json.loads(before.stdout)
    assert "onnxslim" not in {p["name"] for p in listed["plugins"]}
    assert not listed["problems"]  # nothing of the outer environment leaks in (e.g. a broken editable plugin)

    pip_install(python, ROOT / "plugins_contrib" / "trtkit-onnxslim")
    after = subprocess.run([trtkit, "plugins", "--json"], capture_output=True, text=True, cwd=fresh_venv,
                           env=clean_env())
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
    used = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=fresh_venv, env=clean_env())
    assert used.returncode == 0, used.stderr[-2000:]
    before_nodes, after_nodes, diff = used.stdout.split()
    assert int(after_nodes) < int(before_nodes)  # the Identity is gone
    assert float(diff) <= 1e-5


STRIP_NOOPS = ROOT / "plugins_contrib" / "trtkit-strip-noops"


def test_graph_pass_example_in_the_docs_is_the_contrib_plugin():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name, language in (("pyproject.toml", "toml"), ("trtkit_strip_noops.py", "python")):
        start = doc.index(f"`trtkit-strip-noops/{name}`")
        block = re.compile(rf"```{language}\n(.*?)```", re.S).search(doc, start)
        assert block is not None and block.group(1) == (STRIP_NOOPS / name).read_text(), name


def test_pip_install_graph_pass_example_and_optimize_with_it(fresh_venv, wheel, tmp_path):
    python = fresh_venv / "bin" / "python"
    trtkit = fresh_venv / "bin" / "trtkit"
    pip_install(python, wheel)
    pip_install(python, STRIP_NOOPS)
    listed = subprocess.run([trtkit, "plugins", "--json", "--hook", "register_passes"], capture_output=True,
                            text=True, cwd=fresh_venv, env=clean_env())
    assert listed.returncode == 0, listed.stderr
    plugin = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}["strip-noops"]
    assert plugin["distribution"] == "trtkit-strip-noops" and plugin["source"] == "third-party"
    assert plugin["registers"] == {"passes": ["strip-noops"]}

    # a model with an Identity inside and a Dropout on the output: both go, outputs and names unchanged
    make = """
import sys, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Conv", ["i", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Dropout", ["r"], ["y"])]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
"""
    model, slim = tmp_path / "m.onnx", tmp_path / "m.strip.onnx"
    subprocess.run([python, "-c", make, model], check=True, env=clean_env())
    optimized = subprocess.run([trtkit, "optimize", model, "-o", slim, "--pass", "strip-noops"],
                               capture_output=True, text=True, cwd=fresh_venv, env=clean_env())
    assert optimized.returncode == 0, optimized.stderr
    count = "import onnx, sys; m = onnx.load(sys.argv[1]); print(*[n.op_type for n in m.graph.node], m.graph.output[0].name)"
    ops = subprocess.run([python, "-c", count, slim], capture_output=True, text=True, env=clean_env()).stdout.split()
    assert ops == ["Conv", "Relu", "y"], ops
