"""trtkit.metrics against independent computations (sklearn, sorting, explicit definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trtkit import metrics
from trtkit.errors import OptionError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(2, 64), elements=finite), st.integers(0, 2**31 - 1))
def test_cosine_and_sqnr_match_definitions(ref, seed):
    noise = np.random.default_rng(seed).normal(0, 0.1, ref.shape).astype(np.float32)
    cand = ref + noise
    from sklearn.metrics.pairwise import cosine_similarity

    a, b = ref.astype(np.float64), cand.astype(np.float64)
    # sklearn treats norms below machine epsilon as zero; compare where both norms are meaningful.
    if np.linalg.norm(a) > 1e-6 and np.linalg.norm(b) > 1e-6:
        expected = cosine_similarity(a[None], b[None])[0, 0]
        assert metrics.cosine(ref, cand) == pytest.approx(expected, abs=1e-9)
    signal_power = np.mean(a**2)
    noise_power = np.mean((b - a) ** 2)
    if noise_power > 0 and signal_power > 0:
        assert metrics.sqnr_db(ref, cand) == pytest.approx(10 * math.log10(signal_power / noise_power), rel=1e-9)


def test_sqnr_edge_cases_and_known_value():
    x = np.ones(100)
    assert metrics.sqnr_db(x, x) == math.inf
    # noise power 1/100 of signal power -> exactly 20 dB
    assert metrics.sqnr_db(x, x + 0.1) == pytest.approx(20.0)
    assert metrics.cosine(np.zeros(4), np.zeros(4)) == 1.0
    assert metrics.cosine(np.zeros(4), np.ones(4)) == 0.0
    assert metrics.cosine(x, -x) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sqnr_db(np.ones(3), np.ones(4))


def test_error_stats_against_sorted_definition():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(7, 13))
    ref[0, 0] = 0.0  # excluded from relative error
    cand = ref + rng.normal(scale=0.05, size=ref.shape)
    stats = metrics.error_stats(ref, cand)
    diff = sorted(abs(c - r) for r, c in zip(ref.ravel().tolist(), cand.ravel().tolist(), strict=True))
    assert stats["max_abs"] == pytest.approx(diff[-1])
    assert stats["mean_abs"] == pytest.approx(sum(diff) / len(diff))
    # median of 91 values is the 46th smallest
    assert stats["p50_abs"] == pytest.approx(diff[45])
    rel = [abs(c - r) / abs(r) for r, c in zip(ref.ravel().tolist(), cand.ravel().tolist(), strict=True) if r != 0]
    assert stats["max_rel"] == pytest.approx(max(rel))
    assert stats["mean_rel"] == pytest.approx(sum(rel) / len(rel))
    assert set(stats) >= {"p90_abs", "p99_abs", "p99.9_abs"}


def test_topk_accuracy_against_argsort():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(200, 10))
    labels = rng.integers(0, 10, size=200)
    for k in (1, 3, 5):
        top = np.argsort(-scores, axis=1)[:, :k]
        expected = np.mean([labels[i] in top[i] for i in range(200)])
        assert metrics.topk_accuracy(scores, labels, k) == pytest.approx(expected)
    assert metrics.topk_accuracy(scores, labels, 10) == 1.0
    with pytest.raises(ValueError, match="labels"):
        metrics.topk_accuracy(scores, labels[:10])


def test_top1_agreement_confident_subset():
    rng = np.random.default_rng(3)
    ref = rng.normal(scale=3.0, size=(300, 5))
    cand = ref + rng.normal(scale=0.8, size=ref.shape)
    result = metrics.top1_agreement(ref, cand, confidence=0.5)
    exp = np.exp(ref - ref.max(axis=1, keepdims=True))
    prob = exp / exp.sum(axis=1, keepdims=True)
    confident = prob.max(axis=1) > 0.5
    same = ref.argmax(1) == cand.argmax(1)
    assert result["agreement"] == pytest.approx(same.mean())
    assert result["confident_agreement"] == pytest.approx(same[confident].mean())
    assert result["confident_fraction"] == pytest.approx(confident.mean())
    # Flips concentrate where the reference is unsure.
    assert result["confident_agreement"] > result["agreement"]
    # Probabilities are recognised as such (not softmaxed twice).
    assert np.allclose(metrics.probabilities(prob), prob)


def test_latency_stats():
    seconds = np.linspace(0.001, 0.002, 101)
    stats = metrics.latency_stats(seconds)
    assert stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(2.0)
    assert stats["median_ms"] == pytest.approx(1.5)
    assert stats["p90_ms"] == pytest.approx(1.9)
    assert stats["cov"] == pytest.approx(np.std(seconds) / np.mean(seconds))


# ---- task metrics ------------------------------------------------------------------------------------------
def _set_iou(ref_mask, got_mask):
    """Jaccard index from Python sets of flat indices (independent of numpy's boolean algebra)."""
    a = {i for i, v in enumerate(np.asarray(ref_mask).ravel().tolist()) if v}
    b = {i for i, v in enumerate(np.asarray(got_mask).ravel().tolist()) if v}
    return len(a & b) / len(a | b) if a | b else 1.0


def test_positive_and_map_iou_against_sets():
    ref = np.array([[0.9, 0.1, 0.3], [0.26, 0.24, 0.8]])
    got = np.array([[0.8, 0.3, 0.2], [0.2, 0.24, 0.7]])
    # ref positives (> 0.25): {0, 2, 3, 5}; got: {0, 1, 5}; common {0, 5}, union {0, 1, 2, 3, 5}
    assert metrics.positive_iou(ref, got, 0.25) == pytest.approx(2 / 5)
    assert metrics.map_iou(ref, got, 0.5) == pytest.approx(2 / 2)  # {0, 5} both
    assert metrics.positive_iou(np.zeros(4), np.zeros(4), 0.25) == 1.0  # no positives anywhere: equal sets
    assert metrics.positive_iou(np.zeros(4), np.ones(4), 0.25) == 0.0
    rng = np.random.default_rng(4)
    ref, got = rng.random((3, 40, 7)), rng.random((3, 40, 7))
    assert metrics.positive_iou(ref, got, 0.6) == pytest.approx(_set_iou(ref > 0.6, got > 0.6))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.positive_iou(np.ones(3), np.ones(4))


def test_box_iou_and_error_known_values():
    ref = np.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    got = np.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0], [7.0, 7.0, 8.0, 8.0]])
    # overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1); identical; disjoint
    assert metrics.box_iou(ref, got, "xyxy").tolist() == pytest.approx([1 / 7, 1.0, 0.0])
    centre = np.stack([(ref[:, 0] + ref[:, 2]) / 2, (ref[:, 1] + ref[:, 3]) / 2, ref[:, 2] - ref[:, 0],
                       ref[:, 3] - ref[:, 1]], axis=1)
    centre_got = np.stack([(got[:, 0] + got[:, 2]) / 2, (got[:, 1] + got[:, 3]) / 2, got[:, 2] - got[:, 0],
                           got[:, 3] - got[:, 1]], axis=1)
    assert metrics.box_iou(centre, centre_got, "cxcywh").tolist() == pytest.approx([1 / 7, 1.0, 0.0])
    error = metrics.box_error(ref, got, mask=np.array([True, True, False]), box_format="xyxy")
    assert error["matched"] == 2
    assert error["box_mae"] == pytest.approx((1 + 1 + 1 + 1 + 0 + 0 + 0 + 0) / 8)
    assert error["box_iou"] == pytest.approx((1 / 7 + 1.0) / 2)
    nothing = metrics.box_error(ref, got, mask=np.zeros(3, bool), box_format="xyxy")
    assert nothing["matched"] == 0 and math.isnan(nothing["box_iou"])
    with pytest.raises(ValueError, match="box format"):
        metrics.box_iou(ref, got, "xywh")


def test_channel_slice_moves_the_axis_last():
    x = np.arange(2 * 6 * 5).reshape(2, 6, 5)
    scores = metrics.channel_slice(x, 1, 4)
    assert scores.shape == (2, 5, 2)
    assert scores[1, 3, 0] == x[1, 4, 3] and scores[0, 2, 1] == x[0, 5, 2]
    assert metrics.channel_slice(x, -1, 1, 3).tolist() == x[:, :, 1:3].tolist()
    with pytest.raises(ValueError, match="outside axis 1 of size 6"):
        metrics.channel_slice(x, 1, 4, 9)
    with pytest.raises(ValueError, match="axis 3"):
        metrics.channel_slice(x, 3)


def test_score_kinds_and_the_confident_subset_of_sigmoid_scores():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=3.0, size=(200, 6))
    exp = np.exp(logits - logits.max(1, keepdims=True))
    softmax = exp / exp.sum(1, keepdims=True)
    sig = 1 / (1 + np.exp(-logits))
    assert metrics.score_kind(logits) == "logits"
    assert metrics.score_kind(softmax) == "probabilities"
    assert metrics.score_kind(sig) == "sigmoid"
    cand = logits + rng.normal(scale=0.8, size=logits.shape)
    cand_sig = 1 / (1 + np.exp(-cand))
    same = logits.argmax(1) == cand.argmax(1)
    # Sigmoid scores: the confidence is the top score itself, not a softmax of the scores.
    result = metrics.top1_agreement(sig, cand_sig, confidence=0.5)
    confident = sig.max(1) > 0.5
    assert result["scores_kind"] == "sigmoid"
    assert result["confident_fraction"] == pytest.approx(confident.mean())
    assert result["confident_agreement"] == pytest.approx(same[confident].mean())
    # Logits of a removed Sigmoid (told, not guessable): the same subset as the sigmoid scores.
    told = metrics.top1_agreement(logits, cand, confidence=0.5, kind="sigmoid_logits")
    assert told["confident_fraction"] == pytest.approx(confident.mean())
    guessed = metrics.top1_agreement(logits, cand, confidence=0.5)
    assert guessed["scores_kind"] == "logits"
    assert guessed["confident_fraction"] == pytest.approx(np.mean(softmax.max(1) > 0.5))


def _yolov8(rng, anchors=30, classes=3):
    """[N, 4+C, anchors]: boxes cx,cy,w,h then class logits."""
    boxes = rng.uniform(5, 50, size=(2, 4, anchors))
    logits = rng.normal(-1.0, 2.0, size=(2, classes, anchors))
    return np.concatenate([boxes, logits], axis=1)


def test_measure_positives_and_boxes_on_a_yolov8_layout():
    rng = np.random.default_rng(6)
    ref = _yolov8(rng)
    cand = ref + rng.normal(scale=0.3, size=ref.shape)
    specs = ["positives output=det axis=1 start=4 threshold=0.25", "boxes output=det axis=1 start=0"]
    found = metrics.measure_task_metrics(metrics.parse_task_metrics(specs, ["det"]), {"det": ref}, {"det": cand})
    positives = found["positives"]["det"]
    # logits (outside [0, 1]) -> sigmoid; sigmoid(x) > 0.25 <=> x > ln(1/3)
    cut = math.log(0.25 / 0.75)
    ref_pos, cand_pos = ref[:, 4:] > cut, cand[:, 4:] > cut
    assert positives["activation"] == {"reference": "sigmoid", "candidate": "sigmoid"}
    assert positives["positive_iou"] == pytest.approx(_set_iou(ref_pos, cand_pos))
    ref_anchor, cand_anchor = ref_pos.any(1), cand_pos.any(1)
    assert positives["anchor_iou"] == pytest.approx(_set_iou(ref_anchor, cand_anchor))
    assert positives["reference_positives"] == ref_pos.sum()
    ref_scores, cand_scores = 1 / (1 + np.exp(-ref[:, 4:])), 1 / (1 + np.exp(-cand[:, 4:]))
    noise = np.sum((ref_scores - cand_scores) ** 2)
    assert positives["score_sqnr_db"] == pytest.approx(10 * np.log10(np.sum(ref_scores ** 2) / noise))
    boxes = found["boxes"]["det"]
    both = ref_anchor & cand_anchor
    ref_boxes = np.moveaxis(ref[:, :4], 1, -1)[both]
    cand_boxes = np.moveaxis(cand[:, :4], 1, -1)[both]
    assert boxes["matched"] == both.sum()
    assert boxes["box_mae"] == pytest.approx(np.abs(ref_boxes - cand_boxes).mean())
    assert boxes["box_iou"] == pytest.approx(metrics.box_iou(ref_boxes, cand_boxes).mean())
    assert boxes["settings"]["positives"] == "det"


def test_remove_sigmoid_record_decides_the_activation_per_model():
    rng = np.random.default_rng(7)
    logits = _yolov8(rng)
    probabilities = logits.copy()
    probabilities[:, 4:] = 1 / (1 + np.exp(-logits[:, 4:]))
    record = {"det": {"elements": 180, "of": 420, "axis": -2, "channels": [4, 5, 6]}}
    metric = metrics.parse_task_metrics(["positives output=det axis=1 start=4"], ["det"])
    # reference with its Sigmoid, candidate with it removed: each model gets its own activation -> same sets
    found = metrics.measure_task_metrics(metric, {"det": probabilities}, {"det": logits}, candidate_logits=record)
    assert found["positives"]["det"]["activation"] == {"reference": "none", "candidate": "sigmoid"}
    assert found["positives"]["det"]["positive_iou"] == 1.0
    # a record on other channels (the boxes) does not make the scores logits
    boxes_only = {"det": {"elements": 240, "of": 420, "axis": -2, "channels": [0, 1, 2, 3]}}
    assert not metrics.record_covers(boxes_only, metric[0], logits.shape)
    assert metrics.record_covers(record, metric[0], logits.shape)


def test_objectness_multiplies_the_class_scores():
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(1, 25, 8))  # YOLOX: [N, anchors, 4 box + 1 objectness + 3 classes], logits
    cand = ref + rng.normal(scale=0.4, size=ref.shape)
    metric = metrics.parse_task_metrics(["positives output=o start=5 objectness=4 threshold=0.3"], ["o"])
    found = metrics.measure_task_metrics(metric, {"o": ref}, {"o": cand})["positives"]["o"]

    def score(x):
        return (1 / (1 + np.exp(-x[..., 5:]))) * (1 / (1 + np.exp(-x[..., 4:5])))

    assert found["positive_iou"] == pytest.approx(_set_iou(score(ref) > 0.3, score(cand) > 0.3))


def test_map_metric():
    rng = np.random.default_rng(9)
    ref = rng.random((2, 1, 16, 16))
    cand = np.clip(ref + rng.normal(scale=0.05, size=ref.shape), 0, 1)
    found = metrics.measure_task_metrics(metrics.parse_task_metrics(["map threshold=0.3"], ["prob"]),
                                         {"prob": ref}, {"prob": cand})["map"]["prob"]
    assert found["activation"]["reference"] == "none"
    assert found["map_iou"] == pytest.approx(_set_iou(ref > 0.3, cand > 0.3))
    assert found["map_sqnr_db"] == pytest.approx(10 * math.log10(np.sum(ref**2) / np.sum((cand - ref) ** 2)))


@pytest.mark.parametrize(("spec", "needle"), [
    ("positive output=o", "unknown task metric kind 'positive' (did you mean: positives?)"),
    ("positives output=o treshold=0.3", "did you mean: threshold"),
    ("positives output=o axis=one", "axis must be an integer"),
    ("positives output=o threshold=x", "threshold must be a number"),
    ("positives output=o activation=softmax", "activation must be one of"),
    ("positives output=nope", "unknown output 'nope'"),
    ("positives axis=1", "name the output"),
    ("boxes output=o start=0 stop=5", "boxes need 4 channels"),
    ("boxes output=o format=xywh", "format must be one of"),
    ("boxes output=o", "needs positives=NAME"),
    ("positives output=o start=4 stop=2", "stop must be > start"),
    ("positives output=o start=4 objectness=5", "objectness channel 5"),
    ("positives output=o axis", "'axis' is not key=value"),
])
def test_bad_task_metric_specs(spec, needle):
    with pytest.raises(OptionError, match="option 'task_metrics'") as caught:
        metrics.parse_task_metrics([spec], ["o", "p"])
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_duplicate_names_and_mapping_specs():
    with pytest.raises(OptionError, match="two positives metrics are called 'o'"):
        metrics.parse_task_metrics(["positives output=o", "positives output=o threshold=0.5"], ["o"])
    parsed = metrics.parse_task_metrics([{"kind": "positives", "output": "o", "axis": 1, "start": 4},
                                         "positives output=o threshold=0.5 name=strict"], ["o"])
    assert [(m.name, m.axis, m.start, m.threshold) for m in parsed] == [("o", 1, 4, 0.25), ("strict", -1, 0, 0.5)]
