"""Recipes: validation, the plan, caching, and the bundled example end to end (a real pipeline run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from trtkit.errors import InputFileError, OptionError
from trtkit.pipeline import plan
from trtkit.plugins.commands.init import starter_recipe
from trtkit.recipe import load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('[model]\nonnx = "m.onnx"\n[calibraton]\n', r"unknown section \[calibraton\] \(did you mean: calibration"),
    ('[model]\nonnx = "m.onnx"\n[calibration]\nmethd = "entropy"\n',
     r"\[calibration\]: unknown key 'methd' \(did you mean: method\?\)"),
    ('[model]\nonnx = "m.onnx"\n[calibration]\nbatch_size = "32"\n',
     r"\[calibration\]: 'batch_size' must be an integer, got str"),
    ('[model]\nonnx = "m.onnx"\n[[passes]]\noptions = {}\n', r"\[passes\] #1: missing key 'name'"),
    ('[model]\nonnx = "m.onnx"\n[passes]\nname = "simplify"\n', r"must be an array of tables"),
    ('[model]\nonnx = "m.onnx"\nsource = "a.py:f"\n', r"exactly one of 'source'"),
    ('[gates]\nmax_accuracy_drop = true\n[model]\nonnx = "m.onnx"\n', r"'max_accuracy_drop' must be a number"),
])
def test_bad_recipes_name_the_section_and_key(tmp_path, text, message):
    with pytest.raises(OptionError, match=message):
        load_recipe(write(tmp_path, text))


def test_unreadable_recipe(tmp_path):
    with pytest.raises(InputFileError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[model\n"))
    with pytest.raises(InputFileError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.toml")


def test_bad_recipe_from_the_cli_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, '[model]\nonnx = "m.onnx"\n[calibration]\nmethd = "entropy"\n')
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown key 'methd'" in result.stderr
    assert not (tmp_path / "trtkit-run").exists()


def test_negative_histogram_positions_are_refused_before_any_work(tmp_path, digits_onnx):
    path = write(tmp_path, f'[model]\nonnx = "{digits_onnx}"\n[calibration]\ndata = "c.npy"\n'
                           'histogram_positions = -1\n')
    result = run_cli("run", str(path), "-o", str(tmp_path / "run"))
    assert result.returncode == 2 and "histogram_positions must be >= 0" in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "run").exists()


def test_starter_recipes_are_valid(tmp_path, digits_onnx):
    import numpy as np

    np.save(tmp_path / "calibration.npy", np.zeros((4, 1, 8, 8), np.float32))  # the starter's data file
    for kwargs in ({"onnx": str(digits_onnx)}, {"source": "trtkit.examples.digits:factory"}):
        recipe = load_recipe(write(tmp_path, starter_recipe(**kwargs)))
        names = [step.name for step in plan(recipe)]
        assert names[1] == "optimize" and "calibrate" in names and "eval:speed" in names
    result = run_cli("init", str(tmp_path / "new.toml"), "--onnx", str(digits_onnx))
    assert result.returncode == 0, result.stderr
    again = run_cli("init", str(tmp_path / "new.toml"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_plan_keys_change_only_downstream_of_an_edit(tmp_path, digits_onnx):
    data = tmp_path / "calib.npy"
    import numpy as np

    np.save(data, np.zeros((4, 1, 8, 8), np.float32))
    base = (f'[model]\nonnx = "{digits_onnx}"\n[calibration]\ndata = "calib.npy"\nmethod = "entropy"\n'
            '[[builders]]\nname = "onnxruntime"\n')
    first = {s.name: s.key for s in plan(load_recipe(write(tmp_path, base)))}
    second = {s.name: s.key for s in plan(load_recipe(write(tmp_path, base.replace("entropy", "minmax"))))}
    unchanged = [name for name in first if first[name] == second[name]]
    assert unchanged == ["model", "optimize", "build:onnxruntime:fp32"]
    np.save(data, np.ones((4, 1, 8, 8), np.float32))  # new calibration data: calibrate onwards again
    third = {s.name: s.key for s in plan(load_recipe(write(tmp_path, base)))}
    assert third["optimize"] == first["optimize"] and third["calibrate"] != first["calibrate"]


def test_bundled_example_end_to_end_with_caching(tmp_path):
    """The README's main job: train, export, optimize, calibrate, quantize, build, evaluate, report."""
    folder = tmp_path / "example"
    result = run_cli("run", "--example", "digits", "-o", str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = folder / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = summary["steps"]
    for name in ("export", "optimize", "calibrate", "quantize", "build:onnxruntime:fp32",
                 "build:onnxruntime:int8", "eval:accuracy", "eval:speed"):
        assert name in steps and not steps[name]["cached"], name
    for artefact in ("model.onnx", "model.int8.onnx", "scales.json", "calibration.cache", "report.html",
                     "report.md"):
        assert (run_dir / artefact).is_file(), artefact
    assert (run_dir / "calibration.cache").read_text().startswith("TRT-")

    # INT8 within 1 point of FP32 on the held-out digits, and the report shows it
    accuracy = json.loads((run_dir / "cache" / "eval-accuracy" / steps["eval:accuracy"]["key"] /
                           "result.json").read_text())
    int8 = next(run for run in accuracy if run["label"] == "onnxruntime:int8")["data"]["task"]
    assert int8["reference_top1"] > 0.9
    assert int8["reference_top1"] - int8["candidate_top1"] <= 0.01
    assert all(gate["passed"] for gate in summary["gates"])
    html = (run_dir / "report.html").read_text()
    assert "<img" in html and f"{int8['candidate_top1']:.4f}"[:5] in html

    # unchanged recipe: nothing is redone
    again = run_cli("run", str(folder / "recipe.toml"), "-o", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "everything cached" in again.stderr
    # another calibration method: calibration onwards only
    recipe = folder / "recipe.toml"
    text = recipe.read_text()
    assert 'method = "percentile"' in text
    recipe.write_text(text.replace('method = "percentile"', 'method = "entropy"'))
    third = run_cli("run", str(recipe), "-o", str(run_dir))
    assert third.returncode == 0, third.stderr[-2000:]
    steps = json.loads((run_dir / "summary.json").read_text())["steps"]
    rerun = sorted(name for name, step in steps.items() if not step["cached"])
    assert "export" not in rerun and "optimize" not in rerun and "build:onnxruntime:fp32" not in rerun
    assert {"calibrate", "quantize", "build:onnxruntime:int8"} <= set(rerun)


def test_external_data_models_are_published_with_their_weights(tmp_path):
    """A model stored with external data: every published model still finds its weights and runs."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from trtkit.model import ModelArtifact
    from trtkit.runners import open_runner

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])], [weight, bias])
    source = ModelArtifact.from_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    source.save(tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    np.save(tmp_path / "calib.npy", rng.uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32))
    recipe = write(tmp_path, '[model]\nonnx = "ext.onnx"\n[calibration]\ndata = "calib.npy"\nmethod = "minmax"\n'
                             '[report]\nenabled = false\n')
    result = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    feeds = {"x": np.load(tmp_path / "calib.npy")[:2]}
    for name in ("model.onnx", "model.int8.onnx"):
        published = tmp_path / "out" / name
        outputs = open_runner(published).run(feeds)
        assert outputs["y"].shape == (2, 16, 8, 8)
        if ModelArtifact.load(published).has_external_data():
            assert (tmp_path / "out" / f"{name}.data").is_file()


def test_init_refuses_a_missing_model(tmp_path):
    result = run_cli("init", str(tmp_path / "r.toml"), "--onnx", str(tmp_path / "missing.onnx"))
    assert result.returncode == 2 and "missing.onnx: no such file" in result.stderr
    assert not (tmp_path / "r.toml").exists()
