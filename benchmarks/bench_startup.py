"""Start-up time of the CLI: `trtkit --help` and `trtkit plugins` load every plugin but no heavy library.

    python -m benchmarks.bench_startup
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks._report import markdown_table, write_section

COMMANDS = {
    "python -c pass (interpreter baseline)": [sys.executable, "-c", "pass"],
    "trtkit --help": [sys.executable, "-m", "trtkit.cli", "--help"],
    "trtkit plugins": [sys.executable, "-m", "trtkit.cli", "plugins"],
    "trtkit plugins --json": [sys.executable, "-m", "trtkit.cli", "plugins", "--json"],
    "python -c 'import onnxruntime' (for scale)": [sys.executable, "-c", "import onnxruntime"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}


def measure(command: list[str], runs: int = 15) -> list[float]:
    subprocess.run(command, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    rows = []
    for label, command in COMMANDS.items():
        times = measure(command)
        rows.append([label, f"{statistics.median(times) * 1000:.0f}", f"{min(times) * 1000:.0f}",
                     f"{max(times) * 1000:.0f}"])
        print(rows[-1])
    body = ("Wall time of the whole process, 15 runs after one warm-up (ms). `trtkit` imports typer, rich, "
            "pluggy and every installed plugin module, but not onnx, onnxruntime, torch, tensorrt or "
            "matplotlib (tests/test_core_cli.py checks that).\n\n"
            + markdown_table(["command", "median", "min", "max"], rows))
    write_section("startup", "CLI start-up time", body)


if __name__ == "__main__":
    main()
