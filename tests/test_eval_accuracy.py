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
    assert failing.returncode == 3, failing.stderr
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
