"""Shared fixtures. Tests build real models and run real onnxruntime; nothing is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A suite started in the background by a non-interactive shell (`pytest &`, nohup) inherits SIGINT ignored, and
# so would every process it starts: the Ctrl-C tests (test_atomic, test_exit_codes) need its usual behaviour.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `trtkit ARGS` in a subprocess (the real entry point, real plugin discovery)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trtkit.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def digits_data():
    """(x_train, y_train, x_test, y_test) from scikit-learn's digits."""
    from trtkit.examples.digits import load_digits_split

    return load_digits_split()


@pytest.fixture(scope="session")
def digits_model(digits_data):
    """The trained digits CNN (torch), trained once per test session."""
    pytest.importorskip("torch")
    from trtkit.examples.digits import train_digits_cnn

    x_train, y_train, _, _ = digits_data
    return train_digits_cnn(x_train, y_train)


@pytest.fixture(scope="session")
def digits_onnx(digits_model, tmp_path_factory) -> Path:
    """The trained digits CNN exported to ONNX (FP32, dynamic batch). Do not modify: copy it first."""
    from trtkit.examples.digits import export_digits_onnx

    return export_digits_onnx(digits_model, tmp_path_factory.mktemp("digits") / "digits.onnx")
