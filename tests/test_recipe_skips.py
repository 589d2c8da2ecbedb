"""A recipe run goes on past what does not apply: an evaluator that does not apply to an artefact (layers on
the FP32 build) is skipped for that artefact with one line; a skipped step (optional builder not usable here)
is not cached, so it runs once its builder becomes usable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from plugin_dists import make_distribution

# A builder that is usable only once the file named by TRTKIT_TEST_LATE_READY exists ("installed later").
LATE_BUILDER = """
    import os
    from pathlib import Path
    from trtkit import hookimpl
    from trtkit.stages import Builder

    def available():
        ready = os.environ.get("TRTKIT_TEST_LATE_READY", "")
        return None if ready and Path(ready).exists() else "late-builder is not installed"

    def build(model, output):
        Path(output).write_bytes(Path(model).read_bytes())
        return Path(output)

    @hookimpl
    def register_builders(register):
        register(Builder(name="late", description="usable once installed", build=build, available=available,
                         suffix=".late.onnx"))
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("skips")
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
             for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (6, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "m.onnx")
    np.save(folder / "x.npy", rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    return folder / "m.onnx", folder / "x.npy"


def recipe_text(model: Path, data: Path, builders: str, evaluators: str) -> str:
    return (f'[model]\nonnx = "{model}"\n\n[calibration]\ndata = "{data}"\n\n{builders}\n{evaluators}\n'
            '[report]\nenabled = false\n')


def test_layers_evaluator_skips_the_fp32_build_and_the_run_goes_on(small, tmp_path):
    model, data = small
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text(model, data, '[[builders]]\nname = "onnxruntime"\n',
                                  f'[[evaluators]]\nname = "layers"\ndata = "{data}"\n'))
    result = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    skip_lines = [line for line in result.stderr.splitlines() if "layers skipped for" in line]
    assert len(skip_lines) == 1 and "onnxruntime:fp32" in skip_lines[0] and "no quantized layer" in skip_lines[0]
    folder = tmp_path / "out" / "cache" / "eval-layers"
    runs = json.loads(next(folder.glob("*/result.json")).read_text())
    by_label = {run["label"]: run for run in runs}
    assert "no quantized layer" in by_label["onnxruntime:fp32"]["skipped"]
    assert by_label["onnxruntime:int8"]["data"]["layers"]  # the INT8 build was evaluated


def test_a_skipped_build_is_not_cached_and_runs_once_the_builder_is_usable(small, tmp_path):
    model, data = small
    site = make_distribution(tmp_path / "site", "late-builder", {"late_builder": LATE_BUILDER})
    ready = tmp_path / "installed"
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "TRTKIT_TEST_LATE_READY": str(ready)}
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text(model, data, '[[builders]]\nname = "late"\noptional = true\nprecisions = ["int8"]\n',
                                  ""))
    out = tmp_path / "out"
    first = run_cli("run", str(recipe), "-o", str(out), "--json", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    step = json.loads(first.stdout)["steps"]["build:late:int8"]
    assert step["outputs"] == {"skipped": "late-builder is not installed"}
    assert "not cached" in first.stderr

    ready.touch()  # the builder gets installed
    planned = run_cli("run", str(recipe), "-o", str(out), "--dry-run", "--json", env=env)
    assert {s["name"]: s["cached"] for s in json.loads(planned.stdout)["steps"]}["build:late:int8"] is False
    second = run_cli("run", str(recipe), "-o", str(out), "--json", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout)
    assert summary["steps"]["calibrate"]["cached"] is True  # everything else reused
    assert summary["steps"]["build:late:int8"]["outputs"]["model"] == "model.int8.onnx"
    assert (out / "builds" / "late" / "model.int8.onnx").is_file()


def test_dynamic_batch_built_without_shapes_warns_once_with_the_flag(small, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    model, _ = small
    bare = run_cli("build", str(model), "-b", "tensorrt-rtx", "-o", str(tmp_path / "a.engine"))
    assert bare.returncode == 0, bare.stderr[-2000:]
    warnings = [line for line in bare.stderr.splitlines() if "dynamic batch" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: input 'x'") and "-O max_batch=N" in warnings[0]
    sized = run_cli("build", str(model), "-b", "tensorrt-rtx", "-o", str(tmp_path / "b.engine"), "-O", "max_batch=4")
    assert sized.returncode == 0 and "dynamic batch" not in sized.stderr, sized.stderr[-2000:]


def test_eval_speed_reports_the_artefacts_that_run_and_marks_the_one_that_cannot(small, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    model, _ = small
    node = helper.make_node("FooBar", ["x"], ["y"], domain="custom.domain")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    broken = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("custom.domain", 1)]), broken)
    result = run_cli("eval", "speed", str(model), str(broken), str(model), "-O", "duration_s=0.2", "--json")
    assert result.returncode == 1, result.stderr[-2000:]  # something failed: the exit code says so
    data = json.loads(result.stdout)["data"]
    assert [Path(m["model"]).name for m in data["models"]] == ["m.onnx", "m.onnx"]  # the others are measured
    assert [Path(f["model"]).name for f in data["failed"]] == ["custom.onnx"]
    assert "onnxruntime cannot load it" in data["failed"][0]["error"]
    assert any(line.startswith("FAILED custom.onnx: ") for line in result.stderr.splitlines())
    assert "latency (ms)" in result.stderr  # the table of the ones that ran is still shown


def test_int8_on_onnxruntime_cpu_says_why_it_is_slow(small, tmp_path):
    """A TensorRT-placed QDQ model (no Q after each Conv) is left as DQ -> float Conv by onnxruntime's CPU EP:
    the speed table says so in one line, with the counts read from onnxruntime's optimized graph."""
    model, data = small
    qdq = tmp_path / "m.int8.onnx"
    made = run_cli("quantize", str(model), "--data", str(data), "-o", str(qdq))
    assert made.returncode == 0, made.stderr[-2000:]
    result = run_cli("eval", "speed", str(model), str(qdq), "-O", "duration_s=0.2", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)["data"]["models"]
    assert "cpu_int8" not in rows[0] and rows[1]["mode"] == "onnxruntime int8 kernels"
    layers = rows[1]["cpu_int8"]
    assert layers["float"] + layers["int8"] == 2 and layers["float"] >= 1
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: CPU speed of a TensorRT-placed")]
    assert len(notes) == 1 and f"{layers['float']} of 2 Conv/MatMul layers of m.int8.onnx run in float" in notes[0]
