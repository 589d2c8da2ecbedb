"""Adaptive weight rounding (plugins/ptq/adaptive_round.py) and checked quantization with a target
(plugins/qdq/target.py, `trtkit quantize --data/--target`), on a seeded onnx.helper model (Conv+BN+Relu,
depthwise Conv, residual Add, Concat, MaxPool, Gemm, Sigmoid) and seeded data: toy numbers, real code paths."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import run_cli
from golden import build_model

import trtkit
from trtkit.errors import OptionError
from trtkit.metrics import sqnr_db
from trtkit.plugins.ptq.adaptive_round import adaptive_round, round_columns
from trtkit.runtime import session


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adaptive")
    model = build_model(folder / "model.onnx")
    rng = np.random.default_rng(11)
    calib = rng.uniform(0, 1, (48, 3, 8, 8)).astype(np.float32)
    held = rng.uniform(0, 1, (32, 3, 8, 8)).astype(np.float32)
    np.save(folder / "calib.npy", calib)
    scales = trtkit.calibrate(model, calib, progress=False)
    scales_path = folder / "scales.json"
    trtkit.calibrate(model, calib, progress=False, output=scales_path)
    qdq = trtkit.quantize(model, scales, output=folder / "int8.onnx")
    return folder, model, calib, held, qdq


def _outputs(model, x):
    return session(model).run(None, {"x": x})[0]


def test_round_columns_beats_nearest_rounding_on_the_layer_output():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 24)) @ rng.standard_normal((24, 24))  # correlated inputs, like real layers
    w = rng.standard_normal((1, 16, 24))
    scale = np.abs(w).max(axis=2) / 127
    h = (x.T @ x)[None]
    codes, tail = round_columns(w, h, scale)
    assert codes.dtype == np.int8 and tail.shape == (1, 16, 0)
    assert np.abs(codes.astype(int)).max() <= 127
    nearest = np.clip(np.rint(w / scale[:, :, None]), -127, 127)
    err_nearest = np.linalg.norm(x @ (nearest[0] * scale[0][:, None] - w[0]).T)
    err_adaptive = np.linalg.norm(x @ (codes[0] * scale[0][:, None] - w[0]).T)
    assert err_adaptive < 0.8 * err_nearest
    again, _ = round_columns(w, h, scale)
    assert np.array_equal(codes, again)


def test_float_tail_absorbs_the_mean_error_like_a_bias():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(0, 1, (400, 8)), np.ones((400, 1))], axis=1)  # non-zero-mean inputs + bias
    w = rng.standard_normal((1, 4, 9))
    scale = np.abs(w[:, :, :8]).max(axis=2) / 127
    codes, tail = round_columns(w, (x.T @ x)[None], scale, float_tail=1)
    approx = np.concatenate([codes[0] * scale[0][:, None], tail[0]], axis=1)
    mean_shift = np.abs((x @ (approx - w[0]).T).mean(axis=0))
    nearest = np.concatenate([np.rint(w[0, :, :8] / scale[0][:, None]) * scale[0][:, None], w[0, :, 8:]], axis=1)
    assert mean_shift.max() < 0.5 * np.abs((x @ (nearest - w[0]).T).mean(axis=0)).max() + 1e-12


def outlier_model(path):
    """Two 3x3 Convs whose rows each hold one large weight: per-channel scales then leave the other weights
    few int8 levels, so weight rounding dominates the INT8 error (as in BN-folded depthwise layers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)

    def weight(cout, cin):
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.05
        w.reshape(cout, -1)[np.arange(cout), rng.integers(0, cin * 9, cout)] = 2.0
        return w

    inits = [numpy_helper.from_array(weight(16, 16), "w1"), numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array(weight(8, 16), "w2"), numpy_helper.from_array(np.zeros(8, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_adaptive_round_improves_the_model_and_leaves_the_input_alone(tmp_path):
    model = outlier_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(2)
    calib = rng.uniform(0, 1, (32, 16, 8, 8)).astype(np.float32)
    held = rng.uniform(0, 1, (16, 16, 8, 8)).astype(np.float32)
    qdq = trtkit.quantize(model, trtkit.calibrate(model, calib, progress=False), output=tmp_path / "int8.onnx")
    folder = tmp_path
    before_bytes = hashlib.sha256((folder / "int8.onnx").read_bytes()).hexdigest()
    result, report = adaptive_round(folder / "int8.onnx", model, calib)
    assert hashlib.sha256((folder / "int8.onnx").read_bytes()).hexdigest() == before_bytes
    assert len(report.layers) == 2 and report.samples == 32
    assert all(layer.error_adaptive_db > layer.error_nearest_db + 3 for layer in report.layers)
    reference = _outputs(model, held)
    # Held-out samples: the gain is not fitted to the rounding data.
    assert sqnr_db(reference, _outputs(result.model, held)) > sqnr_db(reference, _outputs(qdq.model, held)) + 3
    # Only int8 codes and float biases change: the graph keeps its Q/DQ structure.
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == [n.op_type for n in qdq.model.graph.node]


def test_adaptive_round_is_deterministic(setup, tmp_path):
    folder, model, calib, _, _ = setup
    for name in ("a", "b"):
        result, _ = adaptive_round(folder / "int8.onnx", model, calib, limit=32, blocks=2)
        result.save(tmp_path / f"{name}.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_cli_quantize_calibrator_ranges_keeps_the_calibrators_ranges(setup, tmp_path):
    """--calibrator-ranges: no range decision is made, and every activation gets the amax plain `quantize` gives
    it from the calibrator's scales."""
    folder, model, _, _, qdq = setup
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--data", str(folder / "calib.npy"),
                     "--calibrator-ranges", "--nearest-round", "--no-recenter", "--no-smooth", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    actions = [d["action"] for d in json.loads(result.stdout)["checked"]["decisions"]]
    assert not any(action.startswith("range") for action in actions)
    from trtkit.model import ModelArtifact

    written = ModelArtifact.load(out).metadata["quantization"]["activation_amax"]
    assert written and written == qdq.metadata["quantization"]["activation_amax"]


@pytest.mark.parametrize("options, message", [
    ({"reference": ""}, "needs option 'reference'"),
    ({"data": ""}, "needs option 'data'"),
    ({"blocks": 0}, "'blocks' must be >= 1"),
])
def test_adaptive_round_bad_options(setup, options, message):
    folder, model, calib, _, _ = setup
    kwargs = {"reference": model, "data": calib, **options}
    with pytest.raises(OptionError, match=message):
        adaptive_round(folder / "int8.onnx", kwargs.pop("reference"), kwargs.pop("data"), **kwargs)


def test_cli_quantize_with_data_rounds_and_reports(setup, tmp_path):
    folder, model, *_ = setup
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--data", str(folder / "calib.npy"),
                     "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    checked = json.loads(result.stdout)["checked"]
    assert checked["target"] is None and checked["check_samples"] == 12 and checked["round_samples"] == 36
    assert checked["samples"] == 48
    actions = [d["action"] for d in checked["decisions"]]
    assert "adaptive-round" in actions and set(actions) <= {"smooth", "range-blend", "range-search", "range",
                                                            "adaptive-round", "recenter"}
    for decision in checked["decisions"]:
        if decision["action"] == "range":  # kept only where the held-out metric improved
            assert decision["after"] > decision["before"]
    from trtkit.model import ModelArtifact

    assert ModelArtifact.load(out).metadata["quantization"]["checked"] == checked
    # The HTML report of the quantized model lists the same decisions and the verdict.
    report = run_cli("eval", "report", str(model), str(out), "--data", str(folder / "calib.npy"), "-o",
                     str(tmp_path / "report.html"), "-O", "duration_s=0.1", "-O", "layers=false")
    assert report.returncode == 0, report.stderr
    markdown = (tmp_path / "report.md").read_text()
    assert "## Quantization decisions (sqnr on 48 samples; rounding and range search on the 12 held out" in markdown
    assert "## Quantization verdict" in markdown
    for decision in checked["decisions"]:
        assert f"| {decision['action']} | {decision['what']} |" in markdown


def test_cli_target_keeps_layers_in_float_until_met(setup, tmp_path):
    folder, model, *_ = setup
    base = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--data", str(folder / "calib.npy"),
                   "-o", str(tmp_path / "base.onnx"), "--json")
    measured = json.loads(base.stdout)["checked"]["measured"]
    goal = measured + 3.0
    result = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--data", str(folder / "calib.npy"),
                     "--target", f"sqnr>={goal:.2f}", "-o", str(tmp_path / "t.onnx"), "--json")
    checked = json.loads(result.stdout)["checked"]
    floats = [d for d in checked["decisions"] if d["action"] == "float"]
    finals = [d for d in checked["decisions"] if d["action"] == "final"]
    if floats:  # the model kept is never worse by the target than the fallback step measured
        assert len(finals) == 1 and finals[0]["after"] >= floats[-1]["after"]
        assert checked["measured"] == finals[0]["after"]
    if checked["met"]:
        assert result.returncode == 0, result.stderr
        assert checked["measured"] >= goal and checked["float_nodes"] and floats
        assert all(d["after"] > d["before"] for d in floats)
    else:  # not reachable on this toy model: exit 1, the blocking layer named, the closest model written
        assert result.returncode == 1 and "blocked by" in result.stderr
        assert (tmp_path / "t.onnx").exists()


def test_cli_unreachable_target_exits_1_and_names_the_blocker(setup, tmp_path):
    folder, model, *_ = setup
    result = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--data", str(folder / "calib.npy"),
                     "--target", "sqnr>=300", "--max-float", "2", "-o", str(tmp_path / "t.onnx"))
    assert result.returncode == 1
    assert "--target sqnr>=300: not met" in result.stderr and "blocked by" in result.stderr
    assert (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--target", "sqnr>20"], "expected [OUTPUT:]METRIC>=VALUE"),
    (["--target", "snr>=20"], "unknown metric 'snr'"),
    (["--target", "box_mae>=2"], "needs <="),
    (["--target", "positive_iou>=0.9"], "needs a --task-metric of kind 'positives'"),
    (["--target", "nope:sqnr>=20"], "no output 'nope'"),
    (["--target", "sqnr>=20", "--max-float", "-1"], "--max-float must be >= 0"),
])
def test_cli_bad_targets_are_one_line_errors(setup, tmp_path, args, message):
    folder, model, *_ = setup
    result = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--data", str(folder / "calib.npy"),
                     "-o", str(tmp_path / "q.onnx"), *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_cli_target_needs_data(setup, tmp_path):
    folder, model, *_ = setup
    result = run_cli("quantize", str(model), "-s", str(folder / "scales.json"), "--target", "sqnr>=20",
                     "-o", str(tmp_path / "q.onnx"))
    assert result.returncode == 2 and "--target needs --data" in result.stderr


def test_adaptive_round_runs_as_a_pass_through_optimize(tmp_path):
    model = outlier_model(tmp_path / "model.onnx")
    calib = np.random.default_rng(3).uniform(0, 1, (16, 16, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", calib)
    trtkit.quantize(model, trtkit.calibrate(model, calib, progress=False), output=tmp_path / "int8.onnx")
    result = run_cli("optimize", str(tmp_path / "int8.onnx"), "-o", str(tmp_path / "r.onnx"), "--pass",
                     "adaptive-round", "-O", f"reference={model}", "-O", f"data={tmp_path / 'calib.npy'}")
    assert result.returncode == 0, result.stderr
    assert "adaptive-round: 2 layers on 16 samples" in result.stdout + result.stderr
    from trtkit.model import ModelArtifact

    report = ModelArtifact.load(tmp_path / "r.onnx").metadata["ptq"]["adaptive_round"]
    assert [layer["adaptive_db"] > layer["nearest_db"] for layer in report["layers"]] == [True, True]


def test_checked_quantization_runs_a_fixed_batch_model(tmp_path):
    """Models exported with batch 1 (ddddocr's YOLOX) are run one sample at a time by the check."""
    import onnx

    from trtkit.plugins.qdq.target import quantize_checked

    path = outlier_model(tmp_path / "model.onnx")
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "fixed.onnx")
    calib = np.random.default_rng(4).uniform(0, 1, (12, 16, 8, 8)).astype(np.float32)
    scales = trtkit.calibrate(tmp_path / "fixed.onnx", calib, progress=False)
    result, report = quantize_checked(tmp_path / "fixed.onnx", scales, calib)
    assert report.check_samples == 4 and report.round_samples == 8
    assert report.decisions[-1].action == "adaptive-round" and report.measured > 10


def test_qdq_builder_with_an_unmet_target_writes_the_model_and_fails_like_a_gate(setup, tmp_path):
    """The recipe's quantize step goes through the builder: an unmet target must not pass silently."""
    from trtkit.errors import GateError
    from trtkit.registry import get_registry

    folder, model, *_ = setup
    builder = get_registry().builder("qdq")
    options = builder.resolve_options({"scales": str(folder / "scales.json"), "data": str(folder / "calib.npy"),
                                       "target": "sqnr>=300", "max_float": 1})
    with pytest.raises(GateError, match="target sqnr>=300: not met"):
        builder.build(model, tmp_path / "q.onnx", **options)
    assert (tmp_path / "q.onnx").exists()


def test_range_choice_keeps_the_full_range_only_where_it_measures_better(tmp_path):
    """Tensors clipped by the calibrator are moved toward their full observed range, first all together by one
    exponent (range-blend), then one at a time (range); each decision is kept only with a better metric, and
    a tensor given its full range gets the observed max |x| the scales recorded."""
    from trtkit.plugins.qdq.target import BLEND_STEPS, quantize_checked
    from trtkit.scales import Scales, as_scales

    model = outlier_model(tmp_path / "model.onnx")
    calib = np.random.default_rng(6).uniform(0, 1, (24, 16, 8, 8)).astype(np.float32)
    calibrated = as_scales(trtkit.calibrate(model, calib, progress=False))
    # A range clipped far too tight on the input (as a calibrator can do on a tensor whose extremes matter).
    amax = {**dict(calibrated.items()), "x": 0.1}
    scales = Scales(amax, method=calibrated.method, stats=calibrated.stats)
    result, report = quantize_checked(model, scales, calib, adaptive_round=False, recenter=False)
    blend = [d for d in report.decisions if d.action == "range-blend"]
    assert len(blend) == 1 and blend[0].after > blend[0].before  # clipping x at 0.1 is bad: some step is better
    step = float(blend[0].what.split("=")[1])
    assert step in BLEND_STEPS
    full_x = max(abs(calibrated.stats["x"]["min"]), abs(calibrated.stats["x"]["max"]))
    chosen = result.metadata["quantization"]["activation_amax"]
    ranges = [d for d in report.decisions if d.action == "range"]
    assert all(d.after > d.before for d in ranges)
    expected_x = full_x if "x" in [d.what for d in ranges] else 0.1 ** (1 - step) * full_x ** step
    assert chosen["x"] == pytest.approx(expected_x, rel=1e-5)
    for decision in ranges:
        stats = calibrated.stats[decision.what]
        assert chosen[decision.what] == pytest.approx(max(abs(stats["min"]), abs(stats["max"])))
    _, plain = quantize_checked(model, scales, calib, adaptive_round=False, choose_ranges=False, recenter=False)
    assert report.measured > plain.measured
    assert not [d for d in plain.decisions if d.action.startswith("range")]


def test_without_a_target_a_task_metric_is_what_the_decisions_are_judged_by(setup):
    """--task-metric without --target: the held-out check measures that task metric (what the user said
    matters), not the output's SQNR."""
    from trtkit.plugins.qdq.target import quantize_checked

    folder, model, calib, *_ = setup
    result, report = quantize_checked(model, folder / "scales.json", calib, adaptive_round=False,
                                      task_metrics=["map output=prob threshold=0.5"])
    assert report.metric == "map_iou" and report.target is None
    assert 0.0 <= report.measured <= 1.0
    assert result.metadata["quantization"]["checked"]["metric"] == "map_iou"
    _, plain = quantize_checked(model, folder / "scales.json", calib, adaptive_round=False)
    assert plain.metric == "sqnr"


def test_positives_are_refined_by_their_score_sqnr_and_a_target_checked_on_itself(setup):
    """A positives metric without a target: the decisions are judged by the SQNR of its scores (continuous; the
    IoU of thresholded sets moves by whole positives). With a positive_iou target the refinements still are,
    and the target is measured as an IoU on every sample; the rounding decision is judged on the held-out ones."""
    from trtkit.metrics import measure_task_metrics, parse_task_metrics
    from trtkit.plugins.qdq.target import quantize_checked

    folder, model, calib, *_ = setup
    spec = "positives output=prob threshold=0.5"
    result, report = quantize_checked(model, folder / "scales.json", calib, task_metrics=[spec], recenter=False,
                                      choose_ranges=False)
    assert report.metric == report.refined_by == "score_sqnr"
    metrics = parse_task_metrics([spec], ["prob"])
    found = measure_task_metrics(metrics, {"prob": _outputs(model, calib)}, {"prob": _outputs(result, calib)})
    assert report.measured == pytest.approx(found["positives"]["prob"]["score_sqnr_db"], rel=1e-6)
    rounding = next(d for d in report.decisions if d.action == "adaptive-round")
    assert f"judged on the {report.check_samples} samples held out" in rounding.why
    assert report.check_samples < report.samples == len(calib)

    result, report = quantize_checked(model, folder / "scales.json", calib, task_metrics=[spec], recenter=False,
                                      choose_ranges=False, target="positive_iou>=0.5")
    assert report.metric == "positive_iou" and report.refined_by == "score_sqnr" and report.met
    found = measure_task_metrics(metrics, {"prob": _outputs(model, calib)}, {"prob": _outputs(result, calib)})
    assert report.measured == pytest.approx(found["positives"]["prob"]["positive_iou"])
    assert report.as_dict()["refined_by"] == "score_sqnr"


def test_few_reference_positives_in_the_samples_are_reported(setup):
    """A detection metric judged on few FP32 positives is coarse: the report says how many there were."""
    import re

    from trtkit.plugins.qdq.target import FEW_POSITIVES, quantize_checked

    folder, model, calib, *_ = setup
    _, report = quantize_checked(model, folder / "scales.json", calib, adaptive_round=False, choose_ranges=False,
                                 recenter=False, task_metrics=["positives output=prob threshold=0.5"])
    assert report.samples == len(calib)  # the decisions are judged on every sample
    count = int(np.count_nonzero(_outputs(model, calib) > 0.5))
    assert 0 < count < FEW_POSITIVES  # the seeded model's outputs: a handful above 0.5
    assert len(report.notes) == 1 and f"hold {count} FP32 positives for" in report.notes[0]
    assert re.search(r"about [0-9.e-]+ per positive", report.notes[0])
    assert report.as_dict()["notes"] == report.notes


@pytest.fixture
def process_engine():
    from process_engine import process_engine_registry

    from trtkit.registry import set_registry

    registry = process_engine_registry()
    set_registry(registry)
    yield
    set_registry(None)


def test_gram_sums_on_workers_give_the_in_process_model_byte_for_byte(process_engine, tmp_path):
    """The Gram matrices accumulated on a process-pool engine's workers (shards of whole batches, summed on
    the driver in batch order) round every weight as one process does: the same model bytes and report,
    whatever the number of workers (uneven shards included), over two blocks (the second block's inputs
    come from the model the first block rounded: the workers get it)."""
    from trtkit.engine import Execution

    model = outlier_model(tmp_path / "model.onnx")
    calib = np.random.default_rng(2).uniform(0, 1, (36, 16, 8, 8)).astype(np.float32)
    trtkit.quantize(model, trtkit.calibrate(model, calib, progress=False), output=tmp_path / "int8.onnx")
    # 5 batches, the last one of 4 samples; 20 of the 64 output positions sampled per sample, seeded by the
    # batch's number in the whole pass (a worker numbering its own batches would pick other positions)
    options = {"limit": 36, "batch_size": 8, "blocks": 2, "positions": 20}
    here, here_report = adaptive_round(tmp_path / "int8.onnx", model, calib, **options)
    here.save(tmp_path / "here.onnx")
    assert len(here_report.layers) == 2
    for workers in (2, 3):
        there, there_report = adaptive_round(tmp_path / "int8.onnx", model, calib, **options,
                                             execution=Execution.create(engine="processes", workers=workers))
        there.save(tmp_path / f"there{workers}.onnx")
        assert (tmp_path / f"there{workers}.onnx").read_bytes() == (tmp_path / "here.onnx").read_bytes(), workers
        assert there_report.as_dict() == here_report.as_dict()



def test_recipe_execution_section_rounds_on_the_engine_identically(process_engine, setup, tmp_path):
    """A recipe's [execution] reaches the quantize step: its adaptive rounding runs on the engine's workers
    (the engine's map calls are counted) and the int8 model is the in-process one, byte for byte."""
    from process_engine import MAPS

    from trtkit.pipeline import run_recipe

    folder, model, *_ = setup
    base = (f'[model]\nonnx = "{model}"\n[calibration]\ndata = "{folder / "calib.npy"}"\nmethod = "percentile"\n'
            'batch_size = 8\n[report]\nenabled = false\n[[builders]]\nname = "onnxruntime"\nprecisions = ["int8"]\n')
    models, maps = [], []
    for name, extra in (("local", ""), ("engine", '[execution]\nengine = "processes"\nworkers = 2\n')):
        (tmp_path / f"{name}.toml").write_text(base + extra)
        MAPS.clear()
        run_recipe(tmp_path / f"{name}.toml", tmp_path / name)
        maps.append(list(MAPS))
        models.append(sorted((tmp_path / name).rglob("*int8*.onnx")))
    assert maps[0] == [] and len(maps[1]) > 1  # calibration's shards, then the rounding's, on the workers
    assert models[0] and [p.read_bytes() for p in models[0]] == [p.read_bytes() for p in models[1]]


def test_target_falls_back_on_a_model_without_node_names(tmp_path):
    """onnx.helper models have no node names: the fallback names them as the placement does (OPTYPE_INDEX) on a
    copy, and the model kept measures no worse than the fallback step did."""
    import onnx

    from trtkit.plugins.qdq.target import quantize_checked

    path = outlier_model(tmp_path / "model.onnx")
    before = path.read_bytes()
    calib = np.random.default_rng(3).uniform(0, 1, (16, 16, 8, 8)).astype(np.float32)
    scales = trtkit.calibrate(path, calib, progress=False)
    result, report = quantize_checked(path, scales, calib, target="sqnr>=300", max_float=1)
    assert report.float_nodes == ["Conv_2"] and report.met is False
    floats = [d for d in report.decisions if d.action == "float"]
    final = report.decisions[-1]
    assert final.action == "final" and final.after >= floats[-1].after and report.measured == final.after
    conv = next(node for node in result.model.graph.node if node.name == "Conv_2")
    assert conv.input[0] == "r1"  # reads the float activation
    assert path.read_bytes() == before and not any(n.name for n in onnx.load(path).graph.node)


def test_a_model_with_input_quantizers_removed_builds_with_tensorrt_rtx(tmp_path):
    """The fallback step's model (kept when it measures better than the re-built one): a Conv reading the float
    activation and int8 weights through a DequantizeLinear is something TensorRT parses and builds."""
    from test_qdq import trt_build

    from trtkit.plugins.qdq.target import _without_quantizers

    path = outlier_model(tmp_path / "model.onnx")
    calib = np.random.default_rng(3).uniform(0, 1, (16, 16, 8, 8)).astype(np.float32)
    qdq = trtkit.quantize(path, trtkit.calibrate(path, calib, progress=False))
    result = qdq.copy()
    result.model = _without_quantizers(qdq.model, ["r1"])
    quantizers = [n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert "r1" not in quantizers and "x" in quantizers
    result.save(tmp_path / "fallback.onnx")
    trt_build(tmp_path / "fallback.onnx", shape=(1, 16, 8, 8), opt=(4, 16, 8, 8), maximum=(8, 16, 8, 8))


def test_a_saturated_set_iou_earns_a_note(setup):
    """A map whose threshold nothing crosses measures IoU 1.0 whatever the decisions: the report says the
    samples cannot tell them apart (PP-OCR's text map on zoo calibration crops: 0.9999)."""
    from trtkit.plugins.qdq.target import quantize_checked

    folder, model, calib, *_ = setup
    _, report = quantize_checked(model, folder / "scales.json", calib, adaptive_round=False,
                                 task_metrics=["map output=prob threshold=2.0"])
    assert report.measured == 1.0
    assert any(note.startswith("map_iou measures 1 on these 48 samples") for note in report.notes)
    _, plain = quantize_checked(model, folder / "scales.json", calib, adaptive_round=False)
    assert plain.metric == "sqnr" and not any("cannot tell" in note for note in plain.notes)
