"""The docs run as written: every fenced `console` / `bash` block of README.md and docs/ is executed.

Blocks run in one shared temporary folder in which the bundled example has been run once
(`trtkit run --example digits -o out/digits`, the README's main command), so a block can use
`out/digits/...` (the recipe, its data and every artefact). `trtkit` and `.venv/bin/trtkit` are this
interpreter's. A block passes when every command exits 0. Markers, on the line before the fence:

    <!-- skip-test: REASON -->     not run (needs a GPU/TensorRT, the network, or only illustrates)
    <!-- expect-exit: N -->        the block's last command must exit with N (e.g. a failing gate: 1)

In a `console` block the commands are the lines starting with `$ ` (with `\\` continuation lines); the
other lines are output. A `bash` block runs as one script under `set -e`. Renaming a flag that a doc uses
makes its command exit 2, and this test fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
SHELL_LANGUAGES = ("console", "bash", "sh", "shell")
MARKER = re.compile(r"<!--\s*(skip-test|expect-exit)\s*:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
BLOCK_TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None = None
    expect_exit: int = 0

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def script(self) -> str:
        """The block as a bash script: a console block's `$ ` commands, a bash block as it is."""
        if self.language != "console":
            return self.text
        commands: list[str] = []
        continuing = False
        for line in self.text.splitlines():
            if continuing:
                commands[-1] += "\n" + line
            elif line.startswith("$ "):
                commands.append(line[2:])
            else:
                continue  # output shown in the docs
            continuing = line.rstrip().endswith("\\")
        return "\n".join(commands)


def extract_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (any language), with the markers just above each."""
    blocks = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start = index
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("```")), len(lines))
        markers = {}
        above = start - 1
        while above >= 0 and (MARKER.search(lines[above]) or not lines[above].strip()):
            if lines[above].strip():
                found = MARKER.search(lines[above])
                assert found is not None
                markers[found.group(1)] = found.group(2)
            elif markers:
                break
            above -= 1
        blocks.append(Block(path, start + 1, match.group(1), "\n".join(lines[start + 1:end]),
                            skip=markers.get("skip-test"), expect_exit=int(markers.get("expect-exit", 0))))
        index = end + 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for path in DOCS for b in extract_blocks(path) if b.language in SHELL_LANGUAGES]


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="200")
    script = "set -eo pipefail\n" + block.script() + "\n"
    return subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory) -> Path:
    """One folder for every block: the example run once, `.venv` pointing at this interpreter's venv."""
    folder = tmp_path_factory.mktemp("docs")
    venv = Path(sys.executable).parent.parent
    (folder / ".venv").symlink_to(venv)
    for name in ("scripts", "plugins_contrib"):
        shutil.copytree(ROOT / name, folder / name,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([Path(sys.executable).parent / "trtkit", "run", "--example", "digits", "-o", "out/digits"],
                          cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


BLOCKS = shell_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block: Block, example_folder: Path) -> None:
    if block.skip is not None:
        pytest.skip(f"marked skip-test: {block.skip}")
    result = run_block(block, example_folder)
    assert result.returncode == block.expect_exit, (
        f"{block.id} exited {result.returncode} (expected {block.expect_exit})\n$ {block.script()}\n"
        f"--- stderr ---\n{result.stderr[-3000:]}\n--- stdout ---\n{result.stdout[-1500:]}"
    )


def test_every_shell_example_is_a_tested_block() -> None:
    """A shell command shown in an untagged or indented block would escape the runner: there are none in
    README.md and docs/*.md (docs/stages/ keep their untagged synopsis blocks, which are not runnable)."""
    offenders = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in extract_blocks(path):
            commands = [line for line in block.text.splitlines() if line.lstrip().startswith(("trtkit ", "$ "))]
            if block.language in ("", "text") and commands:
                offenders.append(f"{path.name}:{block.line} untagged block with {commands[0]!r}")
        in_fence = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_fence = not in_fence
            elif not in_fence and re.match(r"^ {4}(\$ )?(trtkit|pip|bash|\.venv/bin/)\b", line):
                offenders.append(f"{path.name}:{number} indented command {line.strip()!r}")
    assert not offenders, "\n".join(offenders)


def test_markers_are_read(tmp_path: Path) -> None:
    text = ("x\n\n<!-- skip-test: needs a GPU -->\n```bash\ntrtkit build m.onnx -b tensorrt\n```\n\n"
            "<!-- expect-exit: 1 -->\n```console\n$ trtkit eval accuracy a b \\\n    -O x=1\nsome output\n```\n")
    path = tmp_path / "probe.md"
    path.write_text(text)
    first, second = extract_blocks(path)
    assert first.skip == "needs a GPU" and first.language == "bash"
    assert second.skip is None and second.expect_exit == 1
    assert second.script() == "trtkit eval accuracy a b \\\n    -O x=1"


def test_a_renamed_flag_breaks_a_block(tmp_path: Path) -> None:
    """The issue's case: `--input-shapes` is not a flag of `trtkit export` (it is `-i NAME:SHAPE`)."""
    block = Block(ROOT / "README.md", 0, "console",
                  "$ trtkit export trtkit.examples.digits:factory -o m.onnx --input-shapes 1x1x8x8")
    result = run_block(block, tmp_path)
    assert result.returncode == 2 and "--input-shapes" in result.stderr
