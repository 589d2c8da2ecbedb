"""Builders declare capabilities (check, describe, suffix, default) and the core uses them, never names:
a third-party builder, installed as a real distribution, gets the default output name, `--check`, `inspect`
and input specs exactly as the built-in ones do."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from build_models import custom_op, fp32_conv
from conftest import run_cli
from plugin_dists import make_distribution

ROOT = Path(__file__).resolve().parent.parent

# Writes the model's initializers into OUT (.npz) and a sidecar OUT.meta.json; its check refuses op types
# outside a small set, its describe reads the sidecar. No `default`: onnxruntime stays the default builder.
WEIGHTS_BUILDER = """
    import json
    from pathlib import Path

    from trtkit import hookimpl
    from trtkit.errors import InputFileError
    from trtkit.stages import Builder

    KNOWN = {"Conv", "Relu", "GlobalAveragePool"}

    def _sidecar(path):
        return Path(path).with_name(Path(path).name + ".meta.json")

    def build(model, output):
        import numpy as np
        from trtkit.model import ModelArtifact
        from trtkit.runtime import input_specs

        artifact = ModelArtifact.load(model)
        weights = {t.name: artifact.tensor(t) for t in artifact.model.graph.initializer}
        with open(output, "wb") as handle:
            np.savez(handle, **weights)
        inputs = [{"name": s.name, "dtype": s.dtype, "shape": [d if isinstance(d, int) else -1 for d in s.shape]}
                  for s in input_specs(artifact.model)]
        _sidecar(output).write_text(json.dumps({"tensors": sorted(weights), "inputs": inputs}))
        return Path(output)

    def check(model):
        from trtkit.model import ModelArtifact

        nodes = list(ModelArtifact.load(model).model.graph.node)
        unsupported = [{"index": i, "node": n.name, "op_type": n.op_type, "reason": "not a weights op"}
                       for i, n in enumerate(nodes) if n.op_type not in KNOWN]
        return {"model": str(model), "builder": "weights-npz", "supported": not unsupported,
                "unsupported": unsupported}

    def describe(artifact):
        if not str(artifact).endswith(".npz"):
            return None
        side = _sidecar(artifact)
        if not side.is_file():
            raise InputFileError(f"{artifact}: no {side.name}")
        return {"kind": "weights", **json.loads(side.read_text())}

    @hookimpl
    def register_builders(register):
        register(Builder(name="weights-npz", description="initializers as .npz", build=build, check=check,
                         describe=describe, suffix=".weights.npz"))
        register(Builder(name="bare-copy", description="no optional capabilities",
                         build=lambda model, output: Path(output).write_bytes(Path(model).read_bytes()) and Path(output)))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return make_distribution(tmp_path_factory.mktemp("site"), "weights-builder", {"weights_builder": WEIGHTS_BUILDER})


@pytest.fixture(scope="module")
def env(site) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture()
def registry(site, monkeypatch):
    """The process-wide registry with the third-party builder loaded through its real entry point."""
    from trtkit.registry import load_plugins, set_registry

    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    set_registry(load_plugins())
    yield
    set_registry(None)


def test_third_party_builder_gets_suffix_check_and_inspect_through_the_cli(env, tmp_path):
    model = fp32_conv(tmp_path / "m.onnx", batch="N")
    built = run_cli("build", str(model), "-b", "weights-npz", env=env)
    assert built.returncode == 0, built.stderr
    out = tmp_path / "m.weights.npz"  # the builder's suffix, not a name the core knows
    assert out.is_file() and (tmp_path / "m.weights.npz.meta.json").is_file()

    shown = run_cli("inspect", str(out), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["kind"] == "weights" and info["artifact"] == str(out) and info["tensors"] == ["B", "W"]

    ok = run_cli("build", str(model), "-b", "weights-npz", "--check", "--json", env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["supported"] is True, ok.stderr
    custom = run_cli("build", str(custom_op(tmp_path / "c.onnx")), "-b", "weights-npz", "--check", "--json", env=env)
    assert custom.returncode == 1, custom.stderr
    assert {u["op_type"] for u in json.loads(custom.stdout)["unsupported"]} == {"FooBar", "Bar2"}

    bare = run_cli("build", str(model), "-b", "bare-copy", "--check", env=env)
    lines = [line for line in bare.stderr.splitlines() if line.strip()]
    assert bare.returncode == 2 and lines == ["error: builder 'bare-copy' has no capability check"], bare.stderr
    copied = run_cli("build", str(model), "-b", "bare-copy", "--json", env=env)  # no describe: nothing read back
    assert copied.returncode == 0, copied.stderr
    summary = json.loads(copied.stdout)
    assert summary["artifact"] == str(tmp_path / "m.bare-copy.engine") and summary["builder"] == "bare-copy"
    assert (tmp_path / "m.bare-copy.engine").read_bytes() == model.read_bytes()


def test_default_builder_output_names_and_input_specs_come_from_the_components(registry, tmp_path):
    from trtkit.building import build, default_builder, default_output, describe
    from trtkit.evaluation import model_inputs
    from trtkit.registry import get_registry

    builders = get_registry().stages["builders"]
    assert [name for name, b in builders.items() if b.default] == [default_builder()] == ["onnxruntime"]
    assert default_output("a/m.onnx") == Path("a/m.ort.onnx")
    assert default_output("a/m.onnx", "tensorrt-rtx") == Path("a/m.tensorrt-rtx.engine")
    assert default_output("a/m.onnx", "weights-npz") == Path("a/m.weights.npz")
    assert default_output("a/m.onnx", "bare-copy") == Path("a/m.bare-copy.engine")  # no suffix declared

    model = fp32_conv(tmp_path / "m.onnx", batch="N")
    out = build(model, builder="weights-npz")
    assert describe(out)["kind"] == "weights"
    assert model_inputs(str(out)) == {"x": ("float32", (None, 16, 8, 8))}  # read through describe()
    assert build(model) == tmp_path / "m.ort.onnx"  # builder=None: the default one

    # In memory (ModelArtifact, ModelProto): staged to a file for the builder, named after its source.
    import onnx

    from trtkit.errors import OptionError
    from trtkit.model import ModelArtifact

    (tmp_path / "m.weights.npz").unlink()
    assert build(ModelArtifact.load(model), builder="weights-npz") == tmp_path / "m.weights.npz"
    with pytest.raises(OptionError, match="give an output path for an in-memory model"):
        build(onnx.load(str(model)))
    assert model_inputs(str(build(onnx.load(str(model)), tmp_path / "p.ort.onnx"))) == {"x": ("float32", ("N", 16, 8, 8))}


def test_core_build_code_names_no_builder():
    for path in ("core/building.py", "core/runners.py"):
        text = (ROOT / path).read_text()
        assert not re.search(r"tensorrt|['\"]onnxruntime['\"]", text, re.IGNORECASE), path
