"""INT8 peers on the real-model zoo: NVIDIA ModelOpt and Qualcomm aimet-onnx, judged exactly as bench_real
judges trtkit and ONNX Runtime (same calibration and evaluation crops, same metrics, same JSON rows).

    python -m benchmarks.bench_peers --json ~/.cache/trtkit-zoo/results/peers.json
    python -m benchmarks.bench_real --from-json merged.json peers.json     # one table with every row

Each peer lives in its own virtual environment outside the repository (they pin their own torch, onnx and
onnxruntime): `--modelopt-python` (default /tmp/peer-modelopt/bin/python, `pip install nvidia-modelopt[onnx]
onnxruntime`) and `--aimet-python` (default /tmp/peer-aimet/bin/python, `pip install aimet-onnx
onnxruntime`). The quantization runs in a subprocess of that interpreter (this script's `--worker` mode), so
its time and peak RSS are its own; the judging runs here, with bench_real's functions:
- ModelOpt: `modelopt.onnx.quantization.quantize(quantize_mode="int8")`, its default calibration for int8
  (entropy) and placement, with calibration on the CPU execution provider (`calibration_eps=["cpu"]`) and
  the layers it leaves unquantized kept in float32 (`high_precision_dtype="fp32"`: its default fp16 would
  add fp16 error to what is measured here and bench_real's other rows keep float32).
- aimet-onnx: its post-training recipe: cross-layer equalization (`equalize_model`, which folds BatchNorm),
  `QuantizationSimModel` with its defaults (int8, min-max, default config), AdaRound on a capped number of
  iterations and calibration samples (`--adaround-iters`, `--adaround-samples`: its recommended 10,000
  iterations per layer take hours on two CPU cores), `compute_encodings` over the calibration crops, and
  `to_onnx_qdq()`. Its defaults (per-tensor weights, asymmetric uint8 activations) are not what TensorRT takes;
  `--aimet-config trt` runs its per-channel config with symmetric activations exported as signed int8 (its
  strict-symmetric mode is left off: aimet-onnx 2.42 exports it with zero point -1, which TensorRT refuses).
Every QDQ file is judged with Q/DQ emulated in float (as bench_real) and checked with TensorRT-RTX's parser.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench_real, zoo

PEERS = ("modelopt", "aimet")
DEFAULT_PYTHON = {"modelopt": "/tmp/peer-modelopt/bin/python", "aimet": "/tmp/peer-aimet/bin/python"}
ADAROUND_ITERS = 200
ADAROUND_SAMPLES = 32


# ---- workers (run inside a peer's virtual environment) -------------------------------------------------------
def _input_names(model_path: str) -> list[str]:
    import onnx

    proto = onnx.load(model_path, load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in weights]


def _batches(feeds: dict[str, np.ndarray], model_path: str, batch: int) -> list[dict[str, np.ndarray]]:
    """The calibration feeds in steps of the model's fixed batch (ddddocr's YOLOX takes 1), else BATCH."""
    import onnx

    proto = onnx.load(model_path, load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    step = dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else batch
    total = len(next(iter(feeds.values())))
    return [{k: v[i:i + step] for k, v in feeds.items()} for i in range(0, total, step)]


def modelopt_worker(model: str, data: str, output: str) -> dict[str, Any]:
    import modelopt
    from modelopt.onnx.quantization import quantize

    feeds = bench_real._feeds(zoo.load_data(Path(data)), _input_names(model))
    quantize(onnx_path=model, quantize_mode="int8", calibration_data=feeds, calibration_eps=["cpu"],
             high_precision_dtype="fp32", output_path=output, log_level="WARNING")
    return {"modelopt": modelopt.__version__, "calibration_method": "entropy (int8 default)",
            "high_precision_dtype": "fp32", "calibration_eps": ["cpu"]}


def _aimet_trt_config(path: Path) -> str:
    """aimet's per-channel config with TensorRT's int8 rules added (symmetric activations, exported signed with
    zero point 0): what TensorRT's parser accepts. Written to PATH; returns it."""
    import aimet_onnx.common.quantsim_config as configs

    config = json.loads((Path(configs.__file__).parent / "default_config_per_channel.json").read_text())
    config["defaults"]["ops"]["is_symmetric"] = "True"
    config["defaults"]["strict_symmetric"] = "False"  # "True" exports zero point -1 (aimet-onnx 2.42)
    config["defaults"]["unsigned_symmetric"] = "False"
    path.write_text(json.dumps(config, indent=1))
    return str(path)


def aimet_worker(model: str, data: str, output: str, iterations: int, samples: int, config: str,
                 cle: bool = True) -> dict[str, Any]:
    import aimet_onnx
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.cross_layer_equalization import equalize_model

    proto = onnx.load(model)
    feeds = bench_real._feeds(zoo.load_data(Path(data)), _input_names(model))
    batches = _batches(feeds, model, 8)
    report: dict[str, Any] = {"aimet_onnx": aimet_onnx.__version__, "calibration_batches": len(batches)}
    began = time.perf_counter()
    try:
        if cle:
            import onnxruntime as ort

            def fp32(model_proto: Any) -> list[Any]:
                session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
                return session.run(None, batches[0])

            before = fp32(proto)
            equalize_model(proto)
            # CLE must not change the float model; through ReLU6/Clip it does (aimet's docs: replace ReLU6 first)
            report["cle_fp32_sqnr_db"] = [round(bench_real.sqnr_db(a, b), 1)
                                          for a, b in zip(before, fp32(proto), strict=True)]
        report["cle"] = cle
    except Exception as exc:  # noqa: BLE001 - CLE is a step of the recipe; a model it cannot handle goes on without
        report["cle"] = f"skipped: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    report["cle_s"] = round(time.perf_counter() - began, 1)
    config_file = _aimet_trt_config(Path(output).with_suffix(".config.json")) if config == "trt" else None
    report["config"] = config
    sim = QuantizationSimModel(proto, providers=["CPUExecutionProvider"], config_file=config_file)
    began = time.perf_counter()
    ada = _batches({k: v[:samples] for k, v in feeds.items()}, model, 8)
    try:
        if iterations > 0:
            apply_adaround(sim, ada, num_iterations=iterations)
        report["adaround"] = {"iterations": iterations, "samples": min(samples, len(next(iter(feeds.values()))))}
    except Exception as exc:  # noqa: BLE001 - recorded; the row is then plain min-max PTQ (+ CLE)
        report["adaround"] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    report["adaround_s"] = round(time.perf_counter() - began, 1)
    sim.compute_encodings(batches)
    onnx.save(sim.to_onnx_qdq(force_activation_as="signed" if config == "trt" else "unsigned"), output)
    return report


# ---- one model -------------------------------------------------------------------------------------------------
def bench_model(name: str, work: Path, peers: Sequence[str], pythons: dict[str, str], iterations: int,
                samples: int, log: Any, aimet_config: str = "default", cle: bool = True) -> dict[str, Any]:
    model = zoo.get(name)
    work.mkdir(parents=True, exist_ok=True)
    calib_n, eval_n = bench_real.DEFAULT_SAMPLES.get(name, (None, None))
    calib = bench_real._limited(model.calib_data, calib_n, work, "calib")
    evaluation = bench_real._limited(model.eval_data, eval_n, work, "eval")
    eval_data = zoo.load_data(evaluation)
    ref, fp32_s = bench_real.run_model(model.onnx_path, eval_data, emulate_qdq=False)
    result: dict[str, Any] = {"model": name, "task": model.task, "source": model.source,
                              "calib_samples": len(next(iter(zoo.load_data(calib).values()))),
                              "eval_samples": len(next(iter(eval_data.values()))), "fp32_eval_s": round(fp32_s, 2),
                              "rows": []}
    log(f"{name}: FP32 {result['eval_samples']} eval samples in {fp32_s:.1f} s; "
        f"calibration set {result['calib_samples']}")
    for peer in peers:
        label = ("ModelOpt int8 (entropy, default placement)" if peer == "modelopt" else
                 f"aimet-onnx CLE + AdaRound ({iterations} it, {samples} samples) + min-max" if iterations > 0 else
                 "aimet-onnx CLE + min-max (QuantSim defaults, no AdaRound)")
        if peer == "aimet" and aimet_config == "trt":
            label = label.replace("QuantSim defaults", "per-channel, symmetric int8 activations for TensorRT")
        if peer == "aimet" and not cle:
            label = label.replace("CLE + ", "")
        row: dict[str, Any] = {"method": label, "kind": peer}
        tag = (f"-{aimet_config}" + ("" if cle else "-nocle")) if peer == "aimet" else ""
        qdq = work / f"{peer}{tag}.onnx"
        try:
            cmd = [pythons[peer], "-m", "benchmarks.bench_peers", "--worker", peer, str(model.onnx_path), str(calib),
                   str(qdq), "--adaround-iters", str(iterations), "--adaround-samples", str(samples),
                   "--aimet-config", aimet_config, *([] if cle else ["--no-cle"])]
            out, seconds, peak = bench_real.run_measured(cmd, 3600, cwd=work)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            row.update(time_s=round(seconds, 2), peak_rss_mib=peak, peer=json.loads(lines[-1]) if lines else {})
            outputs, eval_s = bench_real.run_model(qdq, eval_data, emulate_qdq=True)
            row["eval_s"] = round(eval_s, 2)
            row["metrics"] = bench_real.task_metrics(model, ref, outputs, eval_data)
            row["rtx"] = bench_real.rtx_parse(qdq)
            log(f"  {label}: {bench_real.headline(model, row['metrics'])}; SQNR {row['metrics']['sqnr_db']}; "
                f"{seconds:.0f} s, {peak} MiB; rtx parse {row['rtx'].get('parse')}")
        except Exception as exc:  # noqa: BLE001 - a peer failing on a model is a result of the benchmark
            message = " ".join(str(exc).split())
            row["error"] = message[:300]
            if qdq.exists() and "rtx" not in row:
                row["rtx"] = bench_real.rtx_parse(qdq)
            log(f"  {label}: FAILED {message[:300]}")
        result["rows"].append(row)
    return result


def merge(paths: Sequence[Path], output: Path | None) -> int:
    """One file in bench_real's --json format (a "machine", "results" with every row of every model) from
    several runs of this script; each run's machine, settings and times are kept under "runs"."""
    runs = [json.loads(path.read_text()) for path in paths]
    models: dict[str, dict[str, Any]] = {}
    for run in runs:
        for res in run["results"]:
            if res["model"] not in models:
                models[res["model"]] = {**res, "rows": []}
            models[res["model"]]["rows"].extend(res.get("rows", []))
    payload = {"machine": runs[0]["machine"], "total_s": round(sum(r.get("total_s", 0.0) for r in runs), 1),
               "cpu_s": round(sum(r.get("cpu_s", 0.0) for r in runs), 1),
               "runs": [{"file": str(path), "machine": run["machine"], "total_s": run.get("total_s"),
                         "settings": run.get("settings")} for path, run in zip(paths, runs, strict=True)],
               "results": list(models.values())}
    text = json.dumps(payload, indent=1) + "\n"
    if output:
        output.write_text(text)
    print(bench_real.table(payload["results"]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(zoo.NAMES), help="comma-separated zoo models")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"which peers ({', '.join(PEERS)})")
    parser.add_argument("--modelopt-python", default=DEFAULT_PYTHON["modelopt"], help="python of ModelOpt's venv")
    parser.add_argument("--aimet-python", default=DEFAULT_PYTHON["aimet"], help="python of aimet-onnx's venv")
    parser.add_argument("--adaround-iters", type=int, default=ADAROUND_ITERS, help="AdaRound iterations per layer")
    parser.add_argument("--adaround-samples", type=int, default=ADAROUND_SAMPLES, help="AdaRound calibration samples")
    parser.add_argument("--aimet-config", choices=("default", "trt"), default="default",
                        help="aimet's default config, or its per-channel one with TensorRT's symmetric int8 activations")
    parser.add_argument("--no-cle", action="store_true", help="aimet without cross-layer equalization")
    parser.add_argument("--workdir", type=Path, default=None, help="artefacts (default: <zoo cache>/bench-peers)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (bench_real's format)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge earlier --json files of this script (one per peer or config) into --json")
    parser.add_argument("--worker", nargs=4, metavar=("PEER", "MODEL", "DATA", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        peer, model, data, output = args.worker
        report = (modelopt_worker(model, data, output) if peer == "modelopt" else
                  aimet_worker(model, data, output, args.adaround_iters, args.adaround_samples, args.aimet_config,
                               not args.no_cle))
        print(json.dumps(report))
        return 0
    if args.merge:
        return merge(args.merge, args.json)
    names = [n for n in args.models.split(",") if n]
    peers = [p for p in args.peers.split(",") if p]
    unknown = [n for n in names if n not in zoo.SPECS] + [p for p in peers if p not in PEERS]
    if unknown:
        print(f"error: unknown zoo model or peer {', '.join(unknown)} (models: {', '.join(zoo.NAMES)}; peers: "
              f"{', '.join(PEERS)})", file=sys.stderr)
        return 2
    pythons = {"modelopt": args.modelopt_python, "aimet": args.aimet_python}
    work = args.workdir or zoo.cache_dir() / "bench-peers"
    info = bench_real.machine()
    for peer in peers:
        version, _, _ = bench_real.run_measured(
            [pythons[peer], "-c", "import importlib.metadata as m; print(m.version(%r))"
             % ("nvidia-modelopt" if peer == "modelopt" else "aimet-onnx")], 120)
        info[peer] = version.strip() if isinstance(version, str) else None
    print(f"machine: {info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
          f"trtkit {info['trtkit_commit']}; {info['date']}", flush=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results, start = [], time.perf_counter()
    for name in names:
        try:
            results.append(bench_model(name, work / name, peers, pythons, args.adaround_iters,
                                       args.adaround_samples, log, args.aimet_config, not args.no_cle))
        except (zoo.ZooError, bench_real.StepError, OSError) as exc:
            results.append({"model": name, "error": str(exc)})
            log(f"{name}: FAILED {exc}")
        if args.json:  # after every model, so that an interrupted run keeps what it measured
            args.json.write_text(json.dumps({"machine": info, "partial": True, "results": results}, indent=1) + "\n")
    total = time.perf_counter() - start
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(bench_real.table(results))
    print(f"\ntotal {total:.0f} s wall, {cpu:.0f} s CPU")
    if args.json:
        payload = {"machine": info, "total_s": round(total, 1), "cpu_s": round(cpu, 1), "settings": {
            "qdq_judged": "Q/DQ emulated in float (session.disable_quant_qdq=1)",
            "modelopt": "quantize(int8), default calibration (entropy) and placement, calibration_eps=[cpu], "
                        "high_precision_dtype=fp32",
            "aimet": f"equalize_model (CLE) + QuantizationSimModel defaults + apply_adaround({args.adaround_iters} "
                     f"iterations, {args.adaround_samples} samples) + compute_encodings + to_onnx_qdq"},
            "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
