"""The numerical check of `trtkit optimize` on models random [-1, 1] inputs with dims of 1 do not run (issue 17):
an If that compares an int64 sample-rate scalar with 16000 and reshapes audio into frames, an LSTM fed a float
state input; the user's own check inputs (--check-data); structural checks when nothing runs; a tolerance
relative to each output's range. Real onnx.helper models, real onnxruntime."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import run_cli  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtkit.errors import NumericalCheckError  # noqa: E402
from trtkit.model import ModelArtifact  # noqa: E402
from trtkit.optimizing import optimize  # noqa: E402
from trtkit.runtime import run, session  # noqa: E402

HIDDEN, FRAME = 16, 64


def constant(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def frames_branch(name, width):
    """A subgraph that reshapes the audio into frames of `width` samples (the sample count must divide)."""
    return helper.make_graph(
        [constant(f"{name}_shape", np.array([0, -1, width], np.int64)),
         helper.make_node("Reshape", ["audio", f"{name}_shape"], [f"{name}_frames"]),
         helper.make_node("Identity", [f"{name}_frames"], [f"{name}_out"])],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])


def vad_model(frame=FRAME):
    """Like a voice-activity model: audio [batch, samples], sample rate (int64 scalar), LSTM state
    [2, batch, hidden]. Only sr == 16000 with samples a multiple of `frame` runs (the 8 kHz branch makes
    frames the LSTM cannot take); weights are Constant nodes."""
    rng = np.random.default_rng(0)
    nodes = [
        constant("sr16k", np.array(16000, np.int64)),
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["frames"], then_branch=frames_branch("then", frame),
                         else_branch=frames_branch("else", frame // 2)),
        helper.make_node("Transpose", ["frames"], ["seq"], perm=[1, 0, 2]),
        constant("W", rng.normal(0, 0.3, (1, 4 * HIDDEN, frame)).astype(np.float32)),
        constant("R", rng.normal(0, 0.3, (1, 4 * HIDDEN, HIDDEN)).astype(np.float32)),
        constant("B", rng.normal(0, 0.1, (1, 8 * HIDDEN)).astype(np.float32)),
        constant("i0", np.array([0], np.int64)), constant("i1", np.array([1], np.int64)),
        constant("i2", np.array([2], np.int64)),
        helper.make_node("Slice", ["state", "i0", "i1", "i0"], ["h0"]),
        helper.make_node("Slice", ["state", "i1", "i2", "i0"], ["c0"]),
        helper.make_node("LSTM", ["seq", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], hidden_size=HIDDEN),
        helper.make_node("Concat", ["Y_h", "Y_c"], ["new_state"], axis=0),
        helper.make_node("Squeeze", ["Y_h", "i0"], ["last"]),
        constant("Wo", rng.normal(0, 0.3, (HIDDEN, 1)).astype(np.float32)),
        helper.make_node("MatMul", ["last", "Wo"], ["logit"]),
        constant("one", np.array(1.0, np.float32)),
        helper.make_node("Mul", ["logit", "one"], ["logit1"]),
        helper.make_node("Sigmoid", ["logit1"], ["prob"]),
    ]
    graph = helper.make_graph(nodes, "vad", [
        helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN]),
    ], [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
        helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "batch", HIDDEN])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vad_feeds(samples=512, seed=1):
    rng = np.random.default_rng(seed)
    return {"audio": rng.uniform(-1, 1, (1, samples)).astype(np.float32), "sr": np.array(16000, np.int64),
            "state": rng.normal(0, 0.5, (2, 1, HIDDEN)).astype(np.float32)}


def outputs(model, feeds):
    return run(session(model, optimization="disable"), feeds)


def test_random_inputs_do_not_run_the_vad_model():
    """The premise: the old check's feeds (dims 1, sr in {0, 1}) fail on this model."""
    from trtkit.runtime import random_inputs

    with pytest.raises(Exception, match="Reshape|LSTM"):
        outputs(vad_model(), random_inputs(vad_model()))


def test_vad_model_is_optimized_with_the_check_on():
    model = vad_model()
    result = optimize(ModelArtifact.from_model(model))
    assert [r.checked for r in result.reports] == ["onnxruntime", "onnxruntime"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-6
    assert result.reports[-1].total_after < result.reports[0].total_before
    for samples in (64, 512):  # the optimized model gives the same outputs on real-sized audio
        feeds = vad_feeds(samples)
        ref, got = outputs(model, feeds), outputs(result.artifact, feeds)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_user_check_data_from_the_cli(tmp_path):
    src, out, data = tmp_path / "vad.onnx", tmp_path / "vad.opt.onnx", tmp_path / "check.npz"
    onnx.save(vad_model(), src)
    np.savez(data, **vad_feeds(512))
    done = run_cli("optimize", str(src), "-o", str(out), "--check-data", str(data), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [p["checked"] for p in report["passes"]] == ["onnxruntime", "onnxruntime"]
    assert "warning" not in done.stderr


def test_check_data_the_model_cannot_run_on_is_a_warning_and_structural_checks(tmp_path):
    src, out, data = tmp_path / "vad.onnx", tmp_path / "vad.opt.onnx", tmp_path / "short.npz"
    onnx.save(vad_model(), src)
    np.savez(data, **vad_feeds(100))  # 100 samples: not a whole number of frames
    done = run_cli("optimize", str(src), "-o", str(out), "--check-data", str(data), "--json")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(data) in warnings[0] and "structural checks only" in warnings[0]
    assert [p["checked"] for p in json.loads(done.stdout)["passes"]] == ["structure", "structure"]
    ref, got = outputs(src, vad_feeds(512)), outputs(out, vad_feeds(512))
    np.testing.assert_allclose(got["prob"], ref["prob"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("content", "message"), [
    ({"audio": np.zeros((1, 64), np.int32)}, "int32 data for a float32 model input"),
    ({"noise": np.zeros((1, 64), np.float32)}, "noise"),
    ({"audio": np.zeros(64, np.float32)}, "rank 1"),
])
def test_bad_check_data_is_a_one_line_error(tmp_path, content, message):
    src, data = tmp_path / "vad.onnx", tmp_path / "bad.npz"
    onnx.save(vad_model(), src)
    np.savez(data, **content)
    done = run_cli("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--check-data", str(data))
    assert done.returncode == 2
    assert message in done.stderr and str(data) in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_model_no_candidate_runs_gets_one_warning_and_structural_checks(capsys):
    """Frames of 5000 samples: beyond the sizes tried, so no generated input runs it; the passes still run."""
    model = vad_model(frame=5000)
    result = optimize(ModelArtifact.from_model(model))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "numerical check off" in warnings[0]
    assert [r.checked for r in result.reports] == ["structure", "structure"]
    assert result.max_abs_diff is None
    feeds = vad_feeds(5000)
    np.testing.assert_allclose(outputs(result.artifact, feeds)["prob"], outputs(model, feeds)["prob"], rtol=1e-5)


def _plugin_registry(apply):
    from trtkit import hookimpl
    from trtkit.registry import load_plugins
    from trtkit.stages import GraphPass

    plugin = types.SimpleNamespace(
        register_passes=hookimpl(lambda register: register(GraphPass("tamper", "test pass", apply=apply))),
        __name__="tamper_plugin",
    )
    return load_plugins(extra_modules=[plugin])


def _scale_output(artifact, name, factor):
    """An 'exact' pass that is not: multiplies output `name` by `factor`."""
    result = artifact.copy()
    graph = result.model.graph
    for node in graph.node:
        node.output[:] = [f"{name}_raw" if out == name else out for out in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "tamper_factor"))
    graph.node.append(helper.make_node("Mul", [f"{name}_raw", "tamper_factor"], [name]))
    return result


def test_structural_check_catches_a_changed_output_type():
    def to_double(artifact):
        result = artifact.copy()
        graph = result.model.graph
        for node in graph.node:
            node.output[:] = ["prob_raw" if out == "prob" else out for out in node.output]
        graph.node.append(helper.make_node("Cast", ["prob_raw"], ["prob"], to=TensorProto.DOUBLE))
        graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
        return result

    with pytest.raises(NumericalCheckError, match="tamper.*prob"):
        optimize(ModelArtifact.from_model(vad_model(frame=5000)), ["tamper"], registry=_plugin_registry(to_double))


def small_range_model():
    """A saturated sigmoid (like a text detector's probability map on random inputs): the output spans
    about 2.6e-3, far below the old absolute tolerance of 1e-4."""
    nodes = [helper.make_node("Mul", ["x", "half"], ["scaled"]), helper.make_node("Sub", ["scaled", "six"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "sat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                               numpy_helper.from_array(np.array(6.0, np.float32), "six")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ModelArtifact.from_model(model)


def test_a_drift_of_7e_3_of_the_output_range_fails():
    artifact = small_range_model()
    y = outputs(artifact, {"x": np.random.default_rng(0).uniform(-1, 1, (1, 64)).astype(np.float32)})["y"]
    span = float(y.max() - y.min())
    factor = 1 + 7e-3 * span / float(y.max())  # moves the largest value by 7e-3 of the range
    registry = _plugin_registry(lambda a: _scale_output(a, "y", factor))
    with pytest.raises(NumericalCheckError, match="tamper.*'y'"):
        optimize(artifact, ["tamper"], registry=registry)
    # the built-in exact passes stay within the tolerance on the same model
    assert all(r.checked == "onnxruntime" for r in optimize(artifact).reports)


def test_tolerance_scales_with_range_and_allows_round_off():
    from trtkit.optimizing import _compare

    ref = {"y": np.linspace(1000.0, 1000.01, 50, dtype=np.float32)}  # large magnitude, tiny range
    off_by_ulps = {"y": np.nextafter(ref["y"], np.float32(np.inf)) + np.float32(0)}
    _compare(ref, off_by_ulps, "p", 1e-4, 1e-6)  # a few ulp of 1000 is round-off, not drift
    with pytest.raises(NumericalCheckError):  # 5 ranges off (5e-5 of the magnitude: beyond round-off)
        _compare(ref, {"y": ref["y"] + np.float32(0.05)}, "p", 1e-4, 1e-6)
    small = {"y": np.linspace(0.0, 0.01, 50, dtype=np.float32)}
    with pytest.raises(NumericalCheckError, match="changed output 'y'"):  # 7e-3 of the range, 7e-5 absolute
        _compare(small, {"y": small["y"] + np.float32(7e-5)}, "p", 1e-4, 1e-6)


# ---- item 4: the shapes real exported models have, through every pass with the check on ------------------------
def _model(nodes, inputs, outputs_, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs_)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def loop_model():
    """A Loop whose trip count is an int64 scalar input; the body's weights are Constant nodes."""
    body = helper.make_graph(
        [constant("decay", np.array(0.5, np.float32)),
         helper.make_node("Mul", ["acc_in", "decay"], ["scaled"]),
         helper.make_node("Add", ["scaled", "x"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["batch", 4])])
    nodes = [constant("yes", np.array(True)), constant("zero", np.zeros((1, 4), np.float32)),
             helper.make_node("Mul", ["x", "zero"], ["acc0"]),
             helper.make_node("Loop", ["steps", "yes", "acc0"], ["acc"], body=body),
             constant("w", np.random.default_rng(3).normal(size=(4, 2)).astype(np.float32)),
             helper.make_node("MatMul", ["acc", "w"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                          helper.make_tensor_value_info("steps", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])


def gru_model():
    """A GRU over [seq, batch, 8] with Constant-node weights and a Sigmoid head."""
    rng = np.random.default_rng(4)
    nodes = [constant("W", rng.normal(0, 0.3, (1, 3 * 6, 8)).astype(np.float32)),
             constant("R", rng.normal(0, 0.3, (1, 3 * 6, 6)).astype(np.float32)),
             constant("B", rng.normal(0, 0.1, (1, 6 * 6)).astype(np.float32)),
             helper.make_node("GRU", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=6),
             helper.make_node("Sigmoid", ["Y_h"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "batch", 6])])


def conv_constant_weights_model():
    """Conv + BatchNorm + per-channel Mul with every weight a Constant node (as Paddle exports them)."""
    rng = np.random.default_rng(5)
    nodes = [constant("w", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)),
             constant("b", rng.normal(0, 0.1, 4).astype(np.float32)),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             constant("gamma", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
             constant("beta", rng.normal(0, 0.3, 4).astype(np.float32)),
             constant("mean", rng.normal(0, 0.3, 4).astype(np.float32)),
             constant("var", rng.uniform(0.5, 2, 4).astype(np.float32)),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
             constant("s", rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32)),
             helper.make_node("Mul", ["bn", "s"], ["m"]), helper.make_node("Sigmoid", ["m"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])])


SHAPES = {"if-lstm-int64-scalar-state": vad_model, "loop-int64-trip-count": loop_model, "gru": gru_model,
          "conv-constant-weights": conv_constant_weights_model}
SHAPE_FEEDS = {
    "if-lstm-int64-scalar-state": lambda: vad_feeds(256),
    "loop-int64-trip-count": lambda: {"x": np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32),
                                      "steps": np.array(5, np.int64)},
    "gru": lambda: {"x": np.random.default_rng(7).normal(size=(7, 2, 8)).astype(np.float32)},
    "conv-constant-weights": lambda: {"x": np.random.default_rng(8).normal(size=(2, 3, 8, 8)).astype(np.float32)},
}
PASSES = ["simplify", "optimize", "fold-batchnorm", "remove-sigmoid"]


@pytest.mark.parametrize("graph_pass", PASSES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_pass_with_the_check_on_keeps_outputs(shape, graph_pass, capsys):
    model = SHAPES[shape]()
    result = optimize(ModelArtifact.from_model(model), [graph_pass])
    assert "warning" not in capsys.readouterr().err  # the check found inputs the model runs on
    assert result.reports[0].checked == ("by the pass" if graph_pass == "remove-sigmoid" else "onnxruntime")
    feeds = SHAPE_FEEDS[shape]()  # other sizes than the check used
    ref, got = outputs(model, feeds), outputs(result.artifact, feeds)
    for name in ref:
        new = got[name].astype(np.float64)
        if graph_pass == "remove-sigmoid" and name in ("y", "prob"):
            new = 1 / (1 + np.exp(-new))
        np.testing.assert_allclose(new, ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
