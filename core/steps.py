"""A stage-agnostic engine of cached steps: what `trtkit run` is built on, knowing nothing of the stages.

A Step is one unit of work with a JSON-able config, the names of the steps it consumes and the files it reads.
Its cache key hashes the trtkit version, the config, the keys of the steps it needs and the contents of its
files, so editing one step redoes it and what follows only. A step runs in an empty staging folder that
replaces `<out>/cache/<step>/<key>/` whole (rename) when its action returns; a `step.json` there marks it done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputFileError


@dataclass
class Step:
    """One unit of cached work. `key` hashes config + upstream keys + contents of files read (assign_keys).

    action(step, results, folder) -> outputs: runs with the results of the earlier steps, writes into the
    empty `folder` and returns the names of the files it wrote (plus small JSON-able facts).
    """

    name: str
    config: dict[str, Any]
    needs: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    key: str = ""
    action: Callable[[Step, dict[str, StepResult], Path], dict[str, Any]] | None = field(default=None, repr=False)

    def describe(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.config.items() if v not in (None, {}, [], ""))
        after = f" (after {', '.join(self.needs)})" if self.needs else ""
        return f"{self.name}{after}: {details}" if details else f"{self.name}{after}"


@dataclass
class StepResult:
    step: str
    key: str
    folder: Path
    outputs: dict[str, Any]
    cached: bool
    seconds: float

    def path(self, name: str) -> Path:
        return self.folder / self.outputs[name]


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's relative file names and contents."""
    from .fileio import sha256_file

    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(sha256_file(child).encode())
        return digest.hexdigest()
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    return sha256_file(path)


def assign_keys(steps: list[Step]) -> list[Step]:
    """Give every step its cache key (steps in order: a step's needs come before it). Returns `steps`."""
    keys: dict[str, str] = {}
    for step in steps:
        payload = {
            "trtkit": __version__,
            "step": step.name,
            "config": step.config,
            "needs": [keys[name] for name in step.needs],
            "files": [file_digest(path) for path in step.files],
        }
        step.key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
        keys[step.name] = step.key
    return steps


def cache_folder(out: Path, step: Step) -> Path:
    return out / "cache" / step.name.replace(":", "-") / step.key


def is_cached(out: Path, step: Step) -> bool:
    return _cached_outputs(cache_folder(out, step) / "step.json") is not None


def _cached_outputs(marker: Path) -> dict[str, Any] | None:
    """The outputs recorded for a step, or None when there are none to reuse. A step recorded as skipped
    (by a trtkit older than this rule) is not reused: a skip is not a result."""
    if not marker.is_file():
        return None
    outputs: dict[str, Any] = json.loads(marker.read_text())["outputs"]
    return None if outputs.get("skipped") else outputs


def run_steps(steps: list[Step], out: Path, force: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, StepResult]:
    """Run the steps in order under `out`, reusing cached results whose key is unchanged (unless `force`)."""
    log = log or (lambda message: None)
    from .fileio import make_folder

    make_folder(out)  # remembered, so the command can say it created the output folder
    results: dict[str, StepResult] = {}
    for step in steps:
        folder = cache_folder(out, step)
        cached = None if force else _cached_outputs(folder / "step.json")
        if cached is not None:
            results[step.name] = StepResult(step.name, step.key, folder, cached, True, 0.0)
            log(f"[cached] {step.name} ({step.key})")
            continue
        log(f"[run]    {step.describe()}")
        started = time.perf_counter()
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            assert step.action is not None
            outputs = step.action(step, results, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        if outputs.get("skipped"):  # a skip is not a result: never cached, so it is retried once the reason
            shutil.rmtree(staging, ignore_errors=True)  # goes away (say, the builder gets installed)
            results[step.name] = StepResult(step.name, step.key, folder, outputs, False, seconds)
            log(f"         skipped ({outputs['skipped']}); not cached")
            continue
        record = {"step": step.name, "key": step.key, "config": step.config, "outputs": outputs}
        (staging / "step.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # the step appears whole or not at all
        results[step.name] = StepResult(step.name, step.key, folder, outputs, False, seconds)
        log(f"         done in {seconds:.1f} s")
    return results
