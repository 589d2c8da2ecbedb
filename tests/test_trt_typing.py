"""Type-check the TensorRT builder plugin (plugins/tensorrt/) against the `tensorrt-stubs` package
(TensorRT 10.13 API).

The installed stubs are not usable by mypy as they are: they lack a py.typed marker next to
`tensorrt/__init__.pyi`, and `tensorrt_bindings/tensorrt.pyi` has about 30 syntax errors (parameters named `in`,
parameters without defaults after defaulted ones). The test copies them to a temporary folder, repairs those
lines mechanically, and runs mypy with MYPYPATH pointing there. A probe file with a deliberate API misuse
proves the stubs are really in effect (otherwise every TensorRT object would be `Any` and nothing is checked).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["plugins/tensorrt/"]
PROBE = '''from __future__ import annotations
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import tensorrt as trt

def probe(config: trt.IBuilderConfig) -> None:
    config.set_timing_cache(1, ignore_mismatch=False)
'''


def _stub_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "__init__.pyi").is_file():
            return Path(location)
    return None


def _repair_line(line: str) -> str:
    line = re.sub(r"(?<=[(, ])(in|from|is|lambda|class|def|pass|return|global)(?=\s*:)", r"\1_", line)
    match = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*)$", line)
    if match:
        params, seen = [], False
        for param in re.split(r",\s*(?![^\[]*\])", match.group(2)):
            if "=" in param:
                seen = True
            elif seen and param.strip() and not param.strip().startswith("*"):
                param += " = ..."
            params.append(param)
        line = match.group(1) + ", ".join(params) + match.group(3)
    return line


def _repair(source: str) -> str:
    lines = source.splitlines()
    for _ in range(500):
        try:
            ast.parse("\n".join(lines))
            break
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            fixed = _repair_line(lines[index])
            if fixed == lines[index]:
                pytest.skip(f"cannot repair tensorrt stubs line {exc.lineno}: {lines[index][:80]}")
            lines[index] = fixed
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_tensorrt_plugin_type_checks_against_tensorrt_stubs(tmp_path):
    pytest.importorskip("mypy")
    trt_stubs, bindings = _stub_dir("tensorrt"), _stub_dir("tensorrt_bindings")
    if trt_stubs is None or bindings is None:
        pytest.skip("tensorrt-stubs is not installed (pip install tensorrt-stubs)")
    stubs = tmp_path / "stubs"
    for source, name in ((trt_stubs, "tensorrt"), (bindings, "tensorrt_bindings")):
        (stubs / name).mkdir(parents=True)
        for pyi in source.glob("*.pyi"):
            (stubs / name / pyi.name).write_text(_repair(pyi.read_text()))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"), *CHECKED, str(probe)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MYPYPATH": str(stubs)}, timeout=900,
    )
    lines = result.stdout.splitlines()
    ours = [line for line in lines if line.startswith(tuple(CHECKED))]
    assert ours == [], "\n".join(ours)
    assert any("probe.py" in line and 'expected "ITimingCache"' in line for line in lines), result.stdout[-2000:]
