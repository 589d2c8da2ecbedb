"""Atomic artefacts: a write either replaces the target whole or leaves it untouched, and leaves no temp files.

Covers fileio (single files and multi-file commits), ModelArtifact.save with its external-data pair, and real
interrupted processes: SIGINT and SIGTERM during a long write leave the previous artefacts byte-identical and
no temporary file behind; SIGKILL (which nothing can catch) still leaves the previous artefacts intact.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from trtkit import fileio  # noqa: E402
from trtkit.errors import InputFileError  # noqa: E402
from trtkit.model import ModelArtifact  # noqa: E402


def small_model(width: int = 32, seed: int = 0, layers: int = 2) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, previous = [], [], "x"
    for index in range(layers):
        w = rng.standard_normal((width, width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{index}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [f"h{index}"], name=f"mm{index}"))
        previous = f"h{index}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- fileio ---------------------------------------------------------------------------------------------
def test_atomic_path_replaces_on_success_and_keeps_target_on_failure(tmp_path):
    target = tmp_path / "report.json"
    fileio.write_text(target, "old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert fileio.temp_files(tmp_path) == []
    with fileio.atomic_open(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new"
    assert fileio.temp_files(tmp_path) == []


def test_keyboard_interrupt_inside_a_write_keeps_target(tmp_path):
    target = tmp_path / "engine.plan"
    fileio.write_bytes(target, b"previous engine")
    with pytest.raises(KeyboardInterrupt), fileio.atomic_open(target, "wb") as handle:
        handle.write(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"previous engine"
    assert fileio.temp_files(tmp_path) == []


def test_written_files_get_normal_permissions(tmp_path):
    """mkstemp creates 0600 files; artefacts must get what open() would give (0666 & ~umask)."""
    old = os.umask(0o022)
    try:
        fileio.write_text(tmp_path / "new.txt", "x")
        ModelArtifact.from_model(small_model()).save(tmp_path / "m.onnx", external_data=True)
    finally:
        os.umask(old)
    for name in ("new.txt", "m.onnx", "m.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    # Replacing an existing file keeps its permission bits.
    (tmp_path / "new.txt").chmod(0o640)
    fileio.write_text(tmp_path / "new.txt", "y")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640


def test_atomic_paths_commits_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    fileio.write_bytes(a, b"A0")
    fileio.write_bytes(b, b"B0")
    with pytest.raises(ValueError), fileio.atomic_paths([a, b]) as (ta, tb):
        ta.write_bytes(b"A1")
        tb.write_bytes(b"B1")
        raise ValueError("second writer failed")
    assert (a.read_bytes(), b.read_bytes()) == (b"A0", b"B0")
    with fileio.atomic_paths([a, b]) as (ta, tb):
        ta.write_bytes(b"A1")
        tb.write_bytes(b"B1")
    assert (a.read_bytes(), b.read_bytes()) == (b"A1", b"B1")
    assert fileio.temp_files(tmp_path) == []


def test_check_output_path_refuses_overwriting_inputs(tmp_path):
    from trtkit.errors import OptionError

    model = tmp_path / "m.onnx"
    ModelArtifact.from_model(small_model()).save(model)
    with pytest.raises(OptionError, match="would overwrite the input"):
        fileio.check_output_path(model, model)
    with pytest.raises(OptionError, match="would overwrite the input"):
        fileio.check_output_path(tmp_path / "." / "m.onnx", model)
    assert fileio.check_output_path(tmp_path / "other.onnx", model) == tmp_path / "other.onnx"


# ---- ModelArtifact.save ---------------------------------------------------------------------------------
def test_failed_external_save_keeps_previous_pair(tmp_path):
    """A save that fails half way (one external tensor unreadable) leaves the old model + data untouched."""
    src = tmp_path / "src"
    ModelArtifact.from_model(small_model(seed=1)).save(src / "in.onnx", external_data=True)
    art = ModelArtifact.load(src / "in.onnx")
    out = tmp_path / "out"
    ModelArtifact.from_model(small_model(seed=2)).save(out / "m.onnx", external_data=True)
    before = snapshot(out)
    # The data file shrinks after loading: the second tensor can no longer be read.
    data = src / "in.onnx.data"
    data.write_bytes(data.read_bytes()[:5000])
    with pytest.raises(InputFileError, match="in.onnx.data"):
        art.save(out / "m.onnx")
    assert snapshot(out) == before
    assert fileio.temp_files(out) == []


def test_saving_over_own_source_keeps_artifact_readable(tmp_path):
    """save() onto the file it reads from (API use): the artefact still reads its tensors correctly after."""
    path = tmp_path / "m.onnx"
    ModelArtifact.from_model(small_model(seed=3, layers=3)).save(path, external_data=True)
    art = ModelArtifact.load(path)
    expected = {name: art.tensor(name) for name in art.initializers()}
    art.model.graph.initializer.pop(0)  # a different layout: offsets of the remaining tensors change
    del expected["w0"]
    art.save(path)
    for name, value in expected.items():
        np.testing.assert_array_equal(art.tensor(name), value)
        np.testing.assert_array_equal(ModelArtifact.load(path).tensor(name), value)


def test_external_tensors_in_constants_and_subgraphs_survive_a_move(tmp_path):
    """Tensors stored externally inside Constant nodes and If branches are copied along when saved elsewhere."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    const = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "const_value")
    branch_w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "branch_w")

    def branch(name: str, init: list) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 16])
        node = helper.make_node("MatMul", ["x", "branch_w"], [f"{name}_out"]) if init else helper.make_node(
            "Identity", ["x"], [f"{name}_out"])
        return helper.make_graph([node], name, [], [out], init)

    nodes = [
        helper.make_node("Constant", [], ["c"], value=const),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond_v"]),
        helper.make_node("Squeeze", ["cond_v"], ["cond"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=branch("then", [branch_w]),
                         else_branch=branch("else", [])),
        helper.make_node("MatMul", ["b", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # Store every tensor >= 512 bytes externally, attributes and subgraphs included (onnx's own writer).
    onnx.save_model(model, str(tmp_path / "a.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="a.weights", size_threshold=512, convert_attribute=True)
    art = ModelArtifact.load(tmp_path / "a.onnx")
    assert art.has_external_data()
    moved = tmp_path / "elsewhere" / "b.onnx"
    art.save(moved)
    (tmp_path / "a.weights").unlink()  # the copy must not depend on the original's data file
    import onnxruntime as ort

    x = np.abs(rng.standard_normal((1, 16))).astype(np.float32)
    y = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x @ numpy_helper.to_array(branch_w) @ numpy_helper.to_array(const)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


# ---- interrupted processes ------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from trtkit.fileio import raise_on_sigterm
    from trtkit.model import ModelArtifact

    raise_on_sigterm()  # as the trtkit CLI does
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"w{i}")
             for i in range(24)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i-1}", f"w{i}"], [f"h{i}"]) for i in range(24)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("h23", TensorProto.FLOAT, [1, 1024])], inits)
    art = ModelArtifact.from_model(helper.make_model(graph), {"run": "interrupted"})
    print("ready", flush=True)
    while True:  # keep rewriting the artefact pair until a signal arrives
        art.save(sys.argv[1], external_data=True)
""")


def _interrupt_during_write(tmp_path: Path, signum: int) -> tuple[dict[str, bytes], dict[str, bytes], int]:
    out = tmp_path / "out"
    ModelArtifact.from_model(small_model(seed=11), {"run": "previous"}).save(out / "m.onnx", external_data=True)
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out / "m.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not fileio.temp_files(out):  # signal while a temporary file is being written
            assert time.monotonic() < deadline, "the writer never started writing"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.002)
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return before, snapshot(out), proc.returncode


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_write_leaves_a_consistent_pair_and_no_temp_files(tmp_path, signum):
    before, after, code = _interrupt_during_write(tmp_path, signum)
    assert code != 0
    assert fileio.temp_files(tmp_path / "out") == []
    assert set(after) == {"m.onnx", "m.onnx.data"}
    if after != before:
        # The signal landed after a complete commit: then the pair on disk is the new one, whole and readable.
        art = ModelArtifact.load(tmp_path / "out" / "m.onnx")
        assert art.metadata == {"run": "interrupted"}
        assert art.tensor("w23").shape == (1024, 1024)


def test_sigkill_during_write_keeps_previous_artefacts(tmp_path):
    """SIGKILL cannot be caught: temp files may stay, but the target pair is never half-written."""
    before, after, code = _interrupt_during_write(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    kept = {name: data for name, data in after.items() if name in ("m.onnx", "m.onnx.data")}
    if kept != before:
        art = ModelArtifact.load(tmp_path / "out" / "m.onnx")
        assert art.metadata == {"run": "interrupted"}
        assert art.tensor("w23").shape == (1024, 1024)


# ---- interrupted calibration ------------------------------------------------------------------------------
def _calibration_job(folder: Path) -> tuple[Path, Path]:
    """A small conv net and enough data that calibration runs for a few seconds."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, previous, channels = [], [], "x", 3
    for index in range(3):
        w = (rng.standard_normal((16, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{index}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{index}"], [f"c{index}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        previous, channels = f"r{index}", 16
    nodes.append(helper.make_node("GlobalAveragePool", [previous], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 1, 1])], inits)
    model = folder / "net.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    data = folder / "calib.npy"
    np.save(data, rng.uniform(-1, 1, (2048, 3, 32, 32)).astype(np.float32))
    return model, data


CALIBRATOR = textwrap.dedent("""
    import sys
    import numpy as np
    from trtkit.calibration import calibrate
    from trtkit.fileio import raise_on_sigterm
    from trtkit.trtcache import write_cache

    raise_on_sigterm()  # as the trtkit CLI does
    data = np.load(sys.argv[2], mmap_mode="r")

    def batches():
        for start in range(0, len(data), 64):
            if start == 128:
                print("calibrating", flush=True)  # statistics of two batches are in: now interrupt us
            yield np.asarray(data[start:start + 64])

    scales = calibrate(sys.argv[1], batches, method="entropy", tensors="all", progress=False, output=sys.argv[3])
    write_cache(scales, sys.argv[4])
    print("done", flush=True)
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_calibration_keeps_previous_scales_and_cache(tmp_path, signum):
    """A real calibration process interrupted mid-way: previous scales and cache byte-identical, no temp files."""
    model, data = _calibration_job(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scales.json").write_text('{"previous": true}\n')
    (out / "calib.cache").write_text("TRT-8601-EntropyCalibration2\nx: 3c010204\n")
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", CALIBRATOR, str(model), str(data), str(out / "scales.json"),
                             str(out / "calib.cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "calibrating", proc.communicate()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "done" not in stdout, "the signal arrived after calibration finished: make the job longer"
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr
    assert snapshot(out) == before
    assert fileio.temp_files(out) == []


def test_signals_are_held_back_even_when_another_thread_receives_them():
    """The kernel may hand SIGINT to any thread (OpenBLAS, onnxruntime); the deferral must still hold it
    until the guarded step is done, then raise it."""
    import threading

    go = threading.Event()

    def receive() -> None:  # a thread started before the guarded step, as library worker threads are
        go.wait()
        signal.raise_signal(signal.SIGINT)

    receiver = threading.Thread(target=receive)
    receiver.start()
    done = []
    with pytest.raises(KeyboardInterrupt), fileio._signals_deferred():
        go.set()
        receiver.join()
        for _ in range(10000):  # many bytecode boundaries where Python would raise an unheld signal
            pass
        done.append("guarded step finished")
    assert done == ["guarded step finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
