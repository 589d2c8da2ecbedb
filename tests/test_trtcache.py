"""TensorRT calibration cache: exact format, header versions, round trips, malformed files."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from qdq_models import random_batch, residual_model

from trtkit.calibration import calibrate
from trtkit.errors import InputFileError, OptionError, UnknownNameError
from trtkit.scales import Scales
from trtkit.trtcache import float_to_hex, format_cache, read_cache, version_number, write_cache


def test_hex_is_the_big_endian_float32_bit_pattern():
    assert float_to_hex(0.0) == "0"
    assert float_to_hex(1.0) == "3f800000"
    value = struct.unpack(">f", bytes.fromhex("3caa54fc"))[0]
    assert float_to_hex(value) == "3caa54fc"
    # the example from the TensorRT notes: input: 3caa54fc -> scale 0.020792 -> amax 2.6406
    text = format_cache({"input": value * 127.0})
    assert text.splitlines()[1] == "input: 3caa54fc"
    assert value * 127 == pytest.approx(2.6406, abs=1e-4)


def test_header_versions():
    assert version_number("8.6.1") == 8601
    assert version_number("8.5.2") == 8502
    assert version_number("10.3.0") == 100300
    assert version_number("10.14.1") == 101401
    assert version_number("8601") == 8601
    with pytest.raises(OptionError, match="--trt-version"):
        version_number("eight")
    assert format_cache({"a": 1.0}, trt_version="10.3.0").startswith("TRT-100300-EntropyCalibration2\n")
    assert format_cache({"a": 1.0}, algorithm="MinMaxCalibration").startswith("TRT-8601-MinMaxCalibration\n")


def test_zero_is_written_as_0_and_lines_are_sorted(tmp_path):
    path = write_cache({"b": 2.54, "a": 0.0}, tmp_path / "c.cache")
    lines = path.read_text().splitlines()
    assert lines == ["TRT-8601-EntropyCalibration2", "a: 0", f"b: {float_to_hex(np.float32(0.02))}"]


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    scales = Scales({f"t{i}": float(v) for i, v in enumerate(rng.uniform(1e-3, 1e3, size=50))})
    first = write_cache(scales, tmp_path / "a.cache", trt_version="10.3.0")
    loaded = read_cache(first)
    assert loaded.options == {"trt_version": 100300, "algorithm": "EntropyCalibration2"}
    second = write_cache(loaded, tmp_path / "b.cache", trt_version=loaded.options["trt_version"])
    assert first.read_bytes() == second.read_bytes()
    for name, amax in scales.items():  # float32 scale: amax round trips to float32 precision
        assert loaded[name] == pytest.approx(amax, rel=1e-7)
    # zero scales survive a round trip too
    write_cache({"z": 0.0, "y": 1.0}, tmp_path / "z.cache")
    zero = read_cache(tmp_path / "z.cache")
    assert zero.zero == ["z"] and "z" not in zero
    write_cache(zero, tmp_path / "z2.cache")
    assert (tmp_path / "z.cache").read_bytes() == (tmp_path / "z2.cache").read_bytes()
    # Scales.load recognises a cache
    assert dict(Scales.load(first)) == dict(loaded)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty calibration cache"),
        ("TRT-abc-EntropyCalibration2\na: 3f800000\n", r":1: bad calibration cache header"),
        ("hello\n", r":1: bad calibration cache header"),
        ("TRT-8601-EntropyCalibration2\na 3f800000\n", r":2: malformed line"),
        ("TRT-8601-EntropyCalibration2\na: 3f800000\nb: xyz\n", r":3: malformed line"),
        ("TRT-8601-EntropyCalibration2\na: 3f800000\na: 3f800000\n", r":3: tensor 'a' appears twice"),
        ("TRT-8601-EntropyCalibration2\na: 7fc00000\n", r":2: tensor 'a' has an invalid scale"),
        ("TRT-8601-EntropyCalibration2\na: bf800000\n", r":2: tensor 'a' has an invalid scale"),
    ],
)
def test_malformed_caches_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.cache"
    path.write_text(content)
    with pytest.raises(InputFileError, match=match) as info:
        read_cache(path)
    assert "bad.cache" in str(info.value)


def test_cache_imports_as_custom_scales(tmp_path):
    model = residual_model()
    onnx.save(model, tmp_path / "m.onnx")
    data = random_batch(model, 16)
    write_cache({"relu0_out": 1.5}, tmp_path / "pin.cache")
    scales = calibrate(tmp_path / "m.onnx", data, method="minmax", overrides=tmp_path / "pin.cache", progress=False)
    assert scales["relu0_out"] == pytest.approx(1.5, rel=1e-7) and scales.sources["relu0_out"] == "override"
    write_cache({"relu0_outt": 1.5}, tmp_path / "typo.cache")
    with pytest.raises(UnknownNameError, match="did you mean: relu0_out"):
        calibrate(tmp_path / "m.onnx", data, overrides=tmp_path / "typo.cache", progress=False)
