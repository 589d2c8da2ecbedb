"""Real TensorRT-RTX builds (ahead of time, no GPU): FP32 and QDQ-INT8, static and dynamic shapes,
timing cache round trip, per-node parser errors, capability check, contradictory options, engine sidecars."""

from __future__ import annotations

import json
import shutil

import pytest
from build_models import custom_op, fp32_conv, qdq_conv

import trtkit
from trtkit.building import check
from trtkit.errors import BuildError, InputFileError, OptionError, UnknownNameError
from trtkit.plugins.tensorrt.build import build_engine, make_progress_monitor
from trtkit.plugins.tensorrt.cuda import gpu_info
from trtkit.plugins.tensorrt.engine import load_engine
from trtkit.plugins.tensorrt.module import import_trt, make_logger
from trtkit.plugins.tensorrt.parser import create_network, parse_onnx
from trtkit.plugins.tensorrt.precision import match_layers, parse_layer_precisions
from trtkit.plugins.tensorrt.sidecar import (
    SIDECAR_FORMAT,
    check_engine_compatible,
    sha256_bytes,
    sidecar_path,
)

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
RTX = "tensorrt-rtx"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rtx_models")
    return {
        "fp32_static": fp32_conv(folder / "fp32_static.onnx", batch=2),
        "fp32_dynamic": fp32_conv(folder / "fp32_dynamic.onnx", batch="N", spatial="S"),
        "qdq": qdq_conv(folder / "qdq.onnx", batch="N"),
        "custom": custom_op(folder / "custom.onnx"),
    }


@pytest.fixture(scope="module")
def static_engine(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtx_static") / "static.engine"
    return trtkit.build(models["fp32_static"], out, builder=RTX)


def _sidecar(engine):
    return json.loads(sidecar_path(engine).read_text())


def test_builders_registered_and_availability():
    from trtkit.registry import get_registry

    builders = get_registry().stages["builders"]
    assert {"onnxruntime", "tensorrt", "tensorrt-rtx"} <= set(builders)
    assert builders[RTX].available() is None
    reason = builders["tensorrt"].available()
    if reason is not None:  # here: no full TensorRT
        assert "tensorrt" in reason


def test_fp32_static_engine_and_sidecar(models, static_engine, tmp_path):
    info = _sidecar(static_engine)
    assert info["format"] == SIDECAR_FORMAT and info["builder"] == RTX
    assert info["module"] == "tensorrt_rtx" and info["tensorrt_version"] == trt.__version__
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 16, 8, 8]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": [2, 16, 1, 1]}]
    assert info["profiles"] == [] and info["precision"]["qdq"] is False and info["precision"]["flags"] == []
    assert info["precision"]["strongly_typed"] is True
    assert info["engine"]["bytes"] == static_engine.stat().st_size > 1000
    assert info["source"]["sha256"] == sha256_bytes(models["fp32_static"].read_bytes())
    # same inputs -> byte-identical engine and sidecar
    again = trtkit.build(models["fp32_static"], tmp_path / "static.engine", builder=RTX)
    assert again.read_bytes() == static_engine.read_bytes()
    assert sidecar_path(again).read_text() == sidecar_path(static_engine).read_text()


def test_fp32_dynamic_profile(models, tmp_path):
    out = trtkit.build(models["fp32_dynamic"], tmp_path / "dyn.engine", builder=RTX,
                       min_shapes="x:1x16x4x4", opt_shapes="x:4x16x8x8", max_shapes="x:8x16x16x16")
    info = _sidecar(out)
    assert info["inputs"][0]["shape"] == [-1, 16, -1, -1]
    assert info["profiles"] == [{"x": {"min": [1, 16, 4, 4], "opt": [4, 16, 8, 8], "max": [8, 16, 16, 16]}}]
    # a different profile is a different engine
    other = trtkit.build(models["fp32_dynamic"], tmp_path / "dyn2.engine", builder=RTX,
                         min_shapes="x:1x16x4x4", max_shapes="x:2x16x4x4")
    assert _sidecar(other)["profiles"][0]["x"]["opt"] == [2, 16, 4, 4]  # opt defaults to max
    assert other.read_bytes() != out.read_bytes()
    with pytest.raises(OptionError, match="input 'x' has a dynamic dim 2"):
        trtkit.build(models["fp32_dynamic"], tmp_path / "bad.engine", builder=RTX)
    with pytest.raises(OptionError, match="min <= opt <= max"):
        trtkit.build(models["fp32_dynamic"], tmp_path / "bad.engine", builder=RTX,
                     min_shapes="x:4x16x8x8", max_shapes="x:2x16x8x8")
    with pytest.raises(OptionError, match="dim 1 is fixed at 16"):
        trtkit.build(models["fp32_dynamic"], tmp_path / "bad.engine", builder=RTX, max_shapes="x:2x3x8x8")
    with pytest.raises(OptionError, match="unknown input 'image'"):
        trtkit.build(models["fp32_dynamic"], tmp_path / "bad.engine", builder=RTX, max_shapes="image:2x16x8x8")
    assert not (tmp_path / "bad.engine").exists()


def test_qdq_int8_dynamic_batch(models, tmp_path):
    out = trtkit.build(models["qdq"], tmp_path / "qdq.engine", builder=RTX, max_batch=16, workspace_mb=64)
    info = _sidecar(out)
    assert info["precision"]["qdq"] is True and info["precision"]["flags"] == []
    assert info["profiles"] == [{"x": {"min": [1, 16, 8, 8], "opt": [16, 16, 8, 8], "max": [16, 16, 8, 8]}}]
    fp32 = trtkit.build(models["fp32_dynamic"], tmp_path / "fp.engine", builder=RTX,
                        max_shapes="x:16x16x8x8", min_shapes="x:1x16x8x8")
    assert out.read_bytes() != fp32.read_bytes()


def test_compute_capability_targets(models, tmp_path):
    out = trtkit.build(models["fp32_static"], tmp_path / "sm.engine", builder=RTX, compute_capability=["86", "sm89"])
    assert _sidecar(out)["compute_capabilities"] == ["sm86", "sm89"]
    with pytest.raises(OptionError, match="unknown compute capability 'sm99'"):
        trtkit.build(models["fp32_static"], tmp_path / "sm2.engine", builder=RTX, compute_capability=["sm99"])


def test_timing_cache_round_trip(models, tmp_path):
    cache = tmp_path / "cache" / "rtx.timing"
    first = trtkit.build(models["fp32_static"], tmp_path / "a.engine", builder=RTX, timing_cache=str(cache))
    assert cache.is_file() and cache.stat().st_size > 0
    saved = cache.read_bytes()
    assert _sidecar(first)["timing_cache"]["loaded"] is False
    second = trtkit.build(models["fp32_static"], tmp_path / "b.engine", builder=RTX, timing_cache=str(cache))
    assert _sidecar(second)["timing_cache"] == {"file": str(cache), "loaded": True, "bytes": len(saved)}
    assert cache.read_bytes() == saved  # loaded, then saved back unchanged
    assert any("does not use it" in note for note in _sidecar(second)["notes"])
    assert second.read_bytes() == first.read_bytes()


def test_parser_errors_name_every_failing_node(models, tmp_path):
    with pytest.raises(BuildError) as caught:
        trtkit.build(models["custom"], tmp_path / "custom.engine", builder=RTX)
    message = str(caught.value)
    assert "\n" not in message
    assert "node 'my_foo' (FooBar)" in message and "custom.onnx" in message
    assert not (tmp_path / "custom.engine").exists()
    assert not sidecar_path(tmp_path / "custom.engine").exists()


def test_unreadable_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(InputFileError, match="bad.onnx: not a readable ONNX model"):
        trtkit.build(bad, tmp_path / "bad.engine", builder=RTX)
    with pytest.raises(InputFileError, match="bad.onnx: not a readable ONNX model"):
        check(bad, builder=RTX)
    not_onnx = tmp_path / "model.pt"
    not_onnx.write_bytes(b"torch checkpoint")
    with pytest.raises(InputFileError, match="model.pt: expected an ONNX model"):
        trtkit.build(not_onnx, tmp_path / "x.engine", builder=RTX)


def test_capability_check(models):
    report = check(models["custom"], builder=RTX)
    assert report["supported"] is False and report["nodes"] == 4
    assert [(u["node"], u["op_type"]) for u in report["unsupported"]] == [("my_foo", "FooBar"), ("my_bar", "Bar2")]
    assert report["unsupported_op_types"] == ["Bar2", "FooBar"]
    ok = check(models["qdq"], builder=RTX)
    assert ok["supported"] is True and ok["unsupported"] == []


def test_digits_fp32_engine(digits_onnx, tmp_path):
    out = trtkit.build(digits_onnx, tmp_path / "digits.engine", builder=RTX, max_batch=64)
    info = _sidecar(out)
    assert info["inputs"][0]["name"] == "image" and info["outputs"][0]["name"] == "logits"
    assert info["profiles"][0]["image"]["max"] == [64, 1, 8, 8]


def test_contradictory_options_on_strongly_typed_tensorrt(models, tmp_path):
    out = tmp_path / "x.engine"
    for options, pattern in [
        ({"precision": "int8"}, "strongly typed: it has no FP16/INT8 builder flags"),
        ({"precision": "fp16"}, "no FP16/INT8 builder flags"),
        ({"calibration_cache": str(tmp_path / "calib.cache")}, "option 'calibration_cache'"),
        ({"layer_precisions": "conv0:fp32"}, "put Cast nodes in the graph"),
        ({"dla_core": 0}, "0 DLA core"),
    ]:
        with pytest.raises(OptionError, match=pattern):
            trtkit.build(models["fp32_static"], out, builder=RTX, **options)
    with pytest.raises(OptionError, match="contradicts the model's Q/DQ nodes"):
        trtkit.build(models["qdq"], out, builder=RTX, precision="fp32", max_batch=2)
    with pytest.raises(UnknownNameError, match="unknown builder 'tensorrt_rtx'"):
        trtkit.build(models["fp32_static"], out, builder="tensorrt_rtx")
    with pytest.raises(OptionError, match="has no option 'maxShapes'"):
        trtkit.build(models["fp32_static"], out, builder=RTX, maxShapes="x:1x16x8x8")
    assert not out.exists()


def test_engine_loading_checks_sidecar_first(static_engine, tmp_path):
    from trtkit.runners import open_runner

    engine = tmp_path / "copy.engine"
    shutil.copy(static_engine, engine)
    with pytest.raises(InputFileError, match="no sidecar copy.engine.json"):
        load_engine(RTX, engine)
    info = _sidecar(static_engine)

    sidecar = sidecar_path(engine)
    sidecar.write_text(json.dumps({**info, "tensorrt_version": "0.9.0"}))
    with pytest.raises(InputFileError, match=r"built with tensorrt_rtx 0\.9\.0, this is TensorRT-RTX"):
        load_engine(RTX, engine)

    sidecar.write_text(json.dumps(info))
    engine.write_bytes(static_engine.read_bytes()[:-10])
    with pytest.raises(InputFileError, match="does not match its sidecar"):
        load_engine(RTX, engine)

    sidecar.write_text("{not json")
    with pytest.raises(InputFileError, match="corrupt engine sidecar"):
        load_engine(RTX, engine)

    with pytest.raises(InputFileError, match="built by 'tensorrt-rtx', not 'tensorrt'"):
        load_engine("tensorrt", static_engine)

    gpu = gpu_info()
    if isinstance(gpu, str):  # this machine: no GPU -> one clear line, no crash
        # (without cuda-python installed the reason names that instead of the missing GPU)
        with pytest.raises(InputFileError, match="cannot run a TensorRT engine here: (no CUDA GPU|cuda-python)"):
            load_engine(RTX, static_engine)
        with pytest.raises(InputFileError, match="cannot run this artefact") as caught:
            open_runner(static_engine)
        assert "tensorrt-rtx:" in str(caught.value) and "\n" not in str(caught.value)


def test_compatibility_against_other_gpus(static_engine):
    """The device check itself, given the device facts a GPU would report."""
    info = _sidecar(static_engine)
    module = import_trt(RTX)
    orin = {"name": "Orin", "compute_capability": "8.7", "count": 1}
    check_engine_compatible(static_engine, info, module, orin)  # RTX default: all targets
    targeted = {**info, "compute_capabilities": ["sm86", "sm89"]}
    with pytest.raises(InputFileError, match=r"built for sm86, sm89, this GPU is Orin \(sm87\)"):
        check_engine_compatible(static_engine, targeted, module, orin)
    check_engine_compatible(static_engine, targeted, module, {**orin, "compute_capability": "8.6"})
    device_built = {**info, "device": {"name": "RTX 3080", "compute_capability": "8.6"}}
    with pytest.raises(InputFileError, match=r"built for RTX 3080 \(compute capability 8\.6\), this GPU is Orin"):
        check_engine_compatible(static_engine, device_built, module, orin)


def test_build_progress_monitor_reports_tensorrt_phases(models, tmp_path, capfd):
    import io

    from rich.console import Console

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100)
    module = import_trt(RTX)
    monitor = make_progress_monitor(module, console)
    assert monitor is not None
    result = build_engine(RTX, models["fp32_static"], tmp_path / "p.engine", {}, progress_console=console)
    assert result.engine.is_file()
    # The same phases reach a monitor attached by build_engine: run one directly to see their names.
    logger = make_logger(module)
    builder = module.Builder(logger)
    network = create_network(module, builder, strongly_typed=False)
    parse_onnx(module, builder, network, logger, models["fp32_static"])
    config = builder.create_builder_config()
    config.progress_monitor = monitor
    with monitor.progress:
        assert builder.build_serialized_network(network, config) is not None
    assert "Building engine" in monitor.phases and not monitor.tasks  # every started phase finished
    assert "Exception caught" not in capfd.readouterr().err  # TensorRT swallows callback errors: check its log


def test_layer_precision_patterns_match_parsed_layer_names(models):
    """TensorRT names parsed layers after the ONNX nodes: patterns are checked against a real parsed network."""
    module = import_trt(RTX)
    logger = make_logger(module)
    builder = module.Builder(logger)
    network = create_network(module, builder, strongly_typed=False)
    parse_onnx(module, builder, network, logger, models["qdq"])
    names = [network.get_layer(i).name for i in range(network.num_layers)]
    assert {"conv0", "x_quant", "W_dequant", "c_dequant"} <= set(names)
    wanted = parse_layer_precisions("conv0:fp32,*_dequant:fp16")
    applied = match_layers(names, wanted)
    assert applied["conv0"] == "fp32" and applied["W_dequant"] == "fp16" and applied["c_dequant"] == "fp16"
    assert "x_quant" not in applied
    with pytest.raises(OptionError, match="unknown layer 'conv9' \\(did you mean: conv0"):
        match_layers(names, {"conv9": "fp32"})
