"""INT8 baselines on the real-model zoo (benchmarks/zoo.py): trtkit's pipeline against ONNX Runtime's
quantize_static, same calibration and evaluation data for every method, one run.

    python -m benchmarks.bench_real --json real.json                 # every zoo model
    python -m benchmarks.bench_real --models effnet-lite1 --json r.json --calib-limit 64 --eval-limit 64

For each zoo model:
- FP32 reference: the zoo ONNX file on onnxruntime (CPU), over the evaluation set.
- trtkit: `trtkit optimize` once, then `trtkit calibrate` (the default method, and -m entropy / minmax / mse /
  percentile; a method equal to the default is not run twice) and `trtkit quantize`, all through the CLI
  in subprocesses (the internals are being reorganised; the CLI is the stable surface).
- ONNX Runtime quantize_static MinMax / Entropy / Percentile with TensorRT-compatible settings: QDQ format,
  QInt8 activations and weights, symmetric both (ActivationSymmetric, WeightSymmetric), per-channel
  weights, after quant_pre_process, every other option at its default (when the file it writes for an
  older-opset model is refused by onnxruntime itself - per-channel DequantizeLinear needs opset 13 - the
  model is upgraded to opset 13 and quantized again, and the row says so); calibration collected in chunks of
  16 samples through ORT's own CalibStridedMinMax option (its calibrators otherwise keep every intermediate
  tensor of every sample in memory). Run in a subprocess of this script, so time and peak RSS are its own.
- Every INT8 model is judged with Q/DQ emulated in float (onnxruntime session config
  session.disable_quant_qdq = 1), which is what TensorRT computes, not with onnxruntime's fused int8 CPU
  kernels (they saturate on CPUs without VNNI). Metrics, pooled over the evaluation set:
  - every output: SQNR (dB) against FP32;
  - classifiers: top-1 agreement with FP32, on all samples and where FP32's top-1 probability > 0.5;
  - detectors: IoU of the FP32 positive anchors (score > 0.25) with the INT8 positive anchors, box error
    (mean |d| in pixels of cx, cy, w, h over the FP32 positives) and score SQNR;
  - probability maps: pixel IoU at 0.3, map SQNR;
  - sentence encoder: cosine of the sentence embeddings (mean, min), SQNR of the token states of real tokens.
- Whether TensorRT-RTX's parser takes the QDQ file (`trtkit build --builder tensorrt-rtx --check`), and,
  with --build, whether it builds an engine (needs a GPU).

Prints the machine, the date and a markdown table; --json writes everything (per-step seconds, peak RSS of
each subprocess in MiB, errors).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import zoo

TRTKIT_METHODS = ("entropy", "minmax", "mse", "percentile")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
# What a user of each kind of head tells `trtkit quantize --data` matters (--task-metric: the decisions are
# judged by it), and what `--target` is asked to hold: issue 14's goals, written as trtkit flags (task knowledge
# shared by every model of a kind, not a per-model constant).
TASK_METRICS: dict[str, list[str]] = {
    "yolov8": ["--task-metric", "positives output=output0 axis=1 start=4 threshold=0.25"],
    "yolox": ["--task-metric", "positives output=output start=5 objectness=4 threshold=0.25"],
    "db": ["--task-metric", "map output=sigmoid_0.tmp_0 threshold=0.3"],
}
TARGETS: dict[str, list[str]] = {
    "imagenet": ["--target", "sqnr>=20"],
    "yolov8": ["--target", "positive_iou>=0.9"],
    "yolox": ["--target", "positive_iou>=0.9"],
    "db": ["--target", "map_iou>=0.9"],
    "sentence": ["--target", "sqnr>=20"],
}
SCORE_THRESHOLD = 0.25
MAP_THRESHOLD = 0.3
CONFIDENT = 0.5
ORT_CHUNK_SAMPLES = 16


# Samples used per model by default (calibration, evaluation): the whole run stays near 20 minutes on the
# 2-core development machine when it is otherwise idle. The zoo holds more; --calib-limit / --eval-limit
# override these for every model.
DEFAULT_SAMPLES: dict[str, tuple[int, int]] = {
    "effnet-lite1": (192, 160), "effnet-lite2": (192, 160), "yolox-ddddocr": (48, 48),
    "yolov8n-nudenet": (96, 96), "ppocr-det": (48, 48), "minilm-l6": (96, 96)}


class StepError(RuntimeError):
    """A CLI step failed; the message is its first useful line."""


# ---- subprocesses with time and peak RSS ---------------------------------------------------------------------
def _trtkit_cmd() -> list[str]:
    script = Path(sys.executable).with_name("trtkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtkit.cli"]


# Peak RSS of a child: Linux's exec carries the peak RSS of the memory image it replaces into ru_maxrss, and
# subprocess starts children with vfork from this (large) process, so wait4 on a direct child reports at least
# this process's own peak. A small launcher forks the real command from itself and reports that grandchild's
# ru_maxrss instead.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\n{sys.argv[0]} {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""
_RSS_MARK = "__peak_rss_kib__"


def run_measured(cmd: Sequence[str], timeout: float = 1800, cwd: Path | None = None) -> tuple[str, float, float]:
    """Run CMD in CWD (default: the repository root) with the repository on PYTHONPATH: (stdout, seconds,
    peak RSS MiB of CMD's process). Raises StepError with the last useful line of its output on failure."""
    start = time.perf_counter()
    root = Path(__file__).resolve().parent.parent
    launcher = [sys.executable, "-c", _LAUNCHER.replace("sys.argv[0]", repr(_RSS_MARK)), *cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd or root, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise StepError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:3])}") from None
    seconds = time.perf_counter() - start
    marks = [line for line in err.splitlines() if line.startswith(_RSS_MARK)]
    peak = round(int(marks[-1].split()[1]) / 1024.0, 1) if marks else float("nan")  # Linux: KiB
    err = "\n".join(line for line in err.splitlines() if not line.startswith(_RSS_MARK))
    if proc.returncode != 0:
        lines = [line for line in (err or out).strip().splitlines() if line.strip()]
        useful = [line for line in lines if "warn" not in line.lower()] or lines or ["no output"]
        raise StepError(f"exit {proc.returncode}: {useful[-1].strip()[:300]}")
    return out, seconds, peak


def cli_json(args: Sequence[str], timeout: float = 1800) -> tuple[dict[str, Any], float, float]:
    out, seconds, peak = run_measured([*_trtkit_cmd(), *args], timeout)
    start = out.find("{")
    return (json.loads(out[start:]) if start >= 0 else {}), seconds, peak


# ---- running models -------------------------------------------------------------------------------------------
def _feeds(data: dict[str, np.ndarray], input_names: list[str]) -> dict[str, np.ndarray]:
    if "" in data:
        return {input_names[0]: data[""]}
    return {name: data[name] for name in input_names}


def _fixed_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def run_model(path: Path, data: dict[str, np.ndarray], emulate_qdq: bool, batch: int = 16
              ) -> tuple[dict[str, np.ndarray], float]:
    """Outputs of PATH over DATA (name -> array over all samples) and the seconds it took."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if emulate_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = _feeds(data, names)
    total = len(next(iter(feeds.values())))
    step = _fixed_batch(session) or batch
    start = time.perf_counter()
    chunks = [session.run(None, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, total, step)]
    seconds = time.perf_counter() - start
    out_names = [o.name for o in session.get_outputs()]
    return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(out_names)}, seconds


# ---- metrics ---------------------------------------------------------------------------------------------------
def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref64, err = ref.astype(np.float64), ref.astype(np.float64) - test.astype(np.float64)
    signal, noise = float(np.sum(ref64 * ref64)), float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def yolox_decode(out: np.ndarray, size: int = 416) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, A], boxes [N, A, 4] as cx, cy, w, h in pixels) of YOLOX's raw head output [N, A, 6]."""
    grids, strides = [], []
    for step in (8, 16, 32):
        cells = size // step
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full(cells * cells, step))
    grid = np.concatenate(grids).astype(np.float64)
    scale = np.concatenate(strides)[:, None].astype(np.float64)
    xy = (out[..., :2] + grid) * scale
    wh = np.exp(np.clip(out[..., 2:4].astype(np.float64), -20, 20)) * scale
    return out[..., 4] * out[..., 5], np.concatenate([xy, wh], axis=-1)


def detections(head: str, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best score per anchor [N, A], boxes [N, A, 4] in pixels, all class scores) of a detector output."""
    if head == "yolox":
        scores, boxes = yolox_decode(out)
        return scores, boxes, scores
    # YOLOv8: [N, 4 + C, A]
    classes = out[:, 4:, :]
    return classes.max(axis=1), out[:, :4, :].transpose(0, 2, 1), classes


def task_metrics(model: zoo.ZooModel, ref: dict[str, np.ndarray], test: dict[str, np.ndarray],
                 data: dict[str, np.ndarray]) -> dict[str, Any]:
    """The task metrics of TEST against REF (both name -> array over the evaluation set)."""
    names = list(ref)
    test = {name: test.get(name, list(test.values())[i]) for i, name in enumerate(names)}
    result: dict[str, Any] = {"sqnr_db": {name: round(sqnr_db(ref[name], test[name]), 2) for name in names}}
    first_ref, first_test = ref[names[0]], test[names[0]]
    if model.head == "imagenet":
        probs = _softmax(first_ref.astype(np.float64))
        agree = first_ref.argmax(1) == first_test.argmax(1)
        confident = probs.max(1) > CONFIDENT
        result.update(top1_agreement=round(float(agree.mean()), 4),
                      top1_agreement_confident=round(float(agree[confident].mean()), 4) if confident.any() else None,
                      confident_samples=int(confident.sum()), samples=len(agree))
    elif model.head in ("yolox", "yolov8"):
        ref_scores, ref_boxes, ref_classes = detections(model.head, first_ref)
        test_scores, test_boxes, test_classes = detections(model.head, first_test)
        pos_ref, pos_test = ref_scores > SCORE_THRESHOLD, test_scores > SCORE_THRESHOLD
        union = int(np.sum(pos_ref | pos_test))
        result.update(
            positive_iou=round(float(np.sum(pos_ref & pos_test) / union), 4) if union else None,
            fp32_positives=int(pos_ref.sum()), int8_positives=int(pos_test.sum()),
            box_error_px=round(float(np.abs(ref_boxes[pos_ref] - test_boxes[pos_ref]).mean()), 3)
            if pos_ref.any() else None,
            box_sqnr_db=round(sqnr_db(ref_boxes[pos_ref], test_boxes[pos_ref]), 2) if pos_ref.any() else None,
            score_sqnr_db=round(sqnr_db(ref_classes, test_classes), 2))
    elif model.head == "db":
        a, b = first_ref > MAP_THRESHOLD, first_test > MAP_THRESHOLD
        union = int(np.sum(a | b))
        result.update(map_iou=round(float(np.sum(a & b) / union), 4) if union else None,
                      map_sqnr_db=round(sqnr_db(first_ref, first_test), 2), fp32_text_pixels=float(a.mean()))
    elif model.head == "sentence":
        emb_ref, emb_test = ref["sentence_embedding"].astype(np.float64), test["sentence_embedding"].astype(np.float64)
        cos = np.sum(emb_ref * emb_test, 1) / (np.linalg.norm(emb_ref, axis=1) * np.linalg.norm(emb_test, axis=1))
        mask = data["attention_mask"].astype(bool)
        result.update(embedding_cosine_mean=round(float(cos.mean()), 5), embedding_cosine_min=round(float(cos.min()), 5),
                      token_sqnr_db=round(sqnr_db(ref["last_hidden_state"][mask], test["last_hidden_state"][mask]), 2))
    return result


def headline(model: zoo.ZooModel, metrics: dict[str, Any]) -> str:
    """The task metric(s) in a few words, for the table."""
    def fmt(value: Any, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    if model.head == "imagenet":
        return (f"top-1 {fmt(metrics.get('top1_agreement'), '{:.1%}')}, "
                f"conf>0.5 {fmt(metrics.get('top1_agreement_confident'), '{:.1%}')} "
                f"(n={metrics.get('confident_samples')})")
    if model.head in ("yolox", "yolov8"):
        return (f"pos IoU {fmt(metrics.get('positive_iou'), '{:.3f}')} "
                f"({metrics.get('fp32_positives')}/{metrics.get('int8_positives')}), "
                f"box err {fmt(metrics.get('box_error_px'), '{:.2f}')} px, score {fmt(metrics.get('score_sqnr_db'), '{:.1f}')} dB")
    if model.head == "db":
        return f"map IoU@0.3 {fmt(metrics.get('map_iou'), '{:.3f}')}, map {fmt(metrics.get('map_sqnr_db'), '{:.1f}')} dB"
    if model.head == "sentence":
        return (f"emb cos {fmt(metrics.get('embedding_cosine_mean'), '{:.4f}')} "
                f"(min {fmt(metrics.get('embedding_cosine_min'), '{:.4f}')}), "
                f"tokens {fmt(metrics.get('token_sqnr_db'), '{:.1f}')} dB")
    return ""


# ---- ONNX Runtime quantize_static (subprocess worker) ------------------------------------------------------------
def ort_worker(model: str, data: str, output: str, method: str) -> None:
    """Quantize MODEL with onnxruntime quantize_static, TensorRT-compatible settings (see the module doc)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    arrays = zoo.load_data(Path(data))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = _feeds(arrays, names)
    batch = _fixed_batch(session) or 8
    total = len(next(iter(feeds.values())))
    items = [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, total, batch)]
    del session

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start, self.end, self.position = 0, len(items), 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            index = self.start + self.position
            if index >= self.end:
                return None
            self.position += 1
            return items[index]

        def __len__(self) -> int:
            return len(items)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end, self.position = start_index, min(end_index, len(items)), 0

    def quantize(source_model: str) -> None:
        pre = Path(output).with_suffix(".pre.onnx")
        try:
            quant_pre_process(source_model, str(pre))
            source = str(pre)
        except Exception as exc:  # noqa: BLE001 - the pre-processing is optional; say so and go on
            print(f"quant_pre_process failed ({type(exc).__name__}: {str(exc)[:200]}); quantizing the model as is",
                  file=sys.stderr)
            source = source_model
        quantize_static(
            source, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibStridedMinMax": stride})
        pre.unlink(missing_ok=True)

    per_chunk = max(1, ORT_CHUNK_SAMPLES // batch)
    stride = max(d for d in range(1, per_chunk + 1) if len(items) % d == 0)
    quantize(model)
    # Per-channel DequantizeLinear needs opset >= 13 (its axis attribute); quantize_static does not upgrade an
    # older model and can write a file onnxruntime itself refuses (ddddocr's opset-11 YOLOX). As a user would
    # after that error: upgrade the model to opset 13 and quantize again.
    import onnx
    from onnx import version_converter

    upgraded, as_shipped_error = None, None
    try:
        ort.InferenceSession(output, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the file is what is checked here
        as_shipped_error = " ".join(str(exc).split())[:300]
    proto = onnx.load(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if as_shipped_error and opset < 13:
        upgraded = str(Path(output).with_suffix(".opset13.onnx"))
        onnx.save(version_converter.convert_version(proto, 13), upgraded)
        quantize(upgraded)
    del proto
    if upgraded:
        Path(upgraded).unlink(missing_ok=True)
    print(json.dumps({"output": output, "method": method, "calibration_items": len(items), "batch": batch,
                      "chunk_items": stride, "as_shipped_error": as_shipped_error,
                      "opset_upgraded_from": opset if upgraded else None}))


# ---- one model ---------------------------------------------------------------------------------------------------
def _limited(path: Path, limit: int | None, work: Path, tag: str) -> Path:
    """PATH itself, or its first LIMIT samples written into WORK."""
    if limit is None:
        return path
    arrays = zoo.load_data(path)
    if len(next(iter(arrays.values()))) <= limit:
        return path
    out = work / f"{tag}-{limit}{path.suffix}"
    if path.suffix == ".npz":
        np.savez(out, **{k: v[:limit] for k, v in arrays.items()})  # type: ignore[arg-type]
    else:
        np.save(out, arrays[""][:limit])
    return out


def rtx_parse(path: Path) -> dict[str, Any]:
    """Whether TensorRT-RTX's ONNX parser takes PATH (Python API, in process; no GPU needed)."""
    try:
        import tensorrt_rtx as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"parse": None, "error": f"tensorrt_rtx not installed ({exc})"}
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = bool(parser.parse_from_file(str(path)))
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        reason = next((line for line in error.desc().splitlines() if "Error Code 4" in line or "must" in line),
                      error.desc().splitlines()[-1])
        errors.append(f"{error.node_name()} ({error.node_operator()}): {reason.strip()[:200]}")
    return {"parse": ok, "errors": errors[:5], "tensorrt_rtx": trt.__version__}


def _rtx(path: Path, build: bool) -> dict[str, Any]:
    result = rtx_parse(path)
    if build and result["parse"]:
        try:
            _, seconds, _ = cli_json(["build", str(path), "--builder", "tensorrt-rtx", "-o",
                                      str(path.with_suffix(".rtx.engine")), "--json"], 1800)
            result.update(build=True, build_s=round(seconds, 1))
        except StepError as exc:
            result.update(build=False, build_error=str(exc))
    return result


def bench_model(name: str, work: Path, calib_limit: int | None, eval_limit: int | None,
                trtkit_methods: Sequence[str] | None,
                ort_methods: Sequence[str], build: bool, log: Any, checked: bool = True,
                targets: bool = True) -> dict[str, Any]:
    model = zoo.get(name)
    work.mkdir(parents=True, exist_ok=True)
    calib = _limited(model.calib_data, calib_limit, work, "calib")
    evaluation = _limited(model.eval_data, eval_limit, work, "eval")
    eval_data = zoo.load_data(evaluation)
    ref, fp32_s = run_model(model.onnx_path, eval_data, emulate_qdq=False)
    samples = len(next(iter(eval_data.values())))
    calib_samples = len(next(iter(zoo.load_data(calib).values())))
    result: dict[str, Any] = {"model": name, "task": model.task, "source": model.source,
                              "calib_samples": calib_samples, "eval_samples": samples,
                              "fp32_eval_s": round(fp32_s, 2), "rows": []}
    log(f"{name}: FP32 {samples} eval samples in {fp32_s:.1f} s; calibration set {calib_samples}")

    def judge(row: dict[str, Any], qdq: Path) -> None:
        try:
            outputs, seconds = run_model(qdq, eval_data, emulate_qdq=True)
        except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the quantized file is a result
            row["rtx"] = _rtx(qdq, build)
            message = " ".join(str(exc).split())
            raise StepError(f"onnxruntime cannot run the QDQ model: {message[:300]}") from None
        row["eval_s"] = round(seconds, 2)
        row["metrics"] = task_metrics(model, ref, outputs, eval_data)
        row["rtx"] = _rtx(qdq, build)
        log(f"  {row['method']}: {headline(model, row['metrics'])}; SQNR {row['metrics']['sqnr_db']}; "
            f"rtx parse {row['rtx'].get('parse')}")

    optimized = work / "optimized.onnx"
    try:
        _, optimize_s, optimize_rss = cli_json(["optimize", str(model.onnx_path), "-o", str(optimized), "--json"])
        result.update(optimize_s=round(optimize_s, 2), optimize_peak_rss_mib=optimize_rss)
    except StepError as exc:
        result["optimize_error"] = str(exc)
        optimized = model.onnx_path
        log(f"  optimize failed ({exc}); calibrating the zoo model as is")

    done_methods: dict[str, str] = {}
    for method in ("default", *trtkit_methods) if trtkit_methods is not None else ():
        row: dict[str, Any] = {"method": f"trtkit {method}", "kind": "trtkit"}
        if method in done_methods:
            continue
        scales, qdq = work / f"scales-{method}.json", work / f"trtkit-{method}.onnx"
        try:
            extra = [] if method == "default" else ["-m", method]
            report, calib_s, calib_rss = cli_json(["calibrate", str(optimized), "-d", str(calib), "-o", str(scales),
                                                   *extra, "--json"])
            _, quant_s, quant_rss = cli_json(["quantize", str(optimized), "-s", str(scales), "-o", str(qdq), "--json"])
            if method == "default":
                row["method"] = f"trtkit default ({report.get('method')})"
                done_methods[str(report.get("method"))] = "default"
            row.update(calibrate_s=round(calib_s, 2), quantize_s=round(quant_s, 2),
                       time_s=round(result.get("optimize_s", 0.0) + calib_s + quant_s, 2),
                       peak_rss_mib=max(calib_rss, quant_rss, result.get("optimize_peak_rss_mib", 0.0)))
            judge(row, qdq)
        except StepError as exc:
            row["error"] = str(exc)
            log(f"  {row['method']}: FAILED {exc}")
        result["rows"].append(row)

    # The checked paths: the default scales, then `quantize --data` (each refinement kept when it measures
    # better on the calibration samples; judged by the head's task metric where it has one), and
    # `quantize --target` (float fallback until the goal holds).
    default_scales = work / "scales-default.json"
    task = TASK_METRICS.get(model.head, [])
    goal = TARGETS.get(model.head, [])
    for label, extra in (("checked", task), ("target", task + goal)) if checked else ():
        if label == "target" and (not goal or not targets):
            continue
        row = {"method": f"trtkit --data {goal[-1]}" if label == "target" else
               "trtkit --data (judged by the task metric)" if task else "trtkit --data (adaptive)", "kind": "trtkit"}
        qdq = work / f"trtkit-{label}.onnx"
        try:
            if not default_scales.exists():
                raise StepError("no default scales (the trtkit default row failed or was skipped)")
            cmd = [*_trtkit_cmd(), "quantize", str(optimized), "-s", str(default_scales), "--data", str(calib),
                   "-o", str(qdq), "--json", *extra]
            began = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            row["time_s"] = round(time.perf_counter() - began, 1)
            if proc.returncode not in (0, 1) or not qdq.exists():  # 1: target not met, closest model written
                raise StepError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
            report = json.loads(proc.stdout)
            checked_report = report.get("checked") or {}
            row.update(checked={k: checked_report.get(k) for k in ("target", "measured", "met", "blocking")},
                       float_layers=len(checked_report.get("float_nodes") or []),
                       decisions=checked_report.get("decisions"))
            if label == "target":
                row["method"] += (f" ({'met' if checked_report.get('met') else 'not met'} on the calibration"
                                  f" samples, {row['float_layers']} layers float)")
            judge(row, qdq)
        except (StepError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            row["error"] = str(exc)
            log(f"  {row['method']}: FAILED {exc}")
        result["rows"].append(row)

    for method in ort_methods:
        row = {"method": f"ORT {method}", "kind": "ort"}
        qdq = work / f"ort-{method.lower()}.onnx"
        try:
            cmd = [sys.executable, "-m", "benchmarks.bench_real", "--ort-worker", str(model.onnx_path), str(calib),
                   str(qdq), method]
            # In WORK: quantize_static and its shape inference write temporaries into the current directory.
            out, seconds, peak = run_measured(cmd, 1800, cwd=work)
            report = json.loads(out[out.find("{"):]) if "{" in out else {}
            if report.get("opset_upgraded_from"):
                row["method"] += f" (opset {report['opset_upgraded_from']}->13)"
            row.update(time_s=round(seconds, 2), peak_rss_mib=peak, ort=report)
            judge(row, qdq)
        except StepError as exc:
            row["error"] = str(exc)
            log(f"  {row['method']}: FAILED {exc}")
        result["rows"].append(row)
    return result


# ---- report ---------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "trtkit_commit": commit, "zoo_version": zoo.ZOO_VERSION}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | method | SQNR dB (per output) | task metric | time s | peak RSS MiB | RTX parse |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        model = zoo.get(res["model"])
        if "error" in res:
            lines.append(f"| {res['model']} | - | - | FAILED: {res['error']} | - | - | - |")
            continue
        for row in res["rows"]:
            if "error" in row:
                lines.append(f"| {res['model']} | {row['method']} | - | FAILED: {row['error'][:120]} | - | - | - |")
                continue
            sqnr = ", ".join(f"{v:.1f}" for v in row["metrics"]["sqnr_db"].values())
            rtx = row["rtx"]
            parse = {True: "yes", False: "no", None: "n/a"}[rtx.get("parse")]
            if rtx.get("errors"):
                parse += f" ({rtx['errors'][0][:90]})"
            if "build" in rtx:
                parse += ", builds" if rtx["build"] else ", build FAILED"
            lines.append(f"| {res['model']} | {row['method']} | {sqnr} | {headline(model, row['metrics'])} | "
                         f"{row.get('time_s', '-')} | {row.get('peak_rss_mib', '-')} | {parse} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(zoo.NAMES), help="comma-separated zoo models")
    parser.add_argument("--methods", default=",".join(TRTKIT_METHODS), help="trtkit calibrators besides the default")
    parser.add_argument("--ort-methods", default=",".join(ORT_METHODS), help="ORT calibration methods ('' for none)")
    parser.add_argument("--skip-trtkit", action="store_true", help="run only the ORT rows")
    parser.add_argument("--no-target", action="store_true", help="skip the `quantize --target` rows")
    parser.add_argument("--calib-limit", type=int, default=None,
                        help="use the first N calibration samples (default: DEFAULT_SAMPLES per model)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="use the first N evaluation samples (default: DEFAULT_SAMPLES per model)")
    parser.add_argument("--workdir", type=Path, default=None, help="artefacts (default: <zoo cache>/bench-real)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--build", action="store_true", help="also build TensorRT-RTX engines (needs a GPU)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="print the table of earlier --json results (several runs are merged) and exit")
    parser.add_argument("--ort-worker", nargs=4, metavar=("MODEL", "DATA", "OUTPUT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_worker:
        ort_worker(*args.ort_worker)
        return 0
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        # A run has its machine; a merged file (--from-json --json) keeps the machines of all its runs.
        machines = [info for run in runs for info in (run.get("machines") or [run["machine"]])]
        for run in runs:
            for info in run.get("machines") or [run["machine"]]:
                print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
                      f"trtkit {info['trtkit_commit']}; {info['date']}; {run.get('total_s')} s wall, "
                      f"{run.get('cpu_s')} s CPU")
        merged: dict[str, dict[str, Any]] = {}
        for run in runs:
            for res in run["results"]:
                if res["model"] not in merged or "error" in merged[res["model"]]:
                    merged[res["model"]] = {**res, "rows": list(res.get("rows", []))}
                    continue
                rows = {row["method"]: row for row in merged[res["model"]]["rows"]}
                rows.update({row["method"]: row for row in res.get("rows", [])})
                merged[res["model"]]["rows"] = list(rows.values())
        print(table(list(merged.values())))
        if args.json:
            args.json.write_text(json.dumps({"merged_from": [str(p) for p in args.from_json],
                                             "machines": machines,
                                             "results": list(merged.values())}, indent=1) + "\n")
        return 0
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in zoo.SPECS]
    if unknown:
        print(f"error: unknown zoo model(s) {', '.join(unknown)} (have: {', '.join(zoo.NAMES)})", file=sys.stderr)
        return 2
    work = args.workdir or zoo.cache_dir() / "bench-real"
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['platform']}; onnxruntime {info['onnxruntime']}; "
          f"trtkit {info['trtkit_commit']}; {info['date']}", flush=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results, start = [], time.perf_counter()
    for name in names:
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        try:
            calib_n, eval_n = DEFAULT_SAMPLES.get(name, (None, None))
            results.append(bench_model(name, folder, args.calib_limit or calib_n, args.eval_limit or eval_n,
                                       None if args.skip_trtkit else [m for m in args.methods.split(",") if m],
                                       [m for m in args.ort_methods.split(",") if m], args.build, log,
                                       checked=not args.skip_trtkit, targets=not args.no_target))
        except (zoo.ZooError, StepError, OSError) as exc:
            results.append({"model": name, "error": str(exc)})
            log(f"{name}: FAILED {exc}")
        if args.json:  # after every model, so that an interrupted run keeps what it measured
            args.json.write_text(json.dumps({"machine": info, "partial": True, "results": results}, indent=1) + "\n")
    total = time.perf_counter() - start
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    load = os.getloadavg()
    print(table(results))
    print(f"\ntotal {total:.0f} s wall, {cpu:.0f} s CPU (this run and its subprocesses); "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    if args.json:
        payload = {"machine": info, "total_s": round(total, 1), "cpu_s": round(cpu, 1),
                   "load_average_end": [round(x, 2) for x in load], "settings": {
            "score_threshold": SCORE_THRESHOLD, "map_threshold": MAP_THRESHOLD, "confident": CONFIDENT,
            "qdq_judged": "Q/DQ emulated in float (session.disable_quant_qdq=1)",
            "ort": "quantize_static QDQ, QInt8/QInt8, symmetric, per-channel, quant_pre_process"}, "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
