"""The bad-input matrix, through the real `trtkit` command line (a subprocess per case, real plugin discovery).

Every case must: exit with code 2, print exactly one line on stderr that names the culprit (file, tensor,
option or name), print no traceback, leave its output folder exactly as it was (no new file, no temp file,
a pre-existing output byte-identical) and never modify an input. The cases run concurrently (each is its own
process) so the whole matrix costs a few seconds of wall time per CPU core.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

onnx = pytest.importorskip("onnx")


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # {M}: folder of bad inputs, {D}: the digits model, {O}: this case's output folder
    expect: tuple[str, ...]  # substrings the one-line message must contain (the culprit)
    existing: tuple[str, ...] = ()  # outputs that exist before the run (must be left byte-identical)
    xfail: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


D, M = "{D}", "{M}"
CALIB = "{M}/calib.npy"
CASES: dict[str, Case] = {
    # ---- model files ------------------------------------------------------------------------------------
    "onnx-missing": Case(("optimize", "{M}/missing.onnx", "-o", "{O}/a.onnx"), ("missing.onnx", "no such file")),
    "onnx-truncated": Case(("calibrate", "{M}/truncated.onnx", "-d", CALIB, "-o", "{O}/s.json"),
                           ("truncated.onnx",), existing=("s.json",)),
    "onnx-corrupt": Case(("quantize", "{M}/corrupt.onnx", "-d", CALIB, "-o", "{O}/q.onnx"), ("corrupt.onnx",)),
    "onnx-empty-file": Case(("optimize", "{M}/empty.onnx", "-o", "{O}/a.onnx"), ("empty.onnx",)),
    "onnx-text-file": Case(("build", "{M}/text.onnx", "-o", "{O}/b.onnx"), ("text.onnx",), existing=("b.onnx",)),
    "opset-too-new-optimize": Case(("optimize", "{M}/opset99.onnx", "-o", "{O}/a.onnx"),
                                   ("opset99.onnx", "opset 99"), existing=("a.onnx",)),
    "opset-too-new-build": Case(("build", "{M}/opset99.onnx", "--builder", "tensorrt-rtx", "-o", "{O}/a.engine"),
                                ("opset99.onnx", "opset 99"), existing=("a.engine",)),
    "ir-too-new": Case(("optimize", "{M}/ir99.onnx", "-o", "{O}/a.onnx"), ("ir99.onnx", "IR version 99")),
    "external-data-missing": Case(("optimize", "{M}/nodata/m.onnx", "-o", "{O}/a.onnx"), ("m.onnx.data", "missing")),
    "external-data-truncated": Case(("calibrate", "{M}/shortdata/m.onnx", "-d", CALIB, "-o", "{O}/s.json"),
                                    ("m.onnx.data", "truncated")),
    "external-data-outside-folder": Case(("optimize", "{M}/escape/m.onnx", "-o", "{O}/a.onnx"),
                                         ("escape/m.onnx", "outside the model's folder")),
    # ---- calibration / evaluation data --------------------------------------------------------------------
    "data-wrong-input-name": Case(("calibrate", D, "-d", "{M}/wrongname.npz", "-o", "{O}/s.json"),
                                  ("wrongname.npz", "img", "image"), existing=("s.json",)),
    "data-wrong-shape": Case(("calibrate", D, "-d", "{M}/wrongshape.npy", "-o", "{O}/s.json"),
                             ("wrongshape.npy", "image", "shape")),
    "data-wrong-dtype": Case(("calibrate", D, "-d", "{M}/strings.npy", "-o", "{O}/s.json"),
                             ("strings.npy", "image", "dtype")),
    "data-zero-samples": Case(("calibrate", D, "-d", "{M}/zero.npy", "-o", "{O}/s.json"), ("zero.npy", "no samples")),
    "data-nan": Case(("calibrate", D, "-d", "{M}/nan.npy", "-o", "{O}/s.json", "--cache", "{O}/c.cache"),
                     ("nan.npy", "NaN"), existing=("s.json", "c.cache")),
    "data-inf-quantize": Case(("quantize", D, "-d", "{M}/inf.npy", "-o", "{O}/q.onnx"), ("inf.npy", "Inf")),
    "data-nan-eval": Case(("eval", "accuracy", D, D, "--data", "{M}/nan.npy", "-o", "{O}/r.json"), ("nan.npy", "NaN")),
    "data-pickle-not-loaded": Case(("calibrate", D, "-d", "{M}/pickle.npy", "-o", "{O}/s.json"), ("pickle.npy",)),
    # ---- unknown names (with close matches) -----------------------------------------------------------------
    "unknown-pass": Case(("optimize", D, "-p", "simplfy", "-o", "{O}/a.onnx"), ("simplfy", "did you mean", "simplify")),
    "unknown-calibrator": Case(("calibrate", D, "-d", CALIB, "-m", "entorpy", "-o", "{O}/s.json"),
                               ("entorpy", "did you mean", "entropy")),
    "unknown-builder": Case(("build", D, "-b", "tensorrtt", "-o", "{O}/b.onnx"), ("tensorrtt", "did you mean")),
    "unknown-evaluator": Case(("eval", "acuracy", D, "-o", "{O}/r.json"), ("acuracy", "accuracy")),
    "unknown-pass-option": Case(("optimize", D, "-O", "simplify.fooo=1", "-o", "{O}/a.onnx"), ("fooo", "simplify")),
    # ---- invalid or contradictory options ---------------------------------------------------------------------
    "quantize-without-scales-or-data": Case(("quantize", D, "-o", "{O}/q.onnx"), ("--scales", "--data")),
    "target-without-data": Case(("quantize", D, "-s", "{M}/over_neg.json", "--target", "sqnr>=20", "-o",
                                 "{O}/q.onnx"), ("--target", "--data")),
    "batch-size-zero": Case(("calibrate", D, "-d", CALIB, "-b", "0", "-o", "{O}/s.json"), ("batch",)),
    "option-out-of-range": Case(("calibrate", D, "-d", CALIB, "-m", "percentile", "-O", "percentile=200",
                                 "-o", "{O}/s.json"), ("percentile", "200")),
    "int8-flag-on-strongly-typed": Case(("build", D, "-b", "tensorrt-rtx", "-O", "precision=int8",
                                         "-o", "{O}/b.engine"), ("precision",)),
    "output-overwrites-input": Case(("optimize", "{O}/in.onnx", "-o", "{O}/in.onnx"), ("in.onnx", "overwrite"),
                                    existing=("in.onnx",)),
    # ---- recipes --------------------------------------------------------------------------------------------
    "recipe-unknown-key": Case(("run", "{O}/unknown.toml", "-o", "{O}/run"), ("unknown.toml", "methd")),
    "recipe-wrong-type": Case(("run", "{O}/wrongtype.toml", "-o", "{O}/run"), ("wrongtype.toml", "batch_size")),
    # ---- custom scales ----------------------------------------------------------------------------------------
    "override-missing-tensor": Case(("calibrate", D, "-d", CALIB, "--override", "{M}/over_missing.json",
                                     "-o", "{O}/s.json"), ("over_missing.json", "no_such_tensor")),
    "override-zero-yaml": Case(("calibrate", D, "-d", CALIB, "--override", "{M}/over_zero.yaml",
                                "-o", "{O}/s.json"), ("over_zero.yaml", "image")),
    "override-unparsable": Case(("calibrate", D, "-d", CALIB, "--override", "{M}/over_bad.yaml",
                                 "-o", "{O}/s.json"), ("over_bad.yaml",)),
    "scales-file-non-positive": Case(("quantize", D, "-s", "{M}/over_neg.json", "-o", "{O}/q.onnx"),
                                     ("over_neg.json", "image")),
    "scales-file-missing-tensor": Case(("quantize", D, "-s", "{M}/over_missing.json", "-o", "{O}/q.onnx"),
                                       ("over_missing.json", "no_such_tensor")),
    # ---- calibration caches -----------------------------------------------------------------------------------
    "cache-bad-header": Case(("quantize", D, "-s", "{M}/badheader.cache", "-o", "{O}/q.onnx"),
                             ("badheader.cache", "header"), existing=("q.onnx",)),
    "cache-malformed-line": Case(("quantize", D, "-s", "{M}/badline.cache", "-o", "{O}/q.onnx"),
                                 ("badline.cache:2", "malformed")),
    "cache-negative-scale": Case(("quantize", D, "-s", "{M}/negscale.cache", "-o", "{O}/q.onnx"),
                                 ("negscale.cache", "image")),
    # ---- engines ----------------------------------------------------------------------------------------------
    "engine-other-trt-version": Case(("eval", "accuracy", D, "{M}/old.engine", "--data", CALIB, "-o", "{O}/r.json"),
                                     ("old.engine", "1.0.0", "rebuild")),
    "engine-other-gpu": Case(("eval", "speed", "{M}/othergpu.engine", "-o", "{O}/r.json"), ("othergpu.engine",)),
    "engine-without-sidecar": Case(("eval", "speed", "{M}/nosidecar.engine", "-o", "{O}/r.json"),
                                   ("nosidecar.engine", "sidecar")),
    "engine-tampered": Case(("eval", "speed", "{M}/tampered.engine", "-o", "{O}/r.json"),
                            ("tampered.engine", "does not match its sidecar")),
    # ---- other stages --------------------------------------------------------------------------------------
    "jetson-log-garbage": Case(("jetson", "parse", "{M}/tegra.log"), ("tegra.log", "tegrastats")),
    "unknown-builder-option": Case(("build", D, "-b", "onnxruntime", "-O", "nosuch=1", "-o", "{O}/b.onnx"),
                                   ("nosuch", "onnxruntime")),
    "evaluator-option-invalid": Case(("eval", "speed", D, "-O", "duration_s=-1", "-o", "{O}/r.json"),
                                     ("duration_s",)),
    # ---- safety -----------------------------------------------------------------------------------------------
    "checkpoint-with-code": Case(("export", "{M}/factory.py:make", "--checkpoint", "{M}/evil.pt", "-i", "x:1x4",
                                  "-o", "{O}/e.onnx"), ("evil.pt",)),
}

RECIPE_BASE = '[model]\nonnx = "{model}"\n\n[calibration]\ndata = "{data}"\n'


class Evil:
    """Unpickling this creates a marker file: proof that a loader ran code it was not asked to."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def _make_inputs(folder: Path, digits: Path, x: np.ndarray) -> None:
    from trtkit.model import ModelArtifact

    raw = digits.read_bytes()
    (folder / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    for index in np.random.default_rng(0).integers(64, len(raw) - 64, 300):
        corrupt[index] = (corrupt[index] * 7 + 13) % 256
    (folder / "corrupt.onnx").write_bytes(bytes(corrupt))
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "text.onnx").write_text("this is not a model\n")
    np.save(folder / "calib.npy", x[:48])
    shutil.copy(folder / "calib.npy", folder / "array.onnx")
    model = onnx.load(str(digits))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    onnx.save(model, str(folder / "opset99.onnx"))
    model = onnx.load(str(digits))
    model.ir_version = 99
    onnx.save(model, str(folder / "ir99.onnx"))
    art = ModelArtifact.load(digits)
    for name in ("nodata", "shortdata", "escape"):
        art.save(folder / name / "m.onnx", external_data=True)
    (folder / "nodata" / "m.onnx.data").unlink()
    data = folder / "shortdata" / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:4096])
    escape = onnx.load(str(folder / "escape" / "m.onnx"), load_external_data=False)
    for tensor in escape.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../calib.npy"
    onnx.save(escape, str(folder / "escape" / "m.onnx"))

    np.savez(folder / "wrongname.npz", img=x[:16])
    np.save(folder / "wrongshape.npy", np.zeros((16, 1, 9, 9), np.float32))
    np.save(folder / "strings.npy", np.full((16, 1, 8, 8), "a"))
    np.save(folder / "zero.npy", np.zeros((0, 1, 8, 8), np.float32))
    bad = x[:16].copy()
    bad[3, 0, 2, 2] = np.nan
    np.save(folder / "nan.npy", bad)
    bad = x[:16].copy()
    bad[5, 0, 1, 1] = np.inf
    np.save(folder / "inf.npy", bad)
    np.save(folder / "pickle.npy", np.array([Evil(str(folder.parent / "PWNED-npy"))], dtype=object), allow_pickle=True)

    (folder / "tegra.log").write_text("this is not\na tegrastats log\n")
    (folder / "over_missing.json").write_text(json.dumps({"image": 16.0, "no_such_tensor": 2.0}))
    (folder / "over_neg.json").write_text(json.dumps({"image": -1.0}))
    (folder / "over_zero.yaml").write_text("image: 0\n")
    (folder / "over_bad.yaml").write_text("image: [1, 2\n")
    (folder / "badheader.cache").write_text("TRT-XX-Entropy\nimage: 3caa54fc\n")
    (folder / "badline.cache").write_text("TRT-8601-EntropyCalibration2\nimage 3caa54fc\n")
    (folder / "badhex.cache").write_text("TRT-8601-EntropyCalibration2\nimage: zzzz\n")
    (folder / "negscale.cache").write_text("TRT-8601-EntropyCalibration2\nimage: bf800000\n")

    # Engines: bytes + the sidecar `trtkit build` writes (format trtkit-engine/1), built "elsewhere".
    engine = b"serialized engine from another machine" * 64
    sidecar = {
        "format": "trtkit-engine/1", "builder": "tensorrt-rtx", "module": "tensorrt_rtx",
        "tensorrt_version": "1.0.0.0", "device": None, "compute_capabilities": ["all"],
        "engine": {"file": "old.engine", "bytes": len(engine), "sha256": hashlib.sha256(engine).hexdigest()},
        "inputs": [{"name": "image", "dtype": "float32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
    }
    (folder / "old.engine").write_bytes(engine)
    (folder / "old.engine.json").write_text(json.dumps(sidecar))
    (folder / "othergpu.engine").write_bytes(engine)
    other_gpu = {**sidecar, "builder": "tensorrt", "module": "tensorrt", "tensorrt_version": "10.3.0",
                 "device": {"name": "Orin", "compute_capability": "8.7"}, "compute_capabilities": ["8.7"],
                 "engine": {**sidecar["engine"], "file": "othergpu.engine"}}
    (folder / "othergpu.engine.json").write_text(json.dumps(other_gpu))
    (folder / "nosidecar.engine").write_bytes(engine)
    (folder / "tampered.engine").write_bytes(engine[:-7])
    (folder / "tampered.engine.json").write_text(json.dumps({**sidecar, "engine": {**sidecar["engine"],
                                                                                    "file": "tampered.engine"}}))
    # A checkpoint that runs code when unpickled without weights_only=True.
    (folder / "factory.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2))\n")
    import pickle

    with open(folder / "evil.pt", "wb") as handle:  # protocol 2, as torch.save writes
        pickle.dump({"0.weight": Evil(str(folder.parent / "PWNED-pt"))}, handle, protocol=2)


def _prepare_case(name: str, case: Case, out: Path, digits: Path, inputs: Path) -> None:
    out.mkdir(parents=True)
    for existing in case.existing:
        if existing.endswith(".onnx"):
            shutil.copy(digits, out / existing)
        else:
            (out / existing).write_text(f"previous {existing} of case {name}\n")
    recipe = RECIPE_BASE.format(model=digits, data=inputs / "calib.npy")
    (out / "unknown.toml").write_text(recipe + 'methd = "entropy"\n')
    (out / "wrongtype.toml").write_text(recipe + 'batch_size = "large"\n')
    (out / "broken.toml").write_text(recipe + "[quantize\n")


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, digits_onnx, digits_data):
    """Run every case concurrently; returns {case: (result, tree before, tree after)} and the input trees."""
    root = tmp_path_factory.mktemp("bad_input")
    inputs = root / "inputs"
    inputs.mkdir()
    digits = root / "digits.onnx"
    shutil.copy(digits_onnx, digits)
    _make_inputs(inputs, digits, digits_data[0])
    inputs_before = _tree(inputs), hashlib.sha256(digits.read_bytes()).hexdigest()

    def run(name: str):
        case = CASES[name]
        out = root / "out" / name
        _prepare_case(name, case, out, digits, inputs)
        before = _tree(out)
        args = [a.replace("{M}", str(inputs)).replace("{D}", str(digits)).replace("{O}", str(out)) for a in case.args]
        result = run_cli(*args, cwd=out, timeout=300)
        return name, (result, before, _tree(out))

    workers = max(2, min(6, (os.cpu_count() or 2) * 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(pool.map(run, CASES))
    inputs_after = _tree(inputs), hashlib.sha256(digits.read_bytes()).hexdigest()
    return {"results": results, "inputs": (inputs_before, inputs_after), "root": root}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail else n
             for n, c in CASES.items()])
def test_bad_input(matrix, name):
    case = CASES[name]
    result, before, after = matrix["results"][name]
    stderr = result.stderr.strip()
    context = f"exit {result.returncode}, stderr: {stderr[-1500:]!r}"
    assert "Traceback" not in result.stderr, context
    assert result.returncode == 2, context
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    for expected in case.expect:
        assert expected in lines[0], f"{expected!r} not named: {context}"
    assert after == before, f"output folder changed: {sorted(set(after.items()) ^ set(before.items()))}"


def test_inputs_never_modified_and_no_code_ran(matrix):
    before, after = matrix["inputs"]
    assert after == before
    # The pickled payloads (in a .npy and in a checkpoint) would have created these files if unpickled.
    assert not (matrix["root"] / "PWNED-npy").exists()
    assert not (matrix["root"] / "PWNED-pt").exists()
    print(f"\nbad-input matrix: {len(CASES)} cases through the CLI")
