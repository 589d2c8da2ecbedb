"""The onnxruntime builder: optimized models that run and match, reduced-range weights on CPUs without VNNI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from build_models import fp32_conv, positive_inputs, qdq_conv

import trtkit
from trtkit.errors import BuildError, OptionError, UnknownNameError
from trtkit.fileio import sha256_file
from trtkit.model import ModelArtifact
from trtkit.plugins.onnxruntime_builder import cpu_has_vnni, requantize_reduced_range
from trtkit.runtime import random_inputs, run, session


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ort_models")
    return {"fp32": fp32_conv(folder / "fp32.onnx"), "qdq": qdq_conv(folder / "qdq.onnx"), "folder": folder}


def _metadata(path):
    return ModelArtifact.load(path).metadata


def test_digits_optimized_model_matches_original(digits_onnx, digits_data, tmp_path):
    _, _, x_test, _ = digits_data
    before = sha256_file(digits_onnx)
    out = trtkit.build(digits_onnx, tmp_path / "digits.ort.onnx")
    assert out == tmp_path / "digits.ort.onnx" and out.is_file()
    assert sha256_file(digits_onnx) == before  # input untouched
    feeds = {"image": x_test[:64]}
    expected = run(session(digits_onnx, optimization="disable"), feeds)["logits"]
    got = run(session(out, optimization="disable"), feeds)["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # extended optimization folded the Constant nodes (and whatever else it fuses): a smaller graph
    original_ops = [n.op_type for n in onnx.load(str(digits_onnx)).graph.node]
    built_ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Constant" in original_ops and "Constant" not in built_ops
    assert len(built_ops) < len(original_ops)
    build = _metadata(out)["build"]
    assert build["builder"] == "onnxruntime" and build["optimization"] == "extended"
    assert build["source"]["sha256"] == before


def test_build_is_deterministic_and_levels_apply(models, tmp_path):
    a = trtkit.build(models["fp32"], tmp_path / "a.onnx", optimization="all", threads=1)
    b = trtkit.build(models["fp32"], tmp_path / "b.onnx", optimization="all", threads=1)
    assert a.read_bytes() == b.read_bytes()
    plain = trtkit.build(models["fp32"], tmp_path / "plain.onnx", optimization="disable")
    ops_plain = [n.op_type for n in onnx.load(str(plain)).graph.node]
    assert ops_plain == ["Conv", "Relu", "GlobalAveragePool"]
    assert any("optimization=all" in note for note in _metadata(a)["build"]["notes"])
    feeds = random_inputs(onnx.load(str(models["fp32"])), dims={"N": 3})
    np.testing.assert_allclose(run(session(a), feeds)["y"], run(session(plain), feeds)["y"], rtol=1e-4, atol=1e-5)


def test_cpu_has_vnni_reads_flags():
    assert cpu_has_vnni("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n") is True
    assert cpu_has_vnni("flags : fpu sse avx2 avx_vnni\n") is True
    assert cpu_has_vnni("flags : fpu sse sse2 avx avx2 fma\n") is False
    assert cpu_has_vnni("no flags line here\n") is None


def test_requantize_reduced_range_moves_weights_by_at_most_half_a_step(models):
    artifact = ModelArtifact.load(models["qdq"])
    result, names = requantize_reduced_range(artifact)
    assert names == ["W_q"]
    q_old, s_old = artifact.tensor("W_q").astype(np.float64), artifact.tensor("W_scale").astype(np.float64)
    q_new, s_new = result.tensor("W_q"), result.tensor("W_scale").astype(np.float64)
    assert q_new.dtype == np.int8 and q_new.min() >= -64 and q_new.max() <= 63
    assert np.abs(q_new).max() == 63  # the full 7-bit range is used
    w_old = q_old * s_old[:, None, None, None]
    w_new = q_new * s_new[:, None, None, None]
    assert np.all(np.abs(w_new - w_old) <= s_new[:, None, None, None] / 2 + 1e-7)
    assert artifact.tensor("W_q").max() == 127  # the input artefact is not modified


@pytest.mark.skipif(cpu_has_vnni() is not False, reason="needs an x86 CPU without VNNI (where int8 kernels saturate)")
def test_qdq_without_vnni_is_requantized_and_no_longer_saturates(models, tmp_path):
    feeds = positive_inputs()
    truth = run(session(models["qdq"]), feeds)["y"]  # Q/DQ emulated in float: what TensorRT computes
    step = 0.5  # output quantization step (c_scale)

    saturating = trtkit.build(models["qdq"], tmp_path / "keep8.onnx", no_vnni="ignore")
    raw = run(session(saturating, emulate_qdq=False), feeds)["y"]
    assert "8-bit kept" in _metadata(saturating)["build"]["int8_weights"]

    fixed = trtkit.build(models["qdq"], tmp_path / "reduced.onnx")
    assert [n.op_type for n in onnx.load(str(fixed)).graph.node].count("QLinearConv") == 1  # really int8 kernels
    good = run(session(fixed, emulate_qdq=False), feeds)["y"]
    build = _metadata(fixed)["build"]
    assert build["vnni"] is False and build["requantized_weights"] == 1
    assert build["int8_weights"].startswith("reduced-range")
    # 8-bit weights saturate by many output steps; 7-bit ones stay within the 7-bit weight rounding.
    assert np.abs(raw - truth).max() > 10 * step
    assert np.abs(good - truth).max() <= 2 * step
    assert np.mean(good == truth) > 0.9

    with pytest.raises(BuildError, match="without VNNI"):
        trtkit.build(models["qdq"], tmp_path / "refused.onnx", no_vnni="refuse")
    assert not (tmp_path / "refused.onnx").exists()


def test_vnni_target_keeps_8bit_weights(models, tmp_path):
    out = trtkit.build(models["qdq"], tmp_path / "vnni.onnx", vnni="yes", optimization="disable")
    assert _metadata(out)["build"]["int8_weights"] == "8-bit (VNNI)"
    weights = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert np.abs(onnx.numpy_helper.to_array(weights["W_q"])).max() == 127


def test_loads_through_open_runner_and_builder(models, tmp_path):
    from trtkit.registry import get_registry
    from trtkit.runners import open_runner

    out = trtkit.build(models["fp32"], tmp_path / "m.onnx")
    runner = open_runner(out)
    feeds = random_inputs(onnx.load(str(out)), dims={"N": 2})
    direct = get_registry().builder("onnxruntime").load(out)
    np.testing.assert_array_equal(runner.run(feeds)["y"], direct.run(feeds)["y"])
    with pytest.raises(trtkit.errors.InputFileError, match="not an ONNX model"):
        get_registry().builder("onnxruntime").load(tmp_path / "x.engine")


def test_bad_options_and_paths(models, tmp_path):
    with pytest.raises(OptionError, match="execution provider 'CUDAExecutionProviderX'"):
        trtkit.build(models["fp32"], tmp_path / "p.onnx", providers=["CUDAExecutionProviderX"])
    with pytest.raises(OptionError, match="has no option 'optimisation'"):
        trtkit.build(models["fp32"], tmp_path / "p.onnx", optimisation="all")
    with pytest.raises(OptionError, match="must be one of"):
        trtkit.build(models["fp32"], tmp_path / "p.onnx", optimization="max")
    with pytest.raises(OptionError, match="use a .onnx name"):
        trtkit.build(models["fp32"], tmp_path / "p.engine")
    with pytest.raises(OptionError, match="would overwrite the input"):
        trtkit.build(models["fp32"], models["fp32"])
    with pytest.raises(UnknownNameError, match="did you mean: onnxruntime"):
        trtkit.build(models["fp32"], tmp_path / "p.onnx", builder="onnxrt")
    with pytest.raises(trtkit.errors.InputFileError, match="no such file"):
        trtkit.build(tmp_path / "missing.onnx", tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()


def test_model_artifact_input_and_default_output(models, tmp_path):
    artifact = ModelArtifact.load(models["fp32"])
    artifact.metadata["note"] = "kept"
    out = trtkit.build(artifact, tmp_path / "from_artifact.onnx")
    assert _metadata(out)["note"] == "kept"
    from trtkit.building import default_output

    assert default_output(models["fp32"], "onnxruntime").name == "fp32.ort.onnx"
    assert default_output(models["fp32"], "tensorrt-rtx").name == "fp32.tensorrt-rtx.engine"
    assert json.loads(json.dumps(_metadata(out)["build"]))["providers"] == ["CPUExecutionProvider"]
