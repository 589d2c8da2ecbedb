"""The artefact passed between stages: an ONNX model plus trtkit metadata.

Metadata (what produced the model, passes applied, scales, thresholds, fused preprocessing) is stored as
JSON under the ONNX metadata_props key `trtkit`, so it survives every save/load and travels with the file.

Large models: weights may live in ONNX external data. Loading never pulls external tensors into the
protobuf; `tensor(name)` reads one on demand and `save()` streams them into the new data file one at a time,
so a model over the 2 GB protobuf limit is never held in one protobuf.

Loading checks what can be checked cheaply, so that a bad file fails here with one line naming the file
(and tensor) instead of deep inside a pass: unreadable or empty protobuf, an opset or IR version newer than
the installed onnx knows, external data that is missing, truncated, or points outside the model's folder.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputFileError, OptionError, unknown_name
from .fileio import atomic_paths

if TYPE_CHECKING:
    import numpy as np
    import onnx

METADATA_KEY = "trtkit"
# Above this many bytes of weights, save with external data (protobuf cannot serialize 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the protobuf even in external-data mode.
EXTERNAL_MIN_BYTES = 1024
# Hard protobuf limit: a model whose inline weights reach this cannot be saved without external data.
PROTOBUF_LIMIT = 2**31 - 1
_ALIGN = 4096
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model in a fixed order: the top-level initializers first, then tensor
    attributes (Constant values) and the initializers of subgraphs (If/Loop/Scan bodies), depth first."""
    yield from model.graph.initializer
    yield from _nested_tensors(model.graph)


def _nested_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            subgraphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
            for subgraph in subgraphs:
                yield from subgraph.initializer
                yield from _nested_tensors(subgraph)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


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
        _check_versions(model, path)
        _check_external_data(model, path)
        _check_inline_sizes(model, path)
        metadata: dict[str, Any] = {}
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                try:
                    metadata = json.loads(prop.value)
                except json.JSONDecodeError:
                    raise InputFileError(f"{path}: corrupt trtkit metadata") from None
                if not isinstance(metadata, dict):
                    raise InputFileError(f"{path}: corrupt trtkit metadata (not a JSON object)")
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

        if isinstance(name_or_proto, str):
            initializers = self.initializers()
            if name_or_proto not in initializers:
                raise unknown_name("initializer", name_or_proto, initializers)
            proto = initializers[name_or_proto]
        else:
            proto = name_or_proto
        base = str(self.base_dir) if self.base_dir is not None else ""
        try:
            return numpy_helper.to_array(proto, base_dir=base)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            from onnx.external_data_helper import uses_external_data

            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if uses_external_data(proto):
                where = Path(base or ".") / _external_info(proto).get("location", "?")
            else:
                where = self.source or Path("model")
            raise InputFileError(f"{where}: cannot read tensor '{proto.name}' ({detail})") from None

    def has_external_data(self) -> bool:
        from onnx.external_data_helper import uses_external_data

        return any(uses_external_data(t) for t in _all_tensors(self.model))

    def weight_bytes(self) -> int:
        """Total bytes of initializers and constant tensors, counting external ones by their recorded length."""
        from onnx.external_data_helper import uses_external_data

        total = 0
        for tensor in _all_tensors(self.model):
            if uses_external_data(tensor):
                total += int(_external_info(tensor).get("length", 0))
            else:
                total += len(tensor.raw_data) or tensor.ByteSize()
        return total

    # ---- saving --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], external_data: bool | None = None) -> Path:
        """Write the model atomically. external_data=None decides by size (and keeps external models external).

        With external data the weights go to `<path>.data` (4 KiB-aligned, in graph order); both files are
        committed together (see fileio.atomic_paths). Byte-identical for identical content: metadata is
        JSON with sorted keys, tensors are written in graph order at deterministic offsets.
        """
        import onnx

        path = Path(path)
        if external_data is None:
            external_data = self.has_external_data() or self.weight_bytes() > EXTERNAL_DATA_THRESHOLD
        if not external_data:
            model = self._with_metadata()
            if self.weight_bytes() >= PROTOBUF_LIMIT:
                raise OptionError(
                    f"{path}: the weights ({self.weight_bytes()} bytes) exceed the 2 GB protobuf limit; "
                    "save with external data"
                )
            if self.has_external_data():
                model = self._inlined(model)
            with atomic_paths([path]) as (tmp,):
                onnx.save_model(model, str(tmp))
            return path
        data_path = path.parent / (path.name + ".data")
        # The data file is listed first: it is renamed into place just before the model that references it,
        # both with signals held back, so the pair on disk always matches.
        # The copy that is written leaves out the bytes of the big inline tensors (they are streamed from this
        # artefact's own tensors): a model holding a gigabyte of new weights is not copied whole to be saved.
        model = self._with_metadata(skeleton=True)
        with atomic_paths([data_path, path]) as (tmp_data, tmp_model):
            model = self._externalized(model, tmp_data, data_path.name, originals=self.model)
            onnx.save_model(model, str(tmp_model))
        self._repoint_if_overwritten(model, path, data_path)
        return path

    def _with_metadata(self, skeleton: bool = False) -> onnx.ModelProto:
        """A copy of the model with metadata_props updated.

        skeleton: top-level initializers with inline bytes of EXTERNAL_MIN_BYTES or more are copied without
        their `raw_data` (for `_externalized(..., originals=self.model)`, which reads them from here).
        """
        import onnx

        model = onnx.ModelProto()
        if skeleton:
            for descriptor, value in self.model.ListFields():
                if descriptor.name != "graph":
                    _copy_field(model, descriptor, value)
            for descriptor, value in self.model.graph.ListFields():
                if descriptor.name != "initializer":
                    _copy_field(model.graph, descriptor, value)
            for tensor in self.model.graph.initializer:
                copy = model.graph.initializer.add()
                if tensor.HasField("raw_data") and tensor.ByteSize() >= EXTERNAL_MIN_BYTES:
                    for descriptor, value in tensor.ListFields():
                        if descriptor.name != "raw_data":
                            _copy_field(copy, descriptor, value)
                else:
                    copy.CopyFrom(tensor)
        else:
            model.CopyFrom(self.model)
        kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
        del model.metadata_props[:]
        for key, value in kept:
            model.metadata_props.add(key=key, value=value)
        if self.metadata:
            model.metadata_props.add(key=METADATA_KEY, value=json.dumps(self.metadata, sort_keys=True))
        return model

    def _source_file(self, tensor: onnx.TensorProto) -> Path:
        return Path(self.base_dir or ".") / _external_info(tensor)["location"]

    def _inlined(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from onnx import numpy_helper
        from onnx.external_data_helper import uses_external_data

        for tensor in _all_tensors(model):
            if uses_external_data(tensor):
                array = self.tensor(tensor)
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        return model

    def _externalized(self, model: onnx.ModelProto, data_path: Path, data_name: str,
                      originals: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """Stream tensors into data_path, one at a time: every tensor already external (wherever it sits in
        the model), and every top-level initializer of at least EXTERNAL_MIN_BYTES.

        originals: the model `model` is a skeleton of (see `_with_metadata`): tensor bytes are read from it.
        """
        from onnx import numpy_helper
        from onnx.external_data_helper import uses_external_data

        top_level = len(model.graph.initializer)
        offset = 0
        tensors = list(_all_tensors(model))
        sources = list(_all_tensors(originals)) if originals is not None else tensors
        if len(sources) != len(tensors):
            raise ValueError("_externalized: the model is not a skeleton of `originals`")
        with open(data_path, "wb") as out:
            for index, (tensor, source_tensor) in enumerate(zip(tensors, sources, strict=True)):
                if tensor is not source_tensor and source_tensor.HasField("raw_data") and \
                        not tensor.HasField("raw_data"):
                    if len(source_tensor.raw_data) < EXTERNAL_MIN_BYTES or index >= top_level or \
                            tensor.data_type == _string_type():
                        tensor.raw_data = source_tensor.raw_data  # stays inline: give it its bytes back
                    else:
                        raw = source_tensor.raw_data
                        out.write(raw)
                        _set_external(tensor, data_name, offset, len(raw))
                        offset += len(raw)
                        del raw
                        pad = (-offset) % _ALIGN
                        out.write(b"\0" * pad)
                        offset += pad
                        continue
                if uses_external_data(tensor):
                    info = _external_info(tensor)
                    source = self._source_file(tensor)
                    try:
                        length = int(info.get("length", source.stat().st_size))
                        with open(source, "rb") as src:
                            src.seek(int(info.get("offset", 0)))
                            _copy_bytes(src, out, length)
                    except OSError as exc:
                        raise InputFileError(f"{source}: cannot read tensor '{tensor.name}' ({exc})") from None
                elif index >= top_level or tensor.data_type == _string_type():
                    continue
                elif len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    length = len(tensor.raw_data)
                    out.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                elif not tensor.raw_data and tensor.ByteSize() >= EXTERNAL_MIN_BYTES:
                    # Values in typed fields (float_data, int64_data, ...): write their little-endian bytes.
                    array = numpy_helper.to_array(tensor)
                    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
                    length = len(data)
                    out.write(data)
                    name, dims, data_type = tensor.name, list(tensor.dims), tensor.data_type
                    tensor.Clear()
                    tensor.name, tensor.data_type = name, data_type
                    tensor.dims.extend(dims)
                else:
                    continue
                _set_external(tensor, data_name, offset, length)
                offset += length
                # Keep offsets 4 KiB aligned so runtimes can mmap tensors.
                pad = (-offset) % _ALIGN
                out.write(b"\0" * pad)
                offset += pad
        return model

    def _repoint_if_overwritten(self, saved: onnx.ModelProto, path: Path, data_path: Path) -> None:
        """After saving over the data file this artefact reads from, point its tensors at the new layout."""
        from onnx.external_data_helper import uses_external_data

        target = data_path.resolve()
        mine = list(_all_tensors(self.model))
        if not any(uses_external_data(t) and self._source_file(t).resolve() == target for t in mine):
            return
        theirs = list(_all_tensors(saved))
        for old, new in zip(mine, theirs, strict=True):
            if uses_external_data(new):
                old.ClearField("raw_data")
                del old.external_data[:]
                old.external_data.extend(new.external_data)
                old.data_location = new.data_location
        self.base_dir = path.parent
        self.source = path


def _copy_field(target: Any, descriptor: Any, value: Any) -> None:
    """Copy one field (as returned by ListFields) into `target`."""
    if hasattr(value, "extend"):  # repeated
        getattr(target, descriptor.name).extend(value)
    elif hasattr(value, "CopyFrom"):  # message
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = TensorProto.EXTERNAL


def _string_type() -> int:
    from onnx import TensorProto

    return int(TensorProto.STRING)


def _check_versions(model: onnx.ModelProto, path: Path) -> None:
    """Refuse opsets and IR versions newer than the installed onnx (and so onnxruntime) can handle."""
    import onnx
    from onnx import defs

    newest_opset = defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS and opset.version > newest_opset:
            raise InputFileError(
                f"{path}: opset {opset.version} is newer than the installed onnx {onnx.__version__} supports "
                f"(up to {newest_opset}); re-export with opset <= {newest_opset} or upgrade onnx/onnxruntime"
            )
    if model.ir_version > onnx.IR_VERSION:
        raise InputFileError(
            f"{path}: IR version {model.ir_version} is newer than the installed onnx {onnx.__version__} "
            f"supports (up to {onnx.IR_VERSION})"
        )


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external tensor must point inside the model's folder, at a file that holds all its bytes."""
    from onnx.external_data_helper import uses_external_data

    base = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        if not isinstance(location, str) or any(c in location for c in "\0\n\r"):
            raise InputFileError(f"{path}: tensor {tensor.name!r} has an invalid external data location {location!r}")
        file = (base / location).resolve()
        if not location or Path(location).is_absolute() or not file.is_relative_to(base):
            raise InputFileError(
                f"{path}: tensor '{tensor.name}' has external data outside the model's folder ({location!r})"
            )
        if file not in sizes:
            if not file.is_file():
                raise InputFileError(f"{path}: external data file {location!r} of tensor '{tensor.name}' is missing")
            sizes[file] = file.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", sizes[file] - offset))
        except ValueError:
            raise InputFileError(f"{path}: tensor '{tensor.name}' has a corrupt external data entry") from None
        if offset < 0 or length < 0 or offset + length > sizes[file]:
            raise InputFileError(
                f"{base / location}: truncated external data (tensor '{tensor.name}' needs bytes "
                f"{offset}..{offset + length}, the file has {sizes[file]})"
            )


def _check_inline_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Inline tensors whose byte count does not match their shape (a damaged file) fail here, not in a pass."""
    import numpy as np
    from onnx import helper
    from onnx.external_data_helper import uses_external_data

    for tensor in _all_tensors(model):
        if not isinstance(tensor.name, str):  # protobuf hands back bytes for a name that is not UTF-8
            raise InputFileError(f"{path}: corrupt tensor name {tensor.name!r}")
        if uses_external_data(tensor) or tensor.data_type == _string_type():
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            if itemsize == 1 and "4" in helper.tensor_dtype_to_string(tensor.data_type):
                continue  # packed 4-bit types: two values per byte
        except Exception:
            raise InputFileError(f"{path}: tensor '{tensor.name}' has an unknown data type {tensor.data_type}") from None
        if any(d < 0 for d in tensor.dims):
            raise InputFileError(f"{path}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if tensor.raw_data and len(tensor.raw_data) != count * itemsize:
            raise InputFileError(f"{path}: tensor '{tensor.name}' is corrupt ({len(tensor.raw_data)} bytes for shape "
                                 f"{list(tensor.dims)})")


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


def as_artifact(model: ModelArtifact | onnx.ModelProto | str | os.PathLike[str], what: str = "model") -> ModelArtifact:
    """The one coercion every stage uses: a ModelArtifact as is, a path loaded, a ModelProto wrapped.

    Anything else is an OptionError naming `what` (the argument or option it came from).
    """
    import onnx

    from .errors import OptionError

    if isinstance(model, ModelArtifact):
        return model
    if isinstance(model, onnx.ModelProto):
        return ModelArtifact.from_model(model)
    if isinstance(model, (str, os.PathLike)) and str(model):
        return ModelArtifact.load(model)
    raise OptionError(f"{what}: expected an ONNX file, ModelArtifact or ModelProto, got {model!r}")
