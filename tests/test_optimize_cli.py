"""`trtkit optimize` on the command line: the summary, JSON, and the bad-input matrix of this stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import run_cli  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtkit.model import ModelArtifact  # noqa: E402


@pytest.fixture(scope="module")
def head_model(tmp_path_factory) -> Path:
    """Conv -> BN -> per-channel Mul -> boxes / sigmoid scores -> Concat -> output (a detector head in miniature)."""
    rng = np.random.default_rng(0)

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [
        const("w", rng.normal(0, 0.3, (6, 3, 1, 1))), const("g", rng.uniform(0.5, 1.5, 6)),
        const("b", rng.normal(0, 0.2, 6)), const("m", rng.normal(0, 0.5, 6)), const("v", rng.uniform(0.5, 2, 6)),
        const("k", rng.uniform(0.5, 2, (6, 1, 1))), const("scale", np.float32(640.0)),
        numpy_helper.from_array(np.array([0, 2, 4], np.int64), "split"),
        numpy_helper.from_array(np.array([1, 6, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Mul", ["n", "k"], ["h"]),
        helper.make_node("Slice", ["h", "s0", "s4", "ax"], ["box_raw"]),
        helper.make_node("Slice", ["h", "s4", "s6", "ax"], ["score_raw"]),
        helper.make_node("Sigmoid", ["box_raw"], ["box_sig"]),
        helper.make_node("Mul", ["box_sig", "scale"], ["boxes"]),
        helper.make_node("Sigmoid", ["score_raw"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["cat"], axis=1),
        helper.make_node("Reshape", ["cat", "flat"], ["y"]),
    ]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s0", 0), ("s4", 4), ("s6", 6),
                                                                                 ("ax", 1))]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("cli") / "head.onnx"
    onnx.save(model, str(path))
    return path


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_optimize_cli_table_and_json(head_model, tmp_path):
    before = sha(head_model)
    out = tmp_path / "head.opt.onnx"
    result = run_cli("optimize", str(head_model), "-o", str(out), "-p", "simplify", "-p", "optimize", "-p",
                     "remove-sigmoid", "--threshold", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["passes"]] == ["simplify", "optimize", "remove-sigmoid"]
    assert data["passes"][1]["nodes_before"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in data["passes"][1]["nodes_after"]
    assert data["passes"][1]["nodes_after"]["Mul"] == 1  # the per-channel Mul folded too; the box scale stays
    assert data["thresholds"]["y"]["logit"] == pytest.approx(np.log(0.3 / 0.7))
    assert sha(head_model) == before
    ops = [n.op_type for n in ModelArtifact.load(out).model.graph.node]
    assert ops.count("Sigmoid") == 1

    table = run_cli("optimize", str(head_model), "-o", str(tmp_path / "t.onnx"), "-p", "remove-sigmoid",
                    "--threshold", "0.3")
    assert table.returncode == 0, table.stderr
    assert "total nodes" in table.stderr and "max |diff|" in table.stderr
    assert "logit -0.847298" in table.stdout


def test_optimize_cli_lists_passes():
    result = run_cli("optimize", "x.onnx", "-o", "y.onnx", "--list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    names = {p["name"] for p in data["passes"]}
    assert {"simplify", "optimize", "fuse-preprocess", "remove-sigmoid"} <= names
    assert data["default"] == ["simplify", "optimize"]


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "random"])
def test_bad_model_files_exit_2_without_output(case, head_model, tmp_path):
    path = tmp_path / f"{case}.onnx"
    if case == "truncated":
        data = head_model.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "text":
        path.write_text("name,label\nimg001.png,3\n")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out = tmp_path / "out.onnx"
    result = run_cli("optimize", str(path), "-o", str(out))
    assert_user_error(result, path.name)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")], "temp files left behind"


def test_bad_names_and_contradictory_options(head_model, tmp_path):
    out = tmp_path / "out.onnx"
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "-p", "simplfy"),
                      "unknown pass 'simplfy'", "did you mean: simplify")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "-p", "remove-sigmoid", "-O",
                              "treshold=0.3"), "treshold", "did you mean: threshold")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "--threshold", "0.3"),
                      "--threshold needs --pass remove-sigmoid")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "--no-check", "--rtol", "0.1"),
                      "--no-check contradicts")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "--range", "image=0,1"),
                      "input (in range) 'image'")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "--range", "x=1,0"), "LOW <= HIGH")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(out), "-p", "fuse-preprocess", "-O",
                              "mean=a,b,c"), "mean")
    assert_user_error(run_cli("optimize", str(head_model), "-o", str(head_model)), "overwrite the input")
    assert not out.exists()
