"""One exit-code contract for every command (docs/index.md#exit-codes): 0 ok, 1 a failed check or gate,
2 bad input or usage, 130 interrupted; plus `run --json` and the one-line interrupt message.

Everything runs the real CLI on a small real ONNX model (Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from trtkit.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A small FP32 model with a dynamic batch, its data, scales and INT8 QDQ model (made by the CLI)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("exit")
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
             for name, shape in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (10, 8, 3, 3)), ("b2", (10,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    paths = {"model": folder / "m.onnx", "data": folder / "x.npy", "labels": folder / "y.npy",
             "scales": folder / "scales.json", "qdq": folder / "m.int8.onnx"}
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths["model"])
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    np.save(paths["data"], x)
    np.save(paths["labels"], rng.integers(0, 10, 32).astype(np.int64))
    done = run_cli("quantize", str(paths["model"]), "--data", str(paths["data"]), "-o", str(paths["qdq"]))
    assert done.returncode == 0, done.stderr
    done = run_cli("calibrate", str(paths["model"]), "--data", str(paths["data"]), "-o", str(paths["scales"]))
    assert done.returncode == 0, done.stderr
    return paths


def cases(p: dict[str, Path], tmp: Path) -> list[tuple[str, int, list[str]]]:
    """(command, expected exit code, argv) for every command: an ok run and a bad-input run each, and the
    failed-check run where the command has checks."""
    model, data, qdq = str(p["model"]), str(p["data"]), str(p["qdq"])
    (tmp / "exists.toml").write_text("# taken\n")
    return [
        ("plugins", EXIT_OK, ["plugins", "--json"]),
        ("plugins", EXIT_USAGE, ["plugins", "--hook", "register_nothing"]),
        ("export", EXIT_USAGE, ["export", str(tmp / "nope.py") + ":f", "-o", str(tmp / "e.onnx"), "-i", "x:1x3x8x8"]),
        ("optimize", EXIT_OK, ["optimize", model, "-o", str(tmp / "o.onnx")]),
        ("optimize", EXIT_USAGE, ["optimize", model, "-o", str(tmp / "o2.onnx"), "--pass", "no-such-pass"]),
        ("calibrate", EXIT_OK, ["calibrate", model, "--data", data, "-o", str(tmp / "s.json")]),
        ("calibrate", EXIT_USAGE, ["calibrate", model, "--data", str(tmp / "missing.npy"), "-o", str(tmp / "s2.json")]),
        ("quantize", EXIT_OK, ["quantize", model, "--scales", str(p["scales"]), "-o", str(tmp / "q.onnx")]),
        ("quantize", EXIT_USAGE, ["quantize", model, "--scales", str(tmp / "missing.json"), "-o", str(tmp / "q2.onnx")]),
        ("build", EXIT_OK, ["build", qdq, "-o", str(tmp / "b.ort.onnx")]),
        ("build", EXIT_USAGE, ["build", qdq, "--builder", "no-such-builder"]),
        ("inspect", EXIT_OK, ["inspect", str(tmp / "b.ort.onnx")]),
        ("inspect", EXIT_USAGE, ["inspect", str(tmp / "missing.engine")]),
        ("eval", EXIT_OK, ["eval", "accuracy", model, qdq, "--data", data]),
        ("eval", EXIT_FAILED, ["eval", "accuracy", model, qdq, "--data", data, "-O", "min_sqnr=200"]),
        ("eval", EXIT_USAGE, ["eval", "accuracy", model, qdq, "--data", data, "-O", "no_such_option=1"]),
        ("init", EXIT_OK, ["init", str(tmp / "new.toml"), "--onnx", model]),
        ("init", EXIT_USAGE, ["init", str(tmp / "exists.toml"), "--onnx", model]),
        ("any", EXIT_USAGE, ["optimize", model, "--no-such-flag"]),
    ]


def test_exit_codes_per_command(small, tmp_path):
    seen: dict[str, set[int]] = {}
    for command, expected, argv in cases(small, tmp_path):
        result = run_cli(*argv)
        assert result.returncode == expected, (argv, result.returncode, result.stderr[-1500:])
        if expected == EXIT_USAGE:
            assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
        if expected == EXIT_FAILED:
            assert result.stderr.strip().splitlines()[-1].startswith("FAILED: "), result.stderr
        seen.setdefault(command, set()).add(expected)
    assert seen["eval"] == {0, 1, 2}


def test_build_check_failure_is_exit_1(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FooBar", ["x"], ["y"], name="my_foo", domain="custom.domain")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("custom.domain", 1)]), model)
    result = run_cli("build", str(model), "-b", "tensorrt-rtx", "--check")
    assert result.returncode == EXIT_FAILED, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("FAILED: ")


def write_recipe(p: dict[str, Path], folder: Path, gate: float) -> Path:
    recipe = folder / "recipe.toml"
    recipe.write_text(
        f'[model]\nonnx = "{p["model"]}"\n\n[calibration]\ndata = "{p["data"]}"\n\n[[builders]]\nname = "onnxruntime"\n\n'
        f'[[evaluators]]\nname = "accuracy"\ndata = "{p["data"]}"\n\n[gates]\nmin_sqnr_db = {gate}\n\n'
        '[report]\nenabled = false\n')
    return recipe


def test_run_exit_codes_and_json(small, tmp_path):
    recipe = write_recipe(small, tmp_path, 200.0)
    failed = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert failed.returncode == EXIT_FAILED, failed.stderr
    summary = json.loads(failed.stdout)  # one JSON document on stdout; logs went to stderr
    assert summary["passed"] is False and summary["output"] == str(tmp_path / "out")
    assert {"optimize", "calibrate", "quantize", "build:onnxruntime:int8"} <= set(summary["steps"])
    assert any(not gate["passed"] for gate in summary["gates"])
    assert failed.stderr.strip().splitlines()[-1].startswith("FAILED: accuracy gate failed")

    recipe = write_recipe(small, tmp_path, 5.0)
    passed = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), "--json")
    assert passed.returncode == EXIT_OK, passed.stderr
    summary = json.loads(passed.stdout)
    assert summary["passed"] is True and summary["steps"]["calibrate"]["cached"] is True  # only gates changed

    planned = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run", "--json")
    assert planned.returncode == EXIT_OK and all(s["cached"] for s in json.loads(planned.stdout)["steps"])

    (tmp_path / "bad.toml").write_text('[model]\nonnx = "m.onnx"\n[calibration]\nmethd = "x"\n')
    bad = run_cli("run", str(tmp_path / "bad.toml"))
    assert bad.returncode == EXIT_USAGE and "methd" in bad.stderr


def test_interrupt_is_exit_130_with_one_line(small, tmp_path):
    """Ctrl-C during `eval speed`: exit 130, one line naming the command and saying earlier artefacts are intact."""
    before = {p: p.read_bytes() for p in small.values()}
    process = subprocess.Popen([sys.executable, "-m", "trtkit.cli", "eval", "speed", str(small["model"]), "-O",
                                "duration_s=60", "-o", str(tmp_path / "speed.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _imported_onnxruntime(process.pid):
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted: trtkit eval stopped") and "earlier artefacts are intact" in lines[-1]
    assert not (tmp_path / "speed.json").exists()
    assert {p: p.read_bytes() for p in small.values()} == before


def _imported_onnxruntime(pid: int) -> bool:
    try:
        return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_interrupted_line_names_the_command():
    from trtkit.cli import interrupted_line

    assert interrupted_line(["--no-plugin", "x", "run", "r.toml"]).startswith("interrupted: trtkit run stopped")
    assert "exit code 130" in interrupted_line([])


def test_exit_code_table_in_the_docs_matches_the_constants():
    text = (ROOT / "docs" / "index.md").read_text()
    table = text[text.index("## Exit codes"):]
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED):
        assert f"\n| {code} |" in table


def test_tables_and_lines_do_not_wrap_at_80_columns_in_a_pipe(small, tmp_path):
    long_name = tmp_path / ("a_model_with_a_rather_long_descriptive_file_name_" * 2 + "int8.onnx")
    long_name.write_bytes(small["qdq"].read_bytes())
    result = run_cli("eval", "accuracy", str(small["model"]), str(long_name), "--data", str(small["data"]),
                     env={"COLUMNS": ""})
    assert result.returncode == EXIT_OK, result.stderr
    title = next(line for line in result.stderr.splitlines() if long_name.name in line)
    assert "vs m.onnx (Q/DQ emulated in float, 32 samples)" in title and len(title.strip()) > 80
    header = next(line for line in result.stderr.splitlines() if "cosine" in line)
    assert "output" in header and "max rel" in header  # one row, not folded


def test_creating_the_output_folder_is_said_in_the_line_naming_the_output(small, tmp_path):
    output = tmp_path / "new" / "sub" / "o.onnx"
    first = run_cli("optimize", str(small["model"]), "-o", str(output))
    assert first.returncode == EXIT_OK, first.stderr
    assert f"wrote {output} (created folder {tmp_path / 'new'})" in first.stderr
    again = run_cli("optimize", str(small["model"]), "-o", str(output.with_name("p.onnx")))
    assert again.returncode == EXIT_OK and "created folder" not in again.stderr
