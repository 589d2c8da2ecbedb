"""Write one benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; other sections are
kept as they are. Every section records the machine and the date it was measured on.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by a script in `benchmarks/`; rerun it to refresh the numbers.\n"


def machine() -> str:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    for module in ("onnx", "onnxruntime", "torch", "onnxslim", "onnxsim"):
        with contextlib.suppress(Exception):
            versions.append(f"{module} {__import__(module).__version__}")
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; " + ", ".join(versions)


def write_section(name: str, title: str, body: str) -> Path:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`, stamped with machine and date."""
    from trtkit.fileio import write_text

    stamp = f"_Measured {datetime.date.today().isoformat()} on {machine()}._\n"
    section = f"<!-- bench:{name} -->\n## {title}\n\n{stamp}\n{body.strip()}\n<!-- /bench:{name} -->"
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    write_text(DOC, text)
    return DOC


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
