"""Atomic writes: a crash or Ctrl-C never leaves a half-written model, engine, cache or report.

Every artefact is written to a temporary file in the target folder and renamed over the target, which is
atomic on POSIX and Windows. The temporary file is removed when anything goes wrong.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target`, on failure it vanishes.

    For writers that want a path (onnx.save, engine serializers, matplotlib).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Like open(target, mode) for writing, but the file appears whole or not at all."""
    if not mode.startswith("w"):
        raise ValueError("atomic_open is for writing ('w' or 'wb')")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_open(target, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(target, "wb") as handle:
        handle.write(data)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks (temp-file cleanup) run, as they do on Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, handler)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (models can be larger than memory)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(output: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> Path:
    """Refuse an output path that would overwrite one of the inputs: trtkit never modifies its inputs."""
    from .errors import OptionError

    out = Path(output)
    for given in inputs:
        if given is not None and Path(given).exists() and out.exists() and out.resolve() == Path(given).resolve():
            raise OptionError(f"output {out} would overwrite the input {given}; choose another output path")
    return out
