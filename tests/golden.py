"""Artefacts whose bytes are pinned: a restructuring must not change what trtkit writes.

`python tests/golden.py` rewrites tests/data/golden_artifacts.json from the current code (run it only when an
output is meant to change, and say so in the commit); tests/test_golden.py recomputes and compares.
Each artefact may have several pinned hashes, one per CPU family: onnxruntime's float kernels (AVX-512 or
AVX2 code paths) round the last bits of activations differently, so the min/max that scales files record
differ by an ulp between them (the int8 models do not). `python tests/golden.py --add` adds this machine's
hashes to those pinned, for the same code on another CPU family (check first that the code is unchanged).
The model is built with onnx.helper from seeded weights (no torch export, whose bytes vary by version) and
exercises the placements that matter: Conv+BN+Relu, depthwise Conv, residual Add, Concat, MaxPool, Gemm and a
trailing Sigmoid.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "data" / "golden_artifacts.json"


def build_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)

    def init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", (8, 3, 3, 3)), init("b1", (8,)),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_s"),
        init("bn_b", (8,)), init("bn_m", (8,), 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_v"),
        init("wd", (8, 1, 3, 3)), init("bd", (8,)),
        init("w2", (8, 8, 1, 1)), init("b2", (8,)),
        init("w3", (4, 16, 3, 3)), init("b3", (4,)),
        init("wg", (16, 5)), init("bg", (5,)),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"]),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["cd"], ["rd"]),
        helper.make_node("Conv", ["rd", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["res"]),
        helper.make_node("Concat", ["res", "r1"], ["cat"], axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["mp", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("MaxPool", ["r3"], ["mp3"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["mp3", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes, "golden", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="golden")
    model.ir_version = 8
    onnx.save(model, path)
    return path


def produce(folder: Path) -> dict[str, str]:
    """Run the CLI chain in `folder`; return {artefact file name: sha256}."""
    folder.mkdir(parents=True, exist_ok=True)
    build_model(folder / "golden.onnx")
    np.save(folder / "calib.npy", np.random.default_rng(3).uniform(0, 1, (48, 3, 8, 8)).astype(np.float32))
    # Relative names, run inside `folder`: artefacts record their sources, and a temp path must not show.
    steps = [("optimize", "golden.onnx", "-o", "opt.onnx")]
    for method in ("percentile", "entropy", "minmax", "mse"):
        steps.append(("calibrate", "opt.onnx", "-d", "calib.npy", "-m", method, "-o", f"{method}.json",
                      "--cache", f"{method}.cache"))
    steps.append(("quantize", "opt.onnx", "-s", "percentile.json", "-o", "int8.onnx"))
    steps.append(("quantize", "opt.onnx", "-s", "entropy.json", "-o", "int8_entropy.onnx"))
    for args in steps:
        proc = subprocess.run([sys.executable, "-m", "trtkit.cli", *args], capture_output=True, text=True,
                              timeout=600, cwd=folder)
        if proc.returncode:
            raise RuntimeError(f"trtkit {args[0]} failed: {proc.stderr[-2000:]}")
    skip = {"golden.onnx", "calib.npy"}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name not in skip}


def pinned() -> dict[str, list[str]]:
    """{artefact file name: its accepted sha256s} from tests/data/golden_artifacts.json."""
    stored = json.loads(GOLDEN.read_text())
    return {name: [value] if isinstance(value, str) else list(value) for name, value in stored.items()}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hashes = produce(Path(tmp))
    accepted = {name: [value] for name, value in hashes.items()}
    if "--add" in sys.argv[1:]:
        known = pinned()
        accepted = {name: known.get(name, []) + [value for value in hashes_ if value not in known.get(name, [])]
                    for name, hashes_ in accepted.items()}
    GOLDEN.write_text(json.dumps(accepted, indent=1, sort_keys=True) + "\n")
    print(json.dumps(accepted, indent=1))
