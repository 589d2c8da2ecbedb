"""Atomic writes: a crash or Ctrl-C never leaves a half-written model, engine, cache or report.

Every artefact is written to a temporary file in the target folder and renamed over the target, which is
atomic on POSIX and Windows. The temporary file is removed when anything goes wrong.

Artefacts made of several files (an ONNX model and its external-data file) are committed together with
`atomic_paths`: every file is written to a temporary name first, then all are renamed in one short step with
SIGINT/SIGTERM held back, so an interrupt never leaves a new model next to old weights or the reverse.

Written files get the ordinary permissions (0666 minus the umask), as `open()` would give them, not the 0600
of a bare temporary file; replacing an existing file keeps that file's permission bits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"
# Temporary files not yet renamed or removed. A signal can land between a context manager's yield and the
# start of the `with` body, where no cleanup is registered yet: the interpreter then exits without closing the
# generator, so these are also removed at exit.
_LIVE_TEMPS: set[Path] = set()


@atexit.register
def _remove_live_temps() -> None:
    for tmp in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path: Path) -> None:
    """Flush a file (or folder) to disk; folders cannot be opened on Windows and some filesystems refuse."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# Folders this process created for its outputs (the top-most missing one each time), for the log line.
_CREATED_FOLDERS: list[Path] = []


def make_folder(folder: Path) -> None:
    """mkdir -p, remembering the top-most folder that was missing (see `described`)."""
    if folder.is_dir():
        return
    missing = folder
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    folder.mkdir(parents=True, exist_ok=True)
    _CREATED_FOLDERS.append(missing)


def described(path: str | os.PathLike[str]) -> str:
    """`path` for a log line, with ' (created folder F)' when writing it created the missing folder F."""
    target = Path(path).absolute()
    created = [f for f in _CREATED_FOLDERS if target == f.absolute() or f.absolute() in target.parents]
    return f"{path} (created folder {created[0]})" if created else str(path)


def _new_temp(target: Path, suffix: str) -> Path:
    make_folder(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    _LIVE_TEMPS.add(Path(tmp_name))
    return Path(tmp_name)


def _finish(tmp: Path, target: Path) -> None:
    """Give the temporary file the permissions the target should have and flush it to disk."""
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        mode = _default_mode()
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)
    _fsync_path(tmp)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a few steps (main thread); a signal that came meanwhile is handled right after.

    Python-level handlers record the signal instead of blocking it with pthread_sigmask: the process has other
    threads (OpenBLAS, onnxruntime) that the kernel may deliver the signal to, and Python then still raises in
    the main thread at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []

    def record(signum: int, frame: Any) -> None:
        received.append((signum, frame))

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if received:
            first, frame = received[0]
            handler = signal.getsignal(first)
            if callable(handler):
                handler(first, frame)  # e.g. KeyboardInterrupt, or the CLI's SIGTERM handler
            elif handler == signal.SIG_DFL:
                signal.raise_signal(first)


@contextlib.contextmanager
def atomic_paths(targets: Sequence[str | os.PathLike[str]], suffix: str = "") -> Iterator[list[Path]]:
    """Yield one temporary path per target; on success all replace their targets together, else all vanish.

    The renames happen in the order given with SIGINT/SIGTERM held back, so list the files that others
    reference first (an external-data file before the model that points into it).
    """
    paths = [Path(target) for target in targets]
    temps: list[Path] = []
    try:
        for target in paths:
            with _signals_deferred():  # a signal between creating and recording the file would leak it
                temps.append(_new_temp(target, suffix))
        yield list(temps)
        for tmp, target in zip(temps, paths, strict=True):
            _finish(tmp, target)
        with _signals_deferred():
            for tmp, target in zip(temps, paths, strict=True):
                os.replace(tmp, target)
        for folder in {target.parent for target in paths}:
            _fsync_path(folder)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            _LIVE_TEMPS.discard(tmp)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target`, on failure it vanishes.

    For writers that want a path (onnx.save, engine serializers, matplotlib).
    """
    with atomic_paths([target], suffix=suffix) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Like open(target, mode) for writing, but the file appears whole or not at all."""
    if not mode.startswith("w"):
        raise ValueError("atomic_open is for writing ('w' or 'wb')")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()


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


def temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Leftover temporary files of interrupted atomic writes in `folder` (there should be none)."""
    return sorted(p for p in Path(folder).iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))


def check_output_path(output: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> Path:
    """Refuse an output path that would overwrite one of the inputs: trtkit never modifies its inputs.

    For ONNX outputs the external-data file the output would get (`<output>.data`) is checked as well.
    """
    from .errors import OptionError

    out = Path(output)
    written = [out, out.with_name(out.name + ".data")] if out.suffix == ".onnx" else [out]
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        for path in written:
            if path.exists() and path.resolve() == Path(given).resolve():
                raise OptionError(f"output {out} would overwrite the input {given}; choose another output path")
    return out
