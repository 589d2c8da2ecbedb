"""The accuracy evaluator on real models: metrics vs independent numpy, tolerance gates and exit codes, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from eval_helpers import mlp_fp32, mlp_inputs, quantize_max, run_float

import trtkit
from trtkit.errors import DataError, OptionError, UnknownNameError


@pytest.fixture(scope="session")
def digits_eval(digits_onnx, digits_data, tmp_path_factory):
    """(fp32 path, int8 QDQ path, x_test .npy, y_test .npy, x_test, y_test) for the trained digits CNN."""
    folder = tmp_path_factory.mktemp("digits_eval")
    x_train, _, x_test, y_test = digits_data
    qdq = quantize_max(digits_onnx, folder / "digits.int8.onnx", {"image": x_train[:256]})
    np.save(folder / "x.npy", x_test)
    np.save(folder / "y.npy", y_test)
    return digits_onnx, qdq, folder / "x.npy", folder / "y.npy", x_test, y_test


@pytest.fixture(scope="session")
def mlp_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    fp32 = mlp_fp32(folder / "mlp.onnx")
    x = mlp_inputs(64)
    np.save(folder / "x.npy", x)
    return fp32, quantize_max(fp32, folder / "mlp.int8.onnx", {"x": x}), folder / "x.npy"


def test_accuracy_matches_independent_numpy(digits_eval):
    fp32, qdq, x_path, y_path, x, y = digits_eval
    result = trtkit.evaluate("accuracy", [fp32, qdq], data=str(x_path), labels=str(y_path), min_sqnr=5.0)
    ref = run_float(fp32, {"image": x})["logits"].astype(np.float64)
    cand = run_float(qdq, {"image": x})["logits"].astype(np.float64)
    out = result.data["outputs"]["logits"]
    assert out["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(ref**2) / np.sum((cand - ref) ** 2)), rel=1e-4)
    assert out["cosine"] == pytest.approx(np.dot(ref.ravel(), cand.ravel())
                                          / np.linalg.norm(ref) / np.linalg.norm(cand), rel=1e-6)
    assert out["max_abs"] == pytest.approx(np.abs(ref - cand).max(), rel=1e-4)
    task = result.data["task"]
    assert task["reference_top1"] == pytest.approx(np.mean(ref.argmax(1) == y))
    assert task["candidate_top1"] == pytest.approx(np.mean(cand.argmax(1) == y))
    assert task["agreement"] == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))
    assert task["reference_top1"] > 0.9  # the trained model is real
    assert result.data["mode"] == "Q/DQ emulated in float"
    assert result.data["num_samples"] == len(y)
    assert result.passed and result.data["checks"][0]["metric"] == "sqnr_db"


def test_gate_exit_codes_and_json(mlp_pair, tmp_path):
    fp32, qdq, x_path = mlp_pair
    failing = run_cli("eval", "accuracy", str(fp32), str(qdq), "--data", str(x_path), "-O", "min_sqnr=y:20",
                      "--json", "-o", str(tmp_path / "acc.json"))
    assert failing.returncode == 1, failing.stderr
    payload = json.loads(failing.stdout)
    assert payload["passed"] is False
    check = payload["data"]["checks"][0]
    assert check["output"] == "y" and check["passed"] is False and check["value"] < 20
    assert json.loads((tmp_path / "acc.json").read_text())["passed"] is False
    assert "FAIL" in failing.stderr
    passing = run_cli("eval", "accuracy", str(fp32), str(fp32), "--data", str(x_path), "-O", "min_cosine=0.9999",
                      "-O", "max_abs=0", "--json")
    assert passing.returncode == 0, passing.stderr
    assert json.loads(passing.stdout)["data"]["outputs"]["y"]["sqnr_db"] == "inf"


def test_runtime_kernels_mode_is_reported(mlp_pair):
    fp32, qdq, x_path = mlp_pair
    result = run_cli("eval", "accuracy", str(fp32), str(qdq), "--data", str(x_path), "--runtime-kernels", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["mode"] == "onnxruntime int8 kernels"


@pytest.mark.parametrize(("args", "needle"), [
    (("eval", "acuracy"), "did you mean: accuracy"),
    (("eval", "accuracy", "-O", "min_sqnr=y:abc"), "min_sqnr"),
    (("eval", "accuracy", "-O", "min_sqnr=logits:20"), "unknown output 'logits'"),
    (("eval", "accuracy", "-O", "min_sqrn=20"), "did you mean: min_sqnr"),
    (("eval", "accuracy", "-O", "topk=1,x"), "topk"),
    (("eval", "accuracy", "-O", "min_top1=0.5"), "needs labels"),
    (("eval", "accuracy", "-O", "min_sqnr"), "KEY=VALUE"),
    (("eval", "accuracy", "-O", "min_sqnr=nan"), "NaN"),
    (("eval", "accuracy", "-O", "labels=FLOAT_LABELS"), "labels must be integers"),
    (("eval", "accuracy", "-O", "scores=nope"), "unknown output 'nope'"),
    (("eval", "accuracy", "--data", "missing.npy"), "missing.npy"),
    (("eval", "accuracy", "-o", "FP32_PATH"), "would overwrite the input"),
])
def test_bad_input_is_one_line_exit_2(mlp_pair, args, needle, tmp_path):
    fp32, qdq, x_path = mlp_pair
    np.save(tmp_path / "float_labels.npy", np.zeros(64, np.float32))
    name, evaluator, *rest = args
    rest = [arg.replace("FLOAT_LABELS", str(tmp_path / "float_labels.npy")).replace("FP32_PATH", str(fp32))
            for arg in rest]
    data = [] if "--data" in rest else ["--data", str(x_path)]
    result = run_cli(name, evaluator, str(fp32), str(qdq), *data, *rest)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_mismatching_models_and_labels_are_refused(mlp_pair, digits_eval, tmp_path):
    fp32, qdq, x_path = mlp_pair
    digits_fp32 = digits_eval[0]
    with pytest.raises(DataError, match="takes inputs"):
        trtkit.evaluate("accuracy", [fp32, digits_fp32], data=str(x_path))
    np.save(tmp_path / "few.npy", np.zeros(5, np.int64))
    with pytest.raises(DataError, match="5 labels for 64"):
        trtkit.evaluate("accuracy", [fp32, qdq], data=str(x_path), labels=str(tmp_path / "few.npy"))
    with pytest.raises(UnknownNameError):
        trtkit.evaluate("nope", [fp32])
    with pytest.raises(OptionError, match="reference and at least one candidate"):
        trtkit.evaluate("accuracy", [fp32])
    cli = run_cli("eval", "accuracy", str(fp32), str(digits_fp32), "--data", str(x_path))
    assert cli.returncode == 2 and "takes inputs" in cli.stderr


def test_confident_subset_and_custom_metric(digits_eval):
    fp32, qdq, x_path, y_path, x, _ = digits_eval
    result = trtkit.evaluate("accuracy", [fp32, qdq], data=str(x_path), confidence=0.9,
                             metric="eval_helpers:mean_logit_shift", num_samples=100)
    task = result.data["task"]
    ref = run_float(fp32, {"image": x[:100]})["logits"]
    cand = run_float(qdq, {"image": x[:100]})["logits"]
    prob = np.exp(ref - ref.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    confident = prob.max(1) > 0.9
    assert task["confident_fraction"] == pytest.approx(confident.mean())
    assert task["confident_agreement"] == pytest.approx(np.mean(ref.argmax(1)[confident] == cand.argmax(1)[confident]))
    assert task["custom"]["shift"] == pytest.approx(float(np.mean(cand - ref)), abs=1e-5)


def test_results_are_deterministic(mlp_pair, tmp_path):
    fp32, qdq, x_path = mlp_pair
    from trtkit.evaluation import to_json

    first = trtkit.evaluate("accuracy", [fp32, qdq], data=str(x_path), min_cosine="y:0.5")
    second = trtkit.evaluate("accuracy", [fp32, qdq], data=str(x_path), min_cosine={"y": 0.5})
    assert to_json(first.data) == to_json(second.data)
    random_a = trtkit.evaluate("accuracy", [fp32, qdq], num_samples=16, seed=3)
    random_b = trtkit.evaluate("accuracy", [fp32, qdq], num_samples=16, seed=3)
    assert to_json(random_a.data) == to_json(random_b.data) and random_a.data["num_samples"] == 16


# ---- task metrics on real detector-, map- and sigmoid-classifier-shaped ONNX models --------------------------
def _save_model(path, nodes, inputs, outputs, constants):
    """An opset-17 ONNX model; inputs/outputs are (name, shape); `constants` maps initializer name -> value
    (Python floats become float32 scalars, numpy arrays keep their dtype)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v if isinstance(v, np.ndarray) else np.asarray(v, np.float32), k)
         for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _slice(node_name, source, start, stop, axis, target):
    from onnx import helper

    return helper.make_node("Slice", [source, f"{node_name}.starts", f"{node_name}.ends", f"{node_name}.axes"],
                            [target], name=node_name)


def _slice_constants(node_name, start, stop, axis):
    return {f"{node_name}.starts": np.array([start], np.int64), f"{node_name}.ends": np.array([stop], np.int64),
            f"{node_name}.axes": np.array([axis], np.int64)}


# YOLOv8-shaped: x [N, 8, A] -> Concat(boxes = |x[:, :4]| * gain + bias, Sigmoid(x[:, 4:] * s + t)) on axis 1
YOLO_REF = {"gain": 10.0, "bias": 2.0, "s": 3.0, "t": 0.0}
YOLO_CAND = {"gain": 10.3, "bias": 2.1, "s": 3.15, "t": 0.4}


def _yolov8_onnx(path, c):
    from onnx import helper

    nodes = [_slice("box_slice", "x", 0, 4, 1, "xb"), _slice("score_slice", "x", 4, 8, 1, "xs"),
             helper.make_node("Abs", ["xb"], ["xb_abs"]), helper.make_node("Mul", ["xb_abs", "gain"], ["xb_g"]),
             helper.make_node("Add", ["xb_g", "bias"], ["boxes"]), helper.make_node("Mul", ["xs", "s"], ["xs_s"]),
             helper.make_node("Add", ["xs_s", "t"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["scores"], name="score_sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1)]
    ints = {**_slice_constants("box_slice", 0, 4, 1), **_slice_constants("score_slice", 4, 8, 1)}
    return _save_model(path, nodes, [("x", ["batch", 8, 64])], [("output0", ["batch", 8, 64])], {**c, **ints})


def _yolov8_expected(x, c):
    boxes = np.abs(x[:, :4].astype(np.float64)) * c["gain"] + c["bias"]
    scores = 1 / (1 + np.exp(-(x[:, 4:].astype(np.float64) * c["s"] + c["t"])))
    return np.moveaxis(boxes, 1, -1), np.moveaxis(scores, 1, -1)  # [N, A, 4], [N, A, C]


def _iou_of_sets(ref_mask, got_mask):
    a = set(zip(*np.nonzero(ref_mask), strict=True))
    b = set(zip(*np.nonzero(got_mask), strict=True))
    return len(a & b) / len(a | b)


def _cxcywh_iou(a, b):
    """IoU of [K, 4] centre-size boxes, written out coordinate by coordinate."""
    left = np.maximum(a[:, 0] - a[:, 2] / 2, b[:, 0] - b[:, 2] / 2)
    right = np.minimum(a[:, 0] + a[:, 2] / 2, b[:, 0] + b[:, 2] / 2)
    top = np.maximum(a[:, 1] - a[:, 3] / 2, b[:, 1] - b[:, 3] / 2)
    bottom = np.minimum(a[:, 1] + a[:, 3] / 2, b[:, 1] + b[:, 3] / 2)
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)


@pytest.fixture(scope="session")
def yolov8_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("yolov8")
    x = np.random.default_rng(11).normal(-0.3, 0.6, (16, 8, 64)).astype(np.float32)
    np.save(folder / "x.npy", x)
    return (_yolov8_onnx(folder / "det.onnx", YOLO_REF), _yolov8_onnx(folder / "det.perturbed.onnx", YOLO_CAND),
            folder / "x.npy", x)


YOLO_SPECS = ["positives output=output0 axis=1 start=4 threshold=0.25",
              "boxes output=output0 axis=1 start=0 format=cxcywh"]


def test_detection_positives_and_boxes_match_independent_numpy(yolov8_pair):
    ref_path, cand_path, x_path, x = yolov8_pair
    result = trtkit.evaluate("accuracy", [ref_path, cand_path], data=str(x_path), task_metrics=YOLO_SPECS,
                             min_positive_iou=0.5, max_box_mae={"output0": 1.0})
    ref_boxes, ref_scores = _yolov8_expected(x, YOLO_REF)
    cand_boxes, cand_scores = _yolov8_expected(x, YOLO_CAND)
    ref_pos, cand_pos = ref_scores > 0.25, cand_scores > 0.25
    positives = result.data["task_metrics"]["positives"]["output0"]
    expected_iou = _iou_of_sets(ref_pos, cand_pos)
    assert 0.5 < expected_iou < 0.99  # the perturbation moves the set, the test can tell
    assert positives["positive_iou"] == pytest.approx(expected_iou, abs=1e-12)
    assert positives["anchor_iou"] == pytest.approx(_iou_of_sets(ref_pos.any(-1), cand_pos.any(-1)), abs=1e-12)
    assert positives["reference_positives"] == ref_pos.sum() and positives["candidate_positives"] == cand_pos.sum()
    assert positives["activation"] == {"reference": "none", "candidate": "none"}  # probabilities: no sigmoid
    both = ref_pos.any(-1) & cand_pos.any(-1)
    boxes = result.data["task_metrics"]["boxes"]["output0"]
    assert boxes["matched"] == both.sum()
    assert boxes["box_mae"] == pytest.approx(np.abs(ref_boxes[both] - cand_boxes[both]).mean(), rel=1e-5)
    assert boxes["box_iou"] == pytest.approx(_cxcywh_iou(ref_boxes[both], cand_boxes[both]).mean(), rel=1e-5)
    checks = {c["metric"]: c for c in result.data["checks"]}
    assert checks["positive_iou"]["output"] == "output0" and checks["positive_iou"]["passed"]
    assert checks["box_mae"]["op"] == "<=" and checks["box_mae"]["passed"]
    assert result.passed
    failing = trtkit.evaluate("accuracy", [ref_path, cand_path], data=str(x_path), task_metrics=YOLO_SPECS,
                              min_positive_iou=0.99)
    assert not failing.passed and failing.data["checks"][0]["value"] == pytest.approx(expected_iou)
    assert "positives output0: IoU" in failing.summary


def test_remove_sigmoid_records_give_each_model_its_activation(yolov8_pair, tmp_path):
    from trtkit.optimizing import optimize

    ref_path, cand_path, x_path, x = yolov8_pair
    logits_path = tmp_path / "det.perturbed.logits.onnx"
    optimize(str(cand_path), [("remove-sigmoid", {"threshold": 0.25})], output=str(logits_path))
    # the reference keeps its Sigmoid; the candidate outputs logits and says so in its metadata
    result = trtkit.evaluate("accuracy", [ref_path, logits_path], data=str(x_path), task_metrics=YOLO_SPECS[:1])
    positives = result.data["task_metrics"]["positives"]["output0"]
    assert positives["activation"] == {"reference": "none", "candidate": "sigmoid"}
    _, ref_scores = _yolov8_expected(x, YOLO_REF)
    _, cand_scores = _yolov8_expected(x, YOLO_CAND)
    assert positives["positive_iou"] == pytest.approx(_iou_of_sets(ref_scores > 0.25, cand_scores > 0.25))
    # told that the scores are already probabilities, the logits are thresholded raw: a different answer
    raw = trtkit.evaluate("accuracy", [ref_path, logits_path], data=str(x_path),
                          task_metrics=[YOLO_SPECS[0] + " activation=none"])
    assert raw.data["task_metrics"]["positives"]["output0"]["positive_iou"] != pytest.approx(
        positives["positive_iou"])


# YOLOX-shaped: x [N, A, 8] -> Concat(boxes, Sigmoid(2 x[..., 4:5]) objectness, Sigmoid(3 x[..., 5:])) on axis 2
def _yolox_onnx(path, s):
    from onnx import helper

    nodes = [_slice("box_slice", "x", 0, 4, 2, "xb"), _slice("obj_slice", "x", 4, 5, 2, "xo"),
             _slice("cls_slice", "x", 5, 8, 2, "xc"), helper.make_node("Abs", ["xb"], ["boxes"]),
             helper.make_node("Mul", ["xo", "two"], ["xo2"]), helper.make_node("Sigmoid", ["xo2"], ["obj"]),
             helper.make_node("Mul", ["xc", "s"], ["xcs"]), helper.make_node("Sigmoid", ["xcs"], ["cls"]),
             helper.make_node("Concat", ["boxes", "obj", "cls"], ["det"], axis=2)]
    ints = {**_slice_constants("box_slice", 0, 4, 2), **_slice_constants("obj_slice", 4, 5, 2),
            **_slice_constants("cls_slice", 5, 8, 2)}
    return _save_model(path, nodes, [("x", ["batch", 40, 8])], [("det", ["batch", 40, 8])],
                       {"two": 2.0, "s": s, **ints})


def test_yolox_objectness_times_class_scores(tmp_path):
    x = np.random.default_rng(12).normal(0, 1, (8, 40, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref, cand = _yolox_onnx(tmp_path / "ref.onnx", 3.0), _yolox_onnx(tmp_path / "cand.onnx", 3.3)
    result = trtkit.evaluate("accuracy", [ref, cand], data=str(tmp_path / "x.npy"),
                             task_metrics="positives output=det start=5 objectness=4 threshold=0.3")
    x64 = x.astype(np.float64)
    obj = 1 / (1 + np.exp(-2 * x64[..., 4:5]))
    ref_score = obj / (1 + np.exp(-3.0 * x64[..., 5:]))
    cand_score = obj / (1 + np.exp(-3.3 * x64[..., 5:]))
    found = result.data["task_metrics"]["positives"]["det"]
    expected = _iou_of_sets(ref_score > 0.3, cand_score > 0.3)
    assert 0.3 < expected < 1.0
    assert found["positive_iou"] == pytest.approx(expected, abs=1e-12)
    assert found["settings"]["objectness"] == 4


# DB-style probability map: x [N, 1, 12, 12] -> Sigmoid(x * a + b)
def _map_onnx(path, a, b):
    from onnx import helper

    nodes = [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Add", ["xa", "b"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["prob"])]
    return _save_model(path, nodes, [("x", ["batch", 1, 12, 12])], [("prob", ["batch", 1, 12, 12])],
                       {"a": a, "b": b})


def test_map_iou_and_sqnr_with_gates(tmp_path):
    x = np.random.default_rng(13).normal(0, 1, (6, 1, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref, cand = _map_onnx(tmp_path / "ref.onnx", 4.0, 0.0), _map_onnx(tmp_path / "cand.onnx", 4.4, 0.3)
    result = trtkit.evaluate("accuracy", [ref, cand], data=str(tmp_path / "x.npy"),
                             task_metrics=["map output=prob threshold=0.3"], min_map_iou=0.5, min_map_sqnr=40)
    p_ref = 1 / (1 + np.exp(-4.0 * x.astype(np.float64)))
    p_cand = 1 / (1 + np.exp(-(4.4 * x.astype(np.float64) + 0.3)))
    found = result.data["task_metrics"]["map"]["prob"]
    assert found["map_iou"] == pytest.approx(_iou_of_sets(p_ref > 0.3, p_cand > 0.3), abs=1e-12)
    assert found["map_sqnr_db"] == pytest.approx(10 * np.log10(np.sum(p_ref**2) / np.sum((p_cand - p_ref) ** 2)),
                                                 rel=1e-4)
    verdicts = {c["metric"]: c["passed"] for c in result.data["checks"]}
    assert verdicts == {"map_iou": True, "map_sqnr_db": False} and not result.passed


# Multi-label classifier ending in a Sigmoid: x [N, 16] -> Sigmoid(x W)
def _sigmoid_classifier(path, weight):
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["scores"])]
    return _save_model(path, nodes, [("x", ["batch", 16])], [("scores", ["batch", 6])],
                       {"w": weight.astype(np.float32)})


def test_confident_subset_of_sigmoid_outputs_and_removed_sigmoid_logits(tmp_path):
    from trtkit.optimizing import optimize

    rng = np.random.default_rng(14)
    weight = rng.normal(0, 0.5, (16, 6))
    x = rng.normal(0, 1, (128, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref = _sigmoid_classifier(tmp_path / "ref.onnx", weight)
    cand = _sigmoid_classifier(tmp_path / "cand.onnx", weight + rng.normal(0, 0.15, weight.shape))
    z_ref = x.astype(np.float64) @ weight.astype(np.float32).astype(np.float64)
    z_cand = run_float(cand, {"x": x})["scores"]
    confident = 1 / (1 + np.exp(-z_ref.max(1))) > 0.9
    same = z_ref.argmax(1) == z_cand.argmax(1)
    assert 0.1 < confident.mean() < 0.95 and not same.all()
    task = trtkit.evaluate("accuracy", [ref, cand], data=str(tmp_path / "x.npy"), confidence=0.9).data["task"]
    assert task["scores_kind"] == "sigmoid"
    assert task["confident_fraction"] == pytest.approx(confident.mean())
    assert task["confident_agreement"] == pytest.approx(same[confident].mean())
    # Sigmoids removed from both: logits, recognised from the reference's remove-sigmoid record
    paths = []
    for path in (ref, cand):
        paths.append(tmp_path / f"{path.stem}.logits.onnx")
        optimize(str(path), ["remove-sigmoid"], output=str(paths[-1]))
    logits = trtkit.evaluate("accuracy", paths, data=str(tmp_path / "x.npy"), confidence=0.9).data["task"]
    assert logits["scores_kind"] == "sigmoid_logits"
    assert logits["confident_fraction"] == pytest.approx(confident.mean())
    # forcing softmax on those logits picks another subset: the kind matters
    forced = trtkit.evaluate("accuracy", paths, data=str(tmp_path / "x.npy"), confidence=0.9,
                             scores_kind="logits").data["task"]
    assert forced["confident_fraction"] != pytest.approx(confident.mean())


def test_task_metric_gates_from_the_cli_and_json(yolov8_pair):
    ref_path, cand_path, x_path, _ = yolov8_pair
    result = run_cli("eval", "accuracy", str(ref_path), str(cand_path), "--data", str(x_path),
                     "-O", "task_metrics=" + ", ".join(YOLO_SPECS), "-O", "min_positive_iou=output0:0.99",
                     "-O", "min_box_iou=0.5", "--json")
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)["data"]
    positives = data["task_metrics"]["positives"]["output0"]
    assert positives["settings"] == {"axis": 1, "start": 4, "stop": None, "threshold": 0.25, "activation": "auto",
                                     "objectness": None}
    verdicts = {c["metric"]: (c["passed"], c["value"]) for c in data["checks"]}
    assert verdicts["positive_iou"] == (False, positives["positive_iou"])
    assert verdicts["box_iou"] == (True, data["task_metrics"]["boxes"]["output0"]["box_iou"])
    assert "positive_iou" in result.stderr and "FAIL" in result.stderr


@pytest.mark.parametrize(("options", "needle"), [
    (["task_metrics=positive output=output0"], "unknown task metric kind 'positive' (did you mean: positives?)"),
    (["task_metrics=positives output=output0 axis=x"], "axis must be an integer"),
    (["task_metrics=positives output=nope"], "unknown output 'nope'"),
    (["task_metrics=positives output=output0 thresold=0.3"], "did you mean: threshold"),
    (["task_metrics=boxes output=output0 axis=1"], "needs positives=NAME"),
    (["min_positive_iou=0.9"], "option 'min_positive_iou' needs a positives task metric"),
    (["task_metrics=positives output=output0 axis=1 start=4", "min_positive_iou=other:0.9"], "unknown output 'other'"),
    (["task_metrics=positives output=output0 axis=1 start=4", "min_positive_iou=abc"], "min_positive_iou"),
    (["task_metrics=positives output=output0 axis=2 start=4 stop=99"], "channels 4:99 are outside axis 2"),
    (["scores_kind=softmax"], "scores_kind' must be one of"),
])
def test_bad_task_metric_options_are_one_line_exit_2(yolov8_pair, options, needle):
    ref_path, cand_path, x_path, _ = yolov8_pair
    flags = [arg for option in options for arg in ("-O", option)]
    result = run_cli("eval", "accuracy", str(ref_path), str(cand_path), "--data", str(x_path), *flags)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_task_metric_flag(yolov8_pair, tmp_path):
    ref_path, cand_path, x_path, _ = yolov8_pair
    flags = [arg for spec in YOLO_SPECS for arg in ("--task-metric", spec)]
    result = run_cli("eval", "accuracy", str(ref_path), str(cand_path), "--data", str(x_path), *flags,
                     "-O", "max_box_mae=1", "--json", "-o", str(tmp_path / "result.json"))
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "result.json").read_text())
    assert written == json.loads(result.stdout)
    assert set(written["data"]["task_metrics"]) == {"positives", "boxes"}
    assert "positives output0: IoU" in result.stderr and "boxes output0: mean IoU" in result.stderr
    both = run_cli("eval", "accuracy", str(ref_path), str(cand_path), "--data", str(x_path), *flags[:2],
                   "-O", "task_metrics=" + YOLO_SPECS[0])
    assert both.returncode == 2 and "not both" in both.stderr
    bad = run_cli("eval", "accuracy", str(ref_path), str(cand_path), "--data", str(x_path),
                  "--task-metric", "positives output=output0 axis=1 start=4 threshold=high")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "threshold must be a number" in bad.stderr
