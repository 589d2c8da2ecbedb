"""Calibration data sources: every kind of spec, validation before work, clear errors on bad data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper
from qdq_models import conv_model

from trtkit.data import DataFingerprint, Preprocess, load_data
from trtkit.errors import DataError, InputFileError, OptionError


@pytest.fixture(scope="module")
def model():
    return conv_model(cin=3)


def _two_input_model():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _collect(source):
    return [dict(b) for b in source.batches()]


def test_npy_is_read_batch_by_batch(tmp_path, model):
    data = np.random.default_rng(0).normal(size=(10, 3, 8, 8)).astype(np.float64)
    np.save(tmp_path / "d.npy", data)
    source = load_data(tmp_path / "d.npy", model, batch_size=4)
    assert source.num_samples == 10
    batches = _collect(source)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["x"].dtype == np.float32 for b in batches)  # float64 is cast to the model's dtype
    np.testing.assert_allclose(np.concatenate([b["x"] for b in batches]), data.astype(np.float32))
    assert _collect(source)[0]["x"].shape == (4, 3, 8, 8)  # re-iterable
    assert len(_collect(load_data(tmp_path / "d.npy", model, batch_size=4, limit=5))) == 2


def test_npz_dict_array_iterable_callable(tmp_path):
    two = _two_input_model()
    a, b = np.ones((6, 4), np.float32), np.zeros((6, 4), np.float32)
    np.savez(tmp_path / "d.npz", a=a, b=b)
    assert load_data(tmp_path / "d.npz", two, batch_size=5).num_samples == 6
    assert [x["a"].shape[0] for x in _collect(load_data({"a": a, "b": b}, two, batch_size=5))] == [5, 1]
    batches = [{"a": a[:3], "b": b[:3]}, {"a": a[3:], "b": b[3:]}]
    assert len(_collect(load_data(batches, two))) == 2
    assert len(_collect(load_data(lambda: iter(batches), two))) == 2
    # tuples feed inputs in order; trailing elements (labels) are ignored
    tuples = [(a[:3], b[:3], np.arange(3)), (a[3:], b[3:], np.arange(3))]
    source = load_data(iter(tuples), two)
    assert sum(x["a"].shape[0] for x in source.batches()) == 6
    assert source.num_samples == 6
    with pytest.raises(DataError, match="one-shot"):
        list(source.batches())


def test_torch_dataloader(model):
    torch = pytest.importorskip("torch")
    x = torch.randn(10, 3, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10)), batch_size=4)
    source = load_data(loader, model)
    assert source.num_samples == 10
    got = np.concatenate([b["x"] for b in source.batches()])
    np.testing.assert_array_equal(got, x.numpy())


def test_image_folder_with_declared_preprocessing(tmp_path, model):
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    prep = {"resize": "10", "crop": "8", "mean": "0.5,0.5,0.5", "std": "0.25", "channels": "bgr"}
    source = load_data(tmp_path, model, batch_size=2, preprocess=prep)
    assert source.num_samples == 3
    batch = next(source.batches())["x"]
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == np.float32
    # recompute the first image by hand: resize shorter side to 10 (12x16 -> 10x13), center crop 8, BGR, norm
    image = Image.open(tmp_path / "0.png").convert("RGB").resize((13, 10), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32)[1:9, 2:10, ::-1] / 255.0
    expected = ((array - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(batch[0], expected, atol=1e-5)
    with pytest.raises(OptionError, match="resise"):
        load_data(tmp_path, model, preprocess={"resise": 8})
    assert Preprocess.from_options({"scale": "1/255"}).scale == pytest.approx(1 / 255)


def test_wrong_shape_names_input_and_both_shapes(model):
    with pytest.raises(DataError) as info:
        load_data(np.zeros((4, 3, 9, 8), np.float32), model)
    message = str(info.value)
    assert "'x'" in message and "[4, 3, 9, 8]" in message and "[N, 3, 8, 8]" in message
    with pytest.raises(DataError, match="rank"):
        load_data(np.zeros((4, 3, 8), np.float32), model)


def test_wrong_name_lists_close_matches(tmp_path):
    two = _two_input_model()
    np.savez(tmp_path / "d.npz", a=np.ones((2, 4), np.float32), bb=np.ones((2, 4), np.float32))
    with pytest.raises(DataError, match=r"unknown input 'bb'.*did you mean: b"):
        load_data(tmp_path / "d.npz", two)
    with pytest.raises(DataError, match="no data for input 'b'"):
        load_data({"a": np.ones((2, 4), np.float32)}, two)


def test_wrong_dtype_and_bad_values(model):
    with pytest.raises(DataError, match="dtype <U1"):
        load_data(np.full((2, 3, 8, 8), "a"), model)
    bad = np.zeros((5, 3, 8, 8), np.float32)
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"'x' has NaN/Inf values \(sample 3\)"):
        list(load_data(bad, model, batch_size=2).batches())
    bad[3, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="NaN/Inf"):
        list(load_data(bad, model).batches())
    with pytest.raises(DataError, match="no samples"):
        load_data(np.zeros((0, 3, 8, 8), np.float32), model)
    with pytest.raises(DataError, match="no samples"):
        load_data(iter([]), model)


def test_int_input_refuses_float_data():
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"])], "ids",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 3])])
    ids = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DataError, match="dtype float32, the model expects int64"):
        load_data(np.zeros((2, 3), np.float32), ids)
    assert next(load_data(np.zeros((2, 3), np.int32), ids).batches())["ids"].dtype == np.int64


def test_fixed_batch_models_get_their_batch_size():
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    source = load_data(np.zeros((10, 3, 8, 8), np.float32), model, batch_size=3)
    assert [b["x"].shape[0] for b in source.batches()] == [4, 4]
    with pytest.raises(DataError, match="fixed batch size 4"):
        load_data(np.zeros((2, 3, 8, 8), np.float32), model)


def test_bad_files(tmp_path, model):
    with pytest.raises(InputFileError, match="no such file"):
        load_data(tmp_path / "missing.npy", model)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(InputFileError, match=r"junk.npy: not a readable \.npy"):
        load_data(tmp_path / "junk.npy", model)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(InputFileError, match="unsupported data file"):
        load_data(tmp_path / "d.csv", model)


def test_fingerprint_is_independent_of_batching(model):
    data = np.random.default_rng(0).normal(size=(9, 3, 8, 8)).astype(np.float32)
    digests = []
    for batch_size in (1, 4, 9):
        fingerprint = DataFingerprint(["x"])
        for feeds in load_data(data, model, batch_size=batch_size).batches():
            fingerprint.update(feeds)
        digests.append(fingerprint.hexdigest())
    assert len(set(digests)) == 1
    fingerprint = DataFingerprint(["x"])
    fingerprint.update({"x": data[::-1]})
    assert fingerprint.hexdigest() != digests[0]


def test_cli_data_errors_are_one_line(tmp_path, model):
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 7, 8), np.float32))
    result = run_cli("calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "bad.npy"), "-o",
                     str(tmp_path / "s.json"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "[N, 3, 8, 8]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()


def test_preprocessing_options_need_an_image_folder(model):
    with pytest.raises(OptionError, match="preprocessing option 'resize': invalid value 'abc'"):
        load_data(np.zeros((2, 3, 8, 8), np.float32), model, preprocess={"resize": "abc"})
    with pytest.raises(OptionError, match="image folders only"):
        load_data(np.zeros((2, 3, 8, 8), np.float32), model, preprocess={"resize": "8"})
