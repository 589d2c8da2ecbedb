"""The TensorRT builder plugin (plugins/tensorrt/): option rules per TensorRT version, shape syntax, calibration data, and the
full-TensorRT paths (run where `tensorrt` and a GPU exist, skipped with the reason elsewhere)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from build_models import fp32_conv, positive_inputs, qdq_conv

import trtkit
from trtkit.errors import BuildError, InputFileError, OptionError, TrtkitError
from trtkit.plugins.tensorrt.calibrator import calibrator_for_cache, load_calibration_batches
from trtkit.plugins.tensorrt.cuda import gpu_info
from trtkit.plugins.tensorrt.module import (
    import_trt,
    product,
    strongly_typed_only,
    unavailable_reason,
    version_tuple,
)
from trtkit.plugins.tensorrt.precision import check_options, parse_layer_precisions
from trtkit.plugins.tensorrt.profiles import parse_shapes
from trtkit.plugins.tensorrt.sidecar import read_sidecar


def _version(name: str, version: str) -> types.ModuleType:
    """A module object carrying only a name and a version: what check_options reads to pick the rules."""
    module = types.ModuleType(name)
    module.__version__ = version  # type: ignore[attr-defined]
    return module


TRT86, TRT10, TRT11 = _version("tensorrt", "8.6.1"), _version("tensorrt", "10.3.0"), _version("tensorrt", "11.0.0")
RTX = _version("tensorrt_rtx", "1.7.1.116")


def test_version_rules():
    assert not strongly_typed_only(TRT86) and not strongly_typed_only(TRT10)
    assert strongly_typed_only(TRT11) and strongly_typed_only(RTX)
    assert version_tuple(TRT10) == (10, 3, 0)
    assert product(RTX) == "TensorRT-RTX 1.7.1.116"


@pytest.mark.parametrize("module", [TRT86, TRT10])
def test_precision_flags_up_to_trt10(module):
    check = check_options
    assert check(module, {"precision": "auto"}, qdq=False) == []
    assert check(module, {"precision": "auto"}, qdq=True) == ["INT8"]  # explicit quantization needs the flag
    assert check(module, {"precision": "fp16"}, qdq=False) == ["FP16"]
    assert check(module, {"precision": "best"}, qdq=True) == ["FP16", "INT8"]
    assert check(module, {"precision": "int8", "calibration_cache": "c.cache"}, qdq=False) == ["INT8"]
    assert check(module, {"precision": "fp16", "dla_core": 0}, qdq=False) == ["FP16"]
    with pytest.raises(OptionError, match="needs calibration_cache or calibration_data"):
        check(module, {"precision": "int8"}, qdq=False)
    with pytest.raises(OptionError, match="contradict the model's Q/DQ nodes"):
        check(module, {"precision": "int8", "calibration_cache": "c.cache"}, qdq=True)
    with pytest.raises(OptionError, match="need precision=int8"):
        check(module, {"precision": "fp16", "calibration_data": "d.npz"}, qdq=False)
    with pytest.raises(OptionError, match="DLA runs FP16 or INT8 only"):
        check(module, {"precision": "auto", "dla_core": 0}, qdq=False)
    with pytest.raises(OptionError, match="for TensorRT-RTX ahead-of-time builds"):
        check(module, {"precision": "auto", "compute_capability": ["sm87"]}, qdq=False)
    with pytest.raises(OptionError, match="contradicts strongly_typed=true"):
        check(module, {"precision": "fp16", "strongly_typed": True}, qdq=False)
    assert check(module, {"precision": "auto", "strongly_typed": True}, qdq=True) == []


@pytest.mark.parametrize("module", [TRT11, RTX])
def test_no_implicit_int8_on_strongly_typed_versions(module):
    check = check_options
    assert check(module, {"precision": "auto"}, qdq=True) == []
    for options in ({"precision": "int8"}, {"precision": "fp16"}, {"precision": "best"},
                    {"calibration_cache": "c.cache"}, {"calibration_data": "d.npz"},
                    {"layer_precisions": "conv0:fp32"}):
        with pytest.raises(OptionError, match="strongly typed"):
            check(module, options, qdq=False)


def test_shape_syntax():
    assert parse_shapes("x:1x3x224x224,y:2x5", "max_shapes") == {"x": (1, 3, 224, 224), "y": (2, 5)}
    assert parse_shapes("input:0:1x4", "min_shapes") == {"input:0": (1, 4)}
    assert parse_shapes(None, "min_shapes") == {}
    for bad in ("x=1x3", "x:1xa", "x:0x3"):
        with pytest.raises(OptionError, match="option 'max_shapes'"):
            parse_shapes(bad, "max_shapes")


def test_layer_precision_syntax():
    assert parse_layer_precisions("conv0:fp32, head*:fp16") == {"conv0": "fp32", "head*": "fp16"}
    with pytest.raises(OptionError, match="option 'layer_precisions'"):
        parse_layer_precisions("conv0:fp64")


def test_calibration_batches_from_trtkit_data_sources(tmp_path):
    model = fp32_conv(tmp_path / "m.onnx", batch="N")
    data = positive_inputs(batch=10)["x"].astype(np.float64)
    np.savez(tmp_path / "calib.npz", x=data)
    batches = load_calibration_batches(tmp_path / "calib.npz", model, batch_size=4)
    assert len(batches) == 2 and batches[1]["x"].dtype == np.float32  # the remainder of 2 is dropped
    np.testing.assert_array_equal(batches[1]["x"], data[4:8].astype(np.float32))
    np.save(tmp_path / "calib.npy", data)
    assert len(load_calibration_batches(tmp_path / "calib.npy", model, batch_size=5)) == 2
    np.savez(tmp_path / "wrong.npz", image=data)
    with pytest.raises(TrtkitError, match="wrong.npz"):
        load_calibration_batches(tmp_path / "wrong.npz", model, batch_size=4)
    with pytest.raises(InputFileError, match="fewer samples than calibration_batch_size=16"):
        load_calibration_batches(tmp_path / "calib.npz", model, batch_size=16)


def test_missing_tensorrt_is_a_reason_not_a_crash(tmp_path):
    reason = unavailable_reason("tensorrt")
    if reason is None:
        pytest.skip("full TensorRT is installed here")
    assert reason.startswith("tensorrt: ") and "\n" not in reason
    model = fp32_conv(tmp_path / "m.onnx", batch=1)
    with pytest.raises(BuildError, match="builder 'tensorrt' is not usable here"):
        trtkit.build(model, tmp_path / "m.engine", builder="tensorrt")


# ---- full TensorRT + GPU (Jetson, x86 with NVIDIA GPU) --------------------------------------------------------

def _full_tensorrt_reason() -> str | None:
    return unavailable_reason("tensorrt")  # None only with full TensorRT and a usable GPU


needs_gpu = pytest.mark.skipif(_full_tensorrt_reason() is not None,
                               reason=f"needs NVIDIA TensorRT and a GPU: {_full_tensorrt_reason()}")


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_fp32_engine_runs_like_onnxruntime(tmp_path):
    from trtkit.runners import open_runner
    from trtkit.runtime import run, session

    model = fp32_conv(tmp_path / "m.onnx", batch="N")
    engine = trtkit.build(model, tmp_path / "m.engine", builder="tensorrt", max_batch=8,
                          timing_cache=str(tmp_path / "t.cache"))
    feeds = positive_inputs(batch=4)
    expected = run(session(model), feeds)["y"]
    got = open_runner(engine).run(feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    info = read_sidecar(engine)
    assert info["device"]["compute_capability"] == gpu_info()["compute_capability"]  # type: ignore[index]
    again = trtkit.build(model, tmp_path / "m2.engine", builder="tensorrt", max_batch=8,
                         timing_cache=str(tmp_path / "t.cache"))
    assert read_sidecar(again)["timing_cache"]["loaded"] is True


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_qdq_engine_matches_float_emulation(tmp_path):
    from trtkit.runners import open_runner
    from trtkit.runtime import run, session

    model = qdq_conv(tmp_path / "q.onnx", batch="N")
    engine = trtkit.build(model, tmp_path / "q.engine", builder="tensorrt", max_batch=4)
    feeds = positive_inputs(batch=4)
    expected = run(session(model), feeds)["y"]
    got = open_runner(engine).run(feeds)["y"]
    assert np.abs(got - expected).max() <= 0.5 + 1e-6  # within one output quantization step


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_implicit_int8_with_calibrator(tmp_path):
    module = import_trt("tensorrt")
    if strongly_typed_only(module):
        pytest.skip(f"{product(module)} has no implicit INT8 (TensorRT 11 removed it)")
    model = fp32_conv(tmp_path / "m.onnx", batch="N")
    np.savez(tmp_path / "calib.npz", x=positive_inputs(batch=32)["x"])
    cache = tmp_path / "calib.cache"
    engine = trtkit.build(model, tmp_path / "m.engine", builder="tensorrt", precision="int8", max_batch=8,
                          calibration_data=str(tmp_path / "calib.npz"), calibration_cache=str(cache))
    assert cache.read_text().startswith("TRT-")
    assert read_sidecar(engine)["precision"]["calibration"]["batches"] == 4
    from_cache = trtkit.build(model, tmp_path / "c.engine", builder="tensorrt", precision="int8", max_batch=8,
                              calibration_cache=str(cache))
    assert read_sidecar(from_cache)["precision"]["calibration"]["source"] == "cache"


def test_cache_header_decides_the_calibrator_class(tmp_path):
    from trtkit.trtcache import write_cache

    scales = {"x": 2.0, "c": 5.0}
    entropy = write_cache(scales, tmp_path / "entropy.cache", trt_version="10.3.0")
    minmax = write_cache(scales, tmp_path / "minmax.cache", trt_version="8.6.1", algorithm="MinMaxCalibration")
    legacy = write_cache(scales, tmp_path / "legacy.cache", algorithm="LegacyCalibration")
    assert calibrator_for_cache(entropy) == ("entropy", 100300)
    assert calibrator_for_cache(minmax) == ("minmax", 8601)
    with pytest.raises(InputFileError, match="algorithm 'LegacyCalibration' is not supported"):
        calibrator_for_cache(legacy)
    (tmp_path / "bad.cache").write_text("not a cache\n")
    with pytest.raises(InputFileError, match="bad.cache:1: bad calibration cache header"):
        calibrator_for_cache(tmp_path / "bad.cache")
