"""`trtkit build` / `trtkit inspect` through the real entry point."""

from __future__ import annotations

import json

import pytest
from build_models import custom_op, fp32_conv, qdq_conv
from conftest import run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_models")
    return {"fp32": fp32_conv(folder / "fp32.onnx", batch="N"), "qdq": qdq_conv(folder / "qdq.onnx"),
            "custom": custom_op(folder / "custom.onnx")}


def test_build_rtx_engine_json_and_inspect(models, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "qdq.engine"
    result = run_cli("build", str(models["qdq"]), "--builder", "tensorrt-rtx", "-o", str(out),
                     "-O", "max_batch=4", "-O", "workspace_mb=32", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["artifact"] == str(out) and summary["bytes"] == out.stat().st_size
    assert summary["precision"]["qdq"] is True
    assert summary["profiles"] == [{"x": {"max": [4, 16, 8, 8], "min": [1, 16, 8, 8], "opt": [4, 16, 8, 8]}}]
    assert summary["sidecar"] == str(out) + ".json"
    shown = run_cli("inspect", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["engine"]["sha256"] == json.loads((tmp_path / "qdq.engine.json").read_text())["engine"]["sha256"]


def test_build_onnxruntime_default_output_and_notes(models, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(models["qdq"].read_bytes())
    result = run_cli("build", str(model), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["artifact"] == str(tmp_path / "m.ort.onnx") and (tmp_path / "m.ort.onnx").is_file()
    assert summary["builder"] == "onnxruntime" and summary["int8_weights"]
    if summary["vnni"] is False:
        assert any("requantized to 7 bits" in note for note in summary["notes"])


def test_check_lists_unsupported_nodes(models):
    pytest.importorskip("tensorrt_rtx")
    result = run_cli("build", str(models["custom"]), "-b", "tensorrt-rtx", "--check", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [u["node"] for u in report["unsupported"]] == ["my_foo", "my_bar"]
    ok = run_cli("build", str(models["fp32"]), "-b", "tensorrt-rtx", "--check")
    assert ok.returncode == 0 and "supported" in ok.stderr


def test_user_mistakes_are_one_line_errors(models, tmp_path):
    cases = [
        (("build", str(models["fp32"]), "-b", "tensorrtx"), "unknown builder 'tensorrtx' (did you mean: tensorrt"),
        (("build", str(models["fp32"]), "-b", "tensorrt-rtx", "-O", "precision=int8", "-o", str(tmp_path / "a.engine")),
         "no FP16/INT8 builder flags"),
        (("build", str(models["fp32"]), "-O", "threads"), "--option expects KEY=VALUE"),
        (("build", str(models["custom"]), "-b", "tensorrt-rtx", "-o", str(tmp_path / "c.engine")),
         "node 'my_foo' (FooBar)"),
        (("build", str(tmp_path / "missing.onnx")), "missing.onnx: no such file"),
        (("inspect", str(tmp_path / "nothing.engine")), "no such file"),
    ]
    for args, expected in cases:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, result.stderr)
    assert not list(tmp_path.glob("*.engine*"))


def test_list_options():
    result = run_cli("build", "unused.onnx", "-b", "tensorrt-rtx", "--list-options", "--json")
    assert result.returncode == 0, result.stderr
    names = {row["name"] for row in json.loads(result.stdout)["options"]}
    assert {"precision", "min_shapes", "max_shapes", "timing_cache", "dla_core", "calibration_cache"} <= names


def test_engine_for_another_tensorrt_version_is_refused_by_the_cli(models, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    engine = tmp_path / "m.engine"
    assert run_cli("build", str(models["fp32"]), "-b", "tensorrt-rtx", "-o", str(engine)).returncode == 0
    sidecar = tmp_path / "m.engine.json"
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "tensorrt_version": "1.0.0"}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_cli("inspect", str(engine), "--load")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "m.engine" in lines[0] and "built with tensorrt_rtx 1.0.0" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_failed_build_leaves_the_previous_output_intact(models, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "keep.engine"
    out.write_bytes(b"previous engine")
    (tmp_path / "keep.engine.json").write_text("{}")
    result = run_cli("build", str(models["custom"]), "-b", "tensorrt-rtx", "-o", str(out))
    assert result.returncode == 2 and "node 'my_foo' (FooBar)" in result.stderr
    assert out.read_bytes() == b"previous engine" and (tmp_path / "keep.engine.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.engine", "keep.engine.json"]  # no temp files left
