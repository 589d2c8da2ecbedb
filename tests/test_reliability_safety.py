"""Safety: trtkit never runs code it was not asked to.

A static audit of core/ and plugins/ (no eval/exec, no unpickling, checkpoints with weights_only=True, YAML
with safe_load, no pickles in numpy files, no shell commands), plus recipes proven to be data: Python put in
a recipe's values is treated as a name, never evaluated.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("plugins/**/*.py")])


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "<expr>"
    return None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _findings(source: str, rel: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{rel}:{node.lineno} {name}()"
        if name in ("eval", "exec", "compile", "os.system", "os.popen", "pickle.load", "pickle.loads",
                    "marshal.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
                    "yaml.unsafe_load", "yaml.full_load"):
            found.append(where)
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(where + " without weights_only=True")
        elif name == "yaml.load" and "Safe" not in str(_dotted(next(
                (k.value for k in node.keywords if k.arg == "Loader"), ast.Name(id="none")))):
            found.append(where + " without a SafeLoader")
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
            found.append(where + " with allow_pickle")
        elif name.startswith("subprocess.") and _keyword(node, "shell") not in (None, False):
            found.append(where + " with shell=True")
    return found


def test_no_code_execution_paths_in_trtkit():
    assert len(SOURCES) > 20
    problems = [p for path in SOURCES for p in _findings(path.read_text(), path.relative_to(ROOT).as_posix())]
    assert not problems, "\n".join(problems)


def test_the_safety_audit_catches_unsafe_calls():
    sample = (
        "import pickle, torch, yaml, numpy as np, subprocess\n"
        "eval('1')\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=True)\nyaml.load(t)\n"
        "yaml.load(t, Loader=yaml.SafeLoader)\nyaml.safe_load(t)\nnp.load(p, allow_pickle=True)\nnp.load(p)\n"
        "subprocess.run('ls', shell=True)\nsubprocess.run(['ls'])\nmodel.eval()\n"
    )
    found = [f.split(" ", 1)[1] for f in _findings(sample, "sample.py")]
    assert found == ["eval()", "pickle.load()", "torch.load() without weights_only=True",
                     "yaml.load() without a SafeLoader", "np.load() with allow_pickle", "subprocess.run() with shell=True"]


@pytest.mark.parametrize("key,value,expected", [
    ("method", "__import__('os').system('touch {marker}')", "unknown calibrator"),
    ("data", "{{{{ open('{marker}', 'w') }}}}", "open("),
])
def test_recipe_values_are_data_not_code(tmp_path, digits_onnx, key, value, expected):
    marker = tmp_path / "PWNED"
    np.save(tmp_path / "calib.npy", np.zeros((4, 1, 8, 8), np.float32))
    values = {"method": "minmax", "data": str(tmp_path / "calib.npy")}
    values[key] = value.format(marker=marker)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[model]\nonnx = {json.dumps(str(digits_onnx))}\n\n[calibration]\n"
                      + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    result = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # `run` logs its steps on stderr, the error comes last
    assert "Traceback" not in result.stderr and last.startswith("error: "), result.stderr
    assert expected in last, last  # refused as a name / a path, after the recipe parsed fine
    assert not marker.exists()


def test_recipe_names_are_checked_before_any_work(tmp_path, digits_onnx):
    np.save(tmp_path / "calib.npy", np.zeros((4, 1, 8, 8), np.float32))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[model]\nonnx = {json.dumps(str(digits_onnx))}\n\n[calibration]\n"
                      f"data = {json.dumps(str(tmp_path / 'calib.npy'))}\nmethod = \"entorpy\"\n")
    result = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "entropy" in result.stderr, result.stderr
    assert "[run]" not in result.stderr, result.stderr
