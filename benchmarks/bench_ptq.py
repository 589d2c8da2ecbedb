"""Beyond plain PTQ: plain PTQ vs + equalization vs + bias correction vs QAT, same models, same data.

    python -m benchmarks.bench_ptq            # writes the `ptq` section of docs/benchmarks.md

Models (trained here on scikit-learn digits, seconds each, one torch thread):
- digits-cnn: trtkit.examples.digits (Conv-BN-ReLU, a residual block, max-pool, linear head).
- dsconv-edge: a depthwise-separable classifier whose first depthwise conv has three zero-sum edge filters
  with BN-folded weights 30-80x their neighbours (the next 1x1 conv compensates; FP32 is unchanged): the
  failure case of per-tensor INT8 activations.
- mobilenet (zoo, seeded weights, no labels): SQNR only; equalization with ReLU6 treated as ReLU (`relu6=relu`).

Calibration sets: "good" = 256 training digits; "poor" = 16 training digits with their contrast squeezed to
25% (washed-out captures). INT8 is run with Q/DQ emulated in float (what TensorRT computes); accuracy and
SQNR of the logits against FP32 are measured on the 540 held-out digits. QAT: trtkit.qat with learned amax,
activation ranges initialised from the same calibration set and calibrator, 2 epochs on 512 training digits.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _export(model: Any, path: Path) -> Path:
    import torch

    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    return path


def _fmt(sqnr: float, acc: float | None) -> str:
    text = f"{sqnr:.1f} dB"
    return text + (f" / {100 * acc:.1f}%" if acc is not None else "")


def run_digits(folder: Path) -> list[list[object]]:
    import torch

    from trtkit import bias_correct, equalize, qat
    from trtkit.calibration import calibrate
    from trtkit.examples.digits import load_digits_split, train_digits_cnn, train_edge_filter_cnn
    from trtkit.metrics import sqnr_db
    from trtkit.model import ModelArtifact
    from trtkit.plugins.qdq.insert import quantize
    from trtkit.runtime import run, session

    x_train, y_train, x_test, y_test = load_digits_split()
    models = {
        "digits-cnn": train_digits_cnn(x_train, y_train),
        "dsconv-edge": train_edge_filter_cnn(x_train, y_train),
    }
    calib_sets = {
        "good (256)": x_train[:256],
        "poor (16, 25% contrast)": (8.0 + (x_train[:16] - 8.0) * 0.25).astype(np.float32),
    }
    rows: list[list[object]] = []
    for model_name, torch_model in models.items():
        path = _export(torch_model, folder / f"{model_name}.onnx")
        fp32 = ModelArtifact.load(path)
        reference = run(session(fp32), {"image": x_test})["logits"]
        fp32_acc = float((reference.argmax(1) == y_test).mean())

        def score(model: Any, reference: np.ndarray = reference) -> tuple[float, float]:
            logits = run(session(model), {"image": x_test})["logits"]
            return sqnr_db(reference, logits), float((logits.argmax(1) == y_test).mean())

        for calib_name, images in calib_sets.items():
            calib = {"image": images}
            for method in ("minmax", "entropy"):
                timings: dict[str, float] = {}
                start = time.perf_counter()
                plain = quantize(fp32, calibrate(fp32, calib, method=method, progress=False))
                timings["ptq"] = time.perf_counter() - start
                start = time.perf_counter()
                eq_fp32, _ = equalize(fp32)
                timings["eq"] = time.perf_counter() - start
                equalized = quantize(eq_fp32, calibrate(eq_fp32, calib, method=method, progress=False))
                start = time.perf_counter()
                corrected, _ = bias_correct(equalized, eq_fp32, calib)
                timings["bc"] = time.perf_counter() - start
                start = time.perf_counter()
                qmodel = qat.quantize_model(torch_model, learn_amax=True)
                qat.calibrate(qmodel, [images], method=method)
                qat.finetune(qmodel, x_train[:512], y_train[:512], epochs=2, lr=1e-3, batch_size=32)
                qat_path = folder / f"{model_name}.qat.onnx"
                qat.export_onnx(qmodel, qat_path, torch.zeros(1, 1, 8, 8), input_names=["image"],
                                output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})
                timings["qat"] = time.perf_counter() - start
                results = [score(plain), score(equalized), score(corrected)]
                qat_acc = score(ModelArtifact.load(qat_path))[1]
                rows.append([model_name, f"{100 * fp32_acc:.1f}%", calib_name, method,
                             *(_fmt(*r) for r in results), f"{100 * qat_acc:.1f}%",
                             f"{timings['eq']:.2f} / {timings['bc']:.1f} / {timings['qat']:.0f}"])
                print(rows[-1], flush=True)
    return rows


def run_mobilenet(folder: Path) -> list[list[object]]:
    from benchmarks.models import build_zoo, sample_inputs
    from trtkit import bias_correct, equalize
    from trtkit.calibration import calibrate
    from trtkit.metrics import sqnr_db
    from trtkit.model import ModelArtifact
    from trtkit.plugins.qdq.insert import quantize
    from trtkit.runtime import run, session

    path = build_zoo(folder, names=["mobilenet"], batch=1)["mobilenet"]
    fp32 = ModelArtifact.load(path)
    calib = sample_inputs(path, n=64, seed=1)
    test = sample_inputs(path, n=64, seed=2)

    def outputs(model: Any) -> np.ndarray:
        sess = session(model)
        return np.concatenate([run(sess, {"image": test["image"][i:i + 1]})["logits"] for i in range(64)])

    reference = outputs(fp32)
    rows: list[list[object]] = []
    for method in ("minmax", "entropy"):
        plain = quantize(fp32, calibrate(fp32, calib, method=method, batch_size=1, progress=False))
        eq_fp32, report = equalize(fp32, relu6="relu")
        eq_exact = float(np.abs(outputs(eq_fp32) - reference).max() / np.abs(reference).max())
        equalized = quantize(eq_fp32, calibrate(eq_fp32, calib, method=method, batch_size=1, progress=False))
        corrected, _ = bias_correct(equalized, eq_fp32, calib, batch_size=1, limit=64)
        rows.append(["mobilenet (zoo, seeded)", "-", "64 smooth images", method,
                     _fmt(sqnr_db(reference, outputs(plain)), None),
                     _fmt(sqnr_db(reference, outputs(equalized)), None) + f" ({len(report.pairs)} pairs, FP32 "
                     f"change {eq_exact:.1e} from ReLU6)",
                     _fmt(sqnr_db(reference, outputs(corrected)), None), "n/a (no labels)", "-"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    import torch

    from benchmarks._report import markdown_table, write_section

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-ptq-") as folder:
        rows = run_digits(Path(folder))
        rows += run_mobilenet(Path(folder))
    headers = ["model", "FP32 acc", "calibration set", "calibrator", "plain PTQ", "+ equalization",
               "+ eq + bias correction", "QAT (2 epochs), acc", "seconds eq / bc / qat"]
    body = (
        "SQNR of the logits against FP32 (higher is better) / top-1 accuracy on 540 held-out digits; INT8 with "
        "Q/DQ emulated in float (what TensorRT computes). Plain PTQ = `trtkit.calibrate` + `trtkit.quantize`; "
        "equalization is applied to the FP32 model before calibrating; bias correction uses the calibration set "
        "itself; QAT initialises activation ranges from the same calibration set and calibrator, learns amax, "
        "and fine-tunes 2 epochs on 512 training digits; its weights change, so only its accuracy is comparable "
        "(SQNR against the original FP32 logits means nothing for a retrained model). `dsconv-edge` has three "
        "zero-sum depthwise edge filters 30-80x larger than their neighbours after BN folding (and is trained "
        "briefly, hence 87% FP32). The zoo MobileNet has seeded, untrained weights: SQNR only, on 64 held-out "
        "images, calibration and bias correction on 64 others.\n\n"
        + markdown_table(headers, rows)
    )
    print(write_section("ptq", "Beyond plain PTQ: equalization, bias correction, QAT", body))


if __name__ == "__main__":
    main()
