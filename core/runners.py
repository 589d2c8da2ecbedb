"""One small interface to run any built artefact: inputs dict -> outputs dict.

`.onnx` files run on onnxruntime (Q/DQ emulated in float unless `emulate_qdq=False`). Any other artefact is
opened by the first builder whose `load` accepts it (engines: the builder plugin that wrote them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputFileError, TrtkitError
from .stages import Builder, Runner


class OrtRunner:
    """An onnxruntime session behind the Runner protocol."""

    def __init__(self, model: Any, emulate_qdq: bool = True, threads: int | None = None,
                 providers: list[str] | None = None, optimization: str = "all") -> None:
        from .runtime import session

        self.session = session(model, emulate_qdq=emulate_qdq, threads=threads, providers=providers,
                               optimization=optimization)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.emulate_qdq = emulate_qdq

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        outputs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outputs, strict=True))


def open_runner(path: str | os.PathLike[str], **options: Any) -> Runner:
    """A Runner for the artefact at `path`; options go to the runtime (e.g. emulate_qdq, threads)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return OrtRunner(path, **options)
    from .registry import get_registry

    reasons = []
    for name, builder in get_registry().stages["builders"].items():
        if not isinstance(builder, Builder) or builder.load is None:
            continue
        try:
            return builder.load(path, **options)
        except TrtkitError as exc:
            reasons.append(f"{name}: {exc}")
    detail = "; ".join(reasons) if reasons else "no installed builder can load it"
    raise InputFileError(f"{path}: cannot run this artefact ({detail})")
