"""A third-party pass that changes outputs by design and reports the difference it measured works exactly like
the built-in inexact pass `fuse-preprocess` in `trtkit optimize`: same report fields, same check switch, same
metadata. The plugin is a real installed distribution (dist-info with an entry point), found by discovery."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import run_cli  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from plugin_dists import make_distribution  # noqa: E402

from trtkit.model import ModelArtifact  # noqa: E402

# Drops a Mul by a scalar constant that feeds a graph output (the factor moves to metadata, like remove-sigmoid's
# thresholds); proves new * factor == old itself and reports the largest difference it measured.
OUTPUT_SCALE = """
    from trtkit import hookimpl
    from trtkit.errors import NumericalCheckError
    from trtkit.graph import bypass, constant_value, is_graph_output, rewrite
    from trtkit.stages import GraphPass, Option

    def absorb_output_scale(artifact, verify=True, seed=0):
        import numpy as np

        from trtkit.runtime import random_inputs, run, session

        factors = {}

        def edit(graph):
            for node in list(graph.nodes):
                if node.op != "Mul" or not is_graph_output(node.outputs[0], graph):
                    continue
                value = constant_value(node.inputs[1])
                if value is None or np.asarray(value).size != 1:
                    continue
                name = node.outputs[0].name
                if bypass(node, graph):
                    factors[name] = float(np.asarray(value).reshape(-1)[0])

        result = rewrite(artifact, edit)
        if not factors:
            return result
        info = {"factors": factors}
        if verify:
            feeds = random_inputs(artifact.model, seed=seed)
            old = run(session(artifact, optimization="disable"), feeds)
            new = run(session(result, optimization="disable"), feeds)
            worst = 0.0
            for name, factor in factors.items():
                diff = float(np.max(np.abs(new[name].astype(np.float64) * factor - old[name])))
                if not diff <= 1e-5 * float(np.max(np.abs(old[name]))) + 1e-6:
                    raise NumericalCheckError(f"pass 'absorb-output-scale': output '{name}' is off by {diff:.3g}")
                worst = max(worst, diff)
            info["max_abs_diff"] = worst
        result.metadata["output_scale"] = info
        return result

    @hookimpl
    def register_passes(register):
        register(GraphPass(
            name="absorb-output-scale",
            description="drop a constant scale on an output; the factor goes to metadata",
            options={"verify": Option("bool", True, "prove new * factor == old"),
                     "seed": Option("int", 0, "seed of the verification inputs")},
            apply=absorb_output_scale,
            exact=False,
            measured_difference=lambda result: result.metadata.get("output_scale", {}).get("max_abs_diff"),
        ))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    site = make_distribution(tmp_path_factory.mktemp("site"), "output-scale", {"output_scale_pass": OUTPUT_SCALE})
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """x / 255 -> Conv -> Relu -> * 0.3 -> y: something for fuse-preprocess (the Div) and for the plugin (the Mul)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(np.float32(255.0), "d"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b"),
             numpy_helper.from_array(np.float32(0.3), "k")]
    nodes = [helper.make_node("Div", ["x", "d"], ["xs"]),
             helper.make_node("Conv", ["xs", "w", "b"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Mul", ["r", "k"], ["y"])]
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path_factory.mktemp("model") / "scaled.onnx"
    onnx.save(proto, str(path))
    return path


def optimize_json(model: Path, out: Path, env: dict[str, str], *extra: str) -> dict:
    done = run_cli("optimize", str(model), "-o", str(out), "-p", "fuse-preprocess", "-p", "absorb-output-scale",
                   "--json", *extra, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_third_party_pass_is_discovered_as_inexact(env):
    listed = run_cli("optimize", "--list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["passes"]}
    ours, builtin = rows["absorb-output-scale"], rows["fuse-preprocess"]
    assert ours["exact"] is False and builtin["exact"] is False
    assert ours["default"] is False and builtin["default"] is False


def test_reported_difference_is_recorded_like_the_builtin(model, env, tmp_path):
    out = tmp_path / "out.onnx"
    data = optimize_json(model, out, env, "--range", "x=0,255")
    builtin, ours = data["passes"]
    assert (builtin["name"], ours["name"]) == ("fuse-preprocess", "absorb-output-scale")
    saved = ModelArtifact.load(out).metadata
    # the report carries what each pass measured, marked as checked by the pass, with no tolerance of the core
    assert set(ours) == set(builtin)
    for report, measured in ((builtin, saved["preprocess"]["max_abs_diff"]),
                             (ours, saved["output_scale"]["max_abs_diff"])):
        assert report["checked"] == "by the pass"
        assert report["tolerance"] is None
        assert report["max_abs_diff"] == measured
    assert 0.0 < ours["max_abs_diff"] < 1e-5  # the measured value, not a placeholder
    assert data["max_abs_diff"] is None  # outputs changed by design: no end-to-end comparison with the input
    assert [p["name"] for p in saved["passes"]] == ["fuse-preprocess", "absorb-output-scale"]
    assert saved["output_scale"]["factors"] == {"y": pytest.approx(0.3)}
    assert [n.op_type for n in ModelArtifact.load(out).model.graph.node] == ["Conv", "Relu"]

    table = run_cli("optimize", str(model), "-o", str(tmp_path / "t.onnx"), "-p", "fuse-preprocess", "-p",
                    "absorb-output-scale", "--range", "x=0,255", env=env)
    assert table.returncode == 0, table.stderr
    diff_row = next(line for line in table.stderr.splitlines() if "max |diff|" in line)
    assert diff_row.count("*") == 2  # both marked as checked by the pass
    assert "* checked by the pass itself" in table.stderr


def test_no_check_switches_the_plugin_off_like_the_builtin(model, env, tmp_path):
    out = tmp_path / "unchecked.onnx"
    data = optimize_json(model, out, env, "--no-check")
    for report in data["passes"]:
        assert report["checked"] == "no" and report["max_abs_diff"] is None
    saved = ModelArtifact.load(out).metadata
    assert "max_abs_diff" not in saved["preprocess"] and "max_abs_diff" not in saved["output_scale"]


def test_a_default_pass_from_a_plugin_joins_the_default_passes(model):
    from trtkit import hookimpl
    from trtkit.optimizing import default_passes, optimize
    from trtkit.registry import load_plugins
    from trtkit.stages import GraphPass

    plugin = types.SimpleNamespace(
        register_passes=hookimpl(lambda register: register(GraphPass(
            "keep-as-is", "a default pass that changes nothing", apply=lambda artifact: artifact.copy(),
            default=True))),
        __name__="default_pass_plugin",
    )
    registry = load_plugins(extra_modules=[plugin])
    assert default_passes(registry) == ["simplify", "optimize", "keep-as-is"]
    result = optimize(str(model), registry=registry)
    assert [r.name for r in result.reports] == ["simplify", "optimize", "keep-as-is"]
    assert all(r.checked == "onnxruntime" for r in result.reports)
