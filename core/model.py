"""The artefact passed between stages: an ONNX model plus trtkit metadata.

Metadata (what produced the model, passes applied, scales, thresholds, fused preprocessing) is stored as
JSON under the ONNX metadata_props key `trtkit`, so it survives every save/load and travels with the file.

Large models: weights may live in ONNX external data. Loading never pulls external tensors into the
protobuf; `tensor(name)` reads one on demand and `save()` streams them into the new data file one at a time,
so a model over the 2 GB protobuf limit is never held in one protobuf.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputFileError
from .fileio import atomic_path

if TYPE_CHECKING:
    import numpy as np
    import onnx

METADATA_KEY = "trtkit"
# Above this many bytes of weights, save with external data (protobuf cannot serialize 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the protobuf even in external-data mode.
EXTERNAL_MIN_BYTES = 1024


@dataclass
class ModelArtifact:
    model: onnx.ModelProto
    base_dir: Path | None = None  # where external data of the loaded file lives
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelArtifact:
        """Load an ONNX file (external data stays on disk). Bad files raise InputFileError naming the file."""
        import onnx

        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise InputFileError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        if not model.graph.node and not model.graph.output:
            raise InputFileError(f"{path}: not an ONNX model (no graph found)")
        metadata: dict[str, Any] = {}
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                try:
                    metadata = json.loads(prop.value)
                except json.JSONDecodeError:
                    raise InputFileError(f"{path}: corrupt trtkit metadata") from None
        return cls(model=model, base_dir=path.parent, metadata=metadata, source=path)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, metadata: dict[str, Any] | None = None) -> ModelArtifact:
        return cls(model=model, metadata=dict(metadata or {}))

    def copy(self) -> ModelArtifact:
        """A deep copy that passes can rewrite freely (external tensors stay references)."""
        return ModelArtifact(copy.deepcopy(self.model), self.base_dir, copy.deepcopy(self.metadata), self.source)

    # ---- tensors -------------------------------------------------------------------------------------
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {tensor.name: tensor for tensor in self.model.graph.initializer}

    def tensor(self, name_or_proto: str | onnx.TensorProto) -> np.ndarray:
        """One initializer as numpy, read from external data on demand."""
        from onnx import numpy_helper

        proto = self.initializers()[name_or_proto] if isinstance(name_or_proto, str) else name_or_proto
        base = str(self.base_dir) if self.base_dir is not None else ""
        return numpy_helper.to_array(proto, base_dir=base)

    def has_external_data(self) -> bool:
        from onnx.external_data_helper import uses_external_data

        return any(uses_external_data(t) for t in self.model.graph.initializer)

    def weight_bytes(self) -> int:
        """Total bytes of initializers, counting external ones by their recorded length."""
        from onnx.external_data_helper import uses_external_data

        total = 0
        for tensor in self.model.graph.initializer:
            if uses_external_data(tensor):
                info = {entry.key: entry.value for entry in tensor.external_data}
                total += int(info.get("length", 0))
            else:
                total += len(tensor.raw_data) or tensor.ByteSize()
        return total

    # ---- saving --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], external_data: bool | None = None) -> Path:
        """Write the model atomically. external_data=None decides by size (and keeps external models external).

        Byte-identical for identical content: metadata is JSON with sorted keys, tensors are written in
        graph order at deterministic offsets.
        """
        import onnx

        path = Path(path)
        if external_data is None:
            external_data = self.has_external_data() or self.weight_bytes() > EXTERNAL_DATA_THRESHOLD
        model = self._with_metadata()
        if not external_data:
            if self.has_external_data():
                model = self._inlined(model)
            with atomic_path(path) as tmp:
                onnx.save_model(model, str(tmp))
            return path
        data_name = path.name + ".data"
        # Nested so the data file is renamed into place before the model that references it.
        with atomic_path(path) as tmp_model, atomic_path(path.parent / data_name) as tmp_data:
            model = self._externalized(model, tmp_data, data_name)
            onnx.save_model(model, str(tmp_model))
        return path

    def _with_metadata(self) -> onnx.ModelProto:
        """A shallow-ish copy of the model with metadata_props updated (initializer data is shared)."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
        del model.metadata_props[:]
        for key, value in kept:
            model.metadata_props.add(key=key, value=value)
        if self.metadata:
            model.metadata_props.add(key=METADATA_KEY, value=json.dumps(self.metadata, sort_keys=True))
        return model

    def _inlined(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from onnx import numpy_helper
        from onnx.external_data_helper import uses_external_data

        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                array = self.tensor(tensor)
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        return model

    def _externalized(self, model: onnx.ModelProto, data_path: Path, data_name: str) -> onnx.ModelProto:
        """Stream every large initializer into data_path, one tensor at a time."""
        from onnx.external_data_helper import set_external_data, uses_external_data

        offset = 0
        with open(data_path, "wb") as out:
            for tensor in model.graph.initializer:
                if uses_external_data(tensor):
                    info = {entry.key: entry.value for entry in tensor.external_data}
                    source = Path(self.base_dir or ".") / info["location"]
                    length = int(info.get("length", source.stat().st_size))
                    with open(source, "rb") as src:
                        src.seek(int(info.get("offset", 0)))
                        _copy_bytes(src, out, length)
                elif len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    length = len(tensor.raw_data)
                    out.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                else:
                    continue
                del tensor.external_data[:]
                tensor.data_location = 0
                set_external_data(tensor, data_name, offset=offset, length=length)
                offset += length
                # Keep offsets 4 KiB aligned so runtimes can mmap tensors.
                pad = (-offset) % 4096
                out.write(b"\0" * pad)
                offset += pad
            out.flush()
            os.fsync(out.fileno())
        return model


def _copy_bytes(src: Any, dst: Any, length: int, chunk: int = 64 << 20) -> None:
    remaining = length
    while remaining > 0:
        block = src.read(min(chunk, remaining))
        if not block:
            raise InputFileError(f"{getattr(src, 'name', 'external data')}: truncated external data")
        dst.write(block)
        remaining -= len(block)


def load_model(path: str | os.PathLike[str]) -> ModelArtifact:
    return ModelArtifact.load(path)
