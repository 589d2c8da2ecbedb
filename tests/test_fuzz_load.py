"""Property-based tests (hypothesis) of the model loader against damaged files.

Whatever bytes a user passes as a model (truncated, bit-flipped, spliced, external-data entries pointing
anywhere), `ModelArtifact.load`, `tensor()` and `runtime.session` either work or raise InputFileError with a
one-line message naming the file: never another exception, never a read outside the model's folder.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtkit.errors import InputFileError  # noqa: E402
from trtkit.model import ModelArtifact  # noqa: E402

EXAMPLES = int(os.environ.get("TRTKIT_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES * 2, deadline=None, derandomize=os.environ.get("TRTKIT_FUZZ_RANDOM") is None,
                database=None, suppress_health_check=list(HealthCheck))
OUTCOMES: Counter[str] = Counter()


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [1, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


RAW = _model().SerializeToString()


def _exercise(path: Path) -> str:
    """Load, read every tensor, open a session; return the outcome, or fail on anything but InputFileError."""
    from trtkit import runtime

    try:
        art = ModelArtifact.load(path)
        for name in art.initializers():
            art.tensor(name)
        runtime.session(path)
    except InputFileError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        assert path.name in message or "model" in message, message
        return "refused"
    return "loaded"


@FUZZ
@given(data=st.data())
def test_damaged_model_bytes_are_loaded_or_refused(tmp_path_factory, data):
    raw = bytearray(RAW)
    action = data.draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if action == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            index = data.draw(st.integers(0, len(raw) - 1))
            raw[index] ^= 1 << data.draw(st.integers(0, 7))
    elif action == "splice":
        start = data.draw(st.integers(0, len(raw) - 1))
        raw[start:start] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        raw = bytearray(data.draw(st.binary(max_size=512)))
    path = tmp_path_factory.mktemp("damaged") / "model.onnx"
    path.write_bytes(bytes(raw))
    OUTCOMES[f"bytes {_exercise(path)}"] += 1
    assert path.read_bytes() == bytes(raw)  # the input is never modified


@FUZZ
@given(entries=st.lists(st.tuples(
    st.sampled_from(["location", "offset", "length", "checksum", "junk"]),
    st.one_of(st.sampled_from(["m.onnx.data", "../outside.bin", "/etc/hostname", "sub/../m.onnx.data", "", "."]),
              st.integers(-10, 10**12).map(str), st.text(max_size=8))), min_size=1, max_size=4),
    which=st.integers(0, 2))
def test_external_data_entries_are_validated(tmp_path_factory, entries, which):
    folder = tmp_path_factory.mktemp("ext")
    ModelArtifact.from_model(_model()).save(folder / "m.onnx", external_data=True)
    (folder.parent / "outside.bin").write_bytes(b"\0" * 4096)
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    tensor = model.graph.initializer[which]
    info = {e.key: e.value for e in tensor.external_data}
    info.update(entries)
    del tensor.external_data[:]
    for key, value in info.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(folder / "m.onnx"))
    outcome = _exercise(folder / "m.onnx")
    location = info.get("location", "")
    escapes = (not location or any(c in location for c in "\0\n\r") or os.path.isabs(location)
               or not (folder / location).resolve().is_relative_to(folder.resolve()))
    if escapes:
        assert outcome == "refused", f"external data outside the model's folder was read: {location!r}"
    OUTCOMES[f"external {outcome}"] += 1


def test_report_load_fuzz_counts():
    if not OUTCOMES:
        pytest.skip("run with the fuzz tests above")
    print("\nload fuzz outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(OUTCOMES.items())))
    assert OUTCOMES["bytes refused"] > 0
