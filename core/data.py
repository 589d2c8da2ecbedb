"""Calibration and evaluation data: one interface over files, folders, arrays and Python iterables.

    source = load_data("calib.npz", model, batch_size=32)
    source.num_samples            # known up front for files/arrays, None for one-shot iterables until run
    for feeds in source.batches():  # dict input name -> np.ndarray, validated against the model
        ...

Accepted specs:
- a `.npy` file (single-input models; first axis = samples; memory-mapped, so memory does not grow with N),
- a `.npz` file whose keys are the model's input names,
- a folder of images with a declared preprocessing (`Preprocess`: resize, center crop, scale, mean/std,
  channel order, layout),
- a numpy array, a dict of arrays (input name -> array, first axis = samples),
- an iterable of batches or a callable returning one (e.g. a torch DataLoader): each batch is an array, a
  dict, or a tuple/list whose leading elements are the inputs in order (labels after them are ignored).

Everything is checked against the model's inputs before any work starts: names, rank, fixed dimensions and
dtype; the error names the input and both shapes. Values are checked batch by batch (NaN/Inf are errors).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError, InputFileError, OptionError, close_matches

if TYPE_CHECKING:
    from .runtime import TensorSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
_FLOAT_KINDS = "f"
_INT_KINDS = "iu"


@dataclass(frozen=True)
class Preprocess:
    """How images in a folder become model inputs.

    resize: shorter side to this many pixels (int) or exact (height, width); None = straight to the model's size.
    crop: center crop (int or (height, width)) after resizing; None = no crop.
    scale: multiply pixel values (0..255) by this, e.g. 1/255.
    mean/std: per-channel, applied after scaling ((x * scale - mean) / std), in the output channel order.
    channels: "rgb", "bgr" or "gray".
    layout: "nchw" or "nhwc"; None = inferred from the model's input shape.
    dtype: output dtype, default the model input's dtype.
    """

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channels: str = "rgb"
    layout: str | None = None
    dtype: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Preprocess:
        """Build from a dict of strings or values (`--preprocess resize=256 crop=224 mean=0.485,0.456,0.406`)."""
        options = dict(options or {})
        known = cls.__dataclass_fields__
        for key in options:
            if key not in known:
                raise OptionError(f"unknown preprocessing option '{key}'{close_matches(key, known)}")
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            try:
                if key in ("resize", "crop"):
                    kwargs[key] = _size(value)
                elif key == "scale":
                    kwargs[key] = _number(value)
                elif key in ("mean", "std"):
                    kwargs[key] = tuple(_number(v) for v in (value.split(",") if isinstance(value, str) else value))
                else:
                    kwargs[key] = None if value is None else str(value).lower()
            except (TypeError, ValueError, ZeroDivisionError):
                raise OptionError(f"preprocessing option '{key}': invalid value {value!r}") from None
        result = cls(**kwargs)
        if result.channels not in ("rgb", "bgr", "gray"):
            raise OptionError(f"preprocessing option 'channels' must be rgb, bgr or gray, got {result.channels!r}")
        if result.layout not in (None, "nchw", "nhwc"):
            raise OptionError(f"preprocessing option 'layout' must be nchw or nhwc, got {result.layout!r}")
        if any(s == 0 for s in result.std):
            raise OptionError("preprocessing option 'std' must not contain 0")
        return result


def _number(value: Any) -> float:
    if isinstance(value, str):
        text = value.strip()
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    return float(value)


def _size(value: Any) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        return parts[0] if len(parts) == 1 else (parts[0], parts[1])
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[1]))
    return int(value)


@dataclass
class DataSource:
    """Validated batches for a model. Iterate `batches()` (re-iterable unless built from a one-shot iterator)."""

    inputs: list[TensorSpec]
    batch_size: int
    num_samples: int | None
    description: str
    _make: Callable[[], Iterator[Mapping[str, Any]]] = field(repr=False)
    _first: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _consumed: bool = field(default=False, repr=False)
    one_shot: bool = False
    cast: bool = False  # integer/bool data for float inputs cast as is (else refused)
    _warned: bool = field(default=False, repr=False)  # constant samples are reported on the first full read
    first: int = 0  # index of the first sample in the whole data (a shard's rows start later; errors say so)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield validated feeds (dict input name -> array), batch by batch; the first axis is the batch."""
        if self.one_shot and self._consumed:
            raise DataError(f"{self.description}: a one-shot iterator can only be read once; pass a callable or a list")
        self._consumed = True
        offset = self.first
        constant: dict[str, list[np.ndarray]] = {}
        for raw in self._make():
            feeds = _validate(raw, self.inputs, self.description, offset, self.cast)
            for name, array in feeds.items():
                flat = constant_samples(array)
                if flat.size:
                    constant.setdefault(name, []).append(flat + offset)
            offset += batch_len(feeds)
            yield feeds
            del raw, feeds, array  # not held while the next batch is read (the consumer may have freed it)
        if offset == self.first:
            raise DataError(f"{self.description}: no samples")
        if not self._warned:
            self._warned = True
            for name, parts in constant.items():
                _warn_constant(self.description, name, np.concatenate(parts), offset)
        if self.num_samples is None:
            self.num_samples = offset - self.first

    def peek(self) -> dict[str, np.ndarray]:
        """The first validated batch (for shape checks before heavy work)."""
        if self._first is None:
            self._first = next(iter(self.batches()))
            self._consumed = False
        return self._first


def batch_len(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _shape_text(shape: Iterable[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _as_array(value: Any, name: str, where: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise DataError(f"{where}: input '{name}' is not array-like ({type(value).__name__}: {exc})") from None
    if array.dtype == object:
        raise DataError(f"{where}: input '{name}' is not a numeric array (dtype object)")
    return array


def check_spec(array: np.ndarray, spec: TensorSpec, where: str, batched: bool = True,
               shown: tuple[int, ...] | None = None, cast: bool = False) -> np.ndarray:
    """Check one input array's rank/dims/dtype against the model input; returns it cast to the model dtype.

    shown: the shape to print in errors (when `array` is an empty slice of the real data).
    """
    expected = spec.shape
    shown = tuple(array.shape) if shown is None else tuple(shown)
    if array.ndim != len(expected):
        raise DataError(
            f"{where}: input '{spec.name}' has shape {_shape_text(shown)}, the model expects "
            f"{_shape_text(expected)} (rank {array.ndim} vs {len(expected)})"
        )
    for axis, (got, want) in enumerate(zip(array.shape, expected, strict=True)):
        if isinstance(want, int) and want > 0 and got != want and not (batched and axis == 0):
            raise DataError(
                f"{where}: input '{spec.name}' has shape {_shape_text(shown)}, the model expects "
                f"{_shape_text(expected)} (axis {axis}: {got} vs {want})"
            )
    return check_dtype(array, spec.dtype, f"{where}: input '{spec.name}'", cast)


def check_dtype(array: np.ndarray, dtype: Any, where: str, cast: bool | None = False) -> np.ndarray:
    """`array` as `dtype` (a model input's): integer or bool data for a float input is refused unless `cast`
    (zeros in an int32 array are rarely what a float model was trained on; None: no cast is offered); float
    data for an integer input, and anything but bool for a bool input, are refused always. `where` names the
    file and the input."""
    want = np.dtype(dtype)
    if array.dtype == want:
        return array
    kind, want_kind = array.dtype.kind, want.kind
    if want_kind in _FLOAT_KINDS and kind in _INT_KINDS + "b":
        if not cast:
            hint = "" if cast is None else ", or cast it as is with --cast (trtkit calibrate; recipe [calibration] cast = true)"
            raise DataError(f"{where} is {array.dtype} data for a {want} model input; convert it{hint}")
        return array.astype(want)
    if (want_kind in _FLOAT_KINDS and kind in _FLOAT_KINDS) or (want_kind in _INT_KINDS and kind in _INT_KINDS):
        return array.astype(want)
    raise DataError(f"{where} has dtype {array.dtype}, the model expects {want}")


def _warn_constant(where: str, name: str, samples: np.ndarray, total: int) -> None:
    """One warning line per input with constant samples (all values equal: all-zero arrays, blank frames)."""
    import sys

    shown = ", ".join(str(int(i)) for i in samples[:8]) + (", ..." if samples.size > 8 else "")
    print(f"warning: {where}: input '{name}' is constant within {samples.size} of {total} sample(s) "
          f"(samples {shown}); statistics from them say nothing about real data", file=sys.stderr)


def constant_samples(array: np.ndarray) -> np.ndarray:
    """Indices (along the first axis) of the samples whose values are all the same."""
    if array.ndim == 0 or array.size == 0:
        return np.zeros(0, np.int64)
    flat = array.reshape(array.shape[0], -1)
    return np.flatnonzero((flat == flat[:, :1]).all(axis=1))


def _validate(raw: Any, specs: list[TensorSpec], where: str, offset: int, cast: bool = False
              ) -> dict[str, np.ndarray]:
    names = [spec.name for spec in specs]
    if isinstance(raw, Mapping):
        unknown = [key for key in raw if key not in names]
        if unknown:
            key = str(unknown[0])
            raise DataError(f"{where}: unknown input '{key}'{close_matches(key, names)} (model inputs: {', '.join(names)})")
        missing = [name for name in names if name not in raw]
        if missing:
            raise DataError(f"{where}: no data for input '{missing[0]}' (got: {', '.join(map(str, raw)) or 'nothing'})")
        items = {name: raw[name] for name in names}
    elif isinstance(raw, (tuple, list)):
        if len(raw) < len(names):
            raise DataError(f"{where}: a batch has {len(raw)} element(s), the model has {len(names)} inputs ({', '.join(names)})")
        items = dict(zip(names, raw[: len(names)], strict=True))
    else:
        if len(names) != 1:
            raise DataError(f"{where}: the model has {len(names)} inputs ({', '.join(names)}); give a dict or .npz keyed by input name")
        items = {names[0]: raw}
    feeds: dict[str, np.ndarray] = {}
    length = None
    for spec in specs:
        array = check_spec(_as_array(items[spec.name], spec.name, where), spec, where, cast=cast)
        if array.ndim == 0:
            raise DataError(f"{where}: input '{spec.name}' is a scalar, expected a batch of shape {_shape_text(spec.shape)}")
        if length is None:
            length = array.shape[0]
        elif array.shape[0] != length:
            raise DataError(f"{where}: inputs have different batch sizes ({length} vs {array.shape[0]} for '{spec.name}')")
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                bad = int(np.argwhere(~finite)[0][0])
                raise DataError(f"{where}: input '{spec.name}' has NaN/Inf values (sample {offset + bad})")
        feeds[spec.name] = np.ascontiguousarray(array)
    return feeds


def _fixed_batch(specs: list[TensorSpec]) -> int | None:
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return int(spec.shape[0])
    return None


def _slices(arrays: dict[str, Any], total: int, batch_size: int, fixed: int | None, first: int = 0
            ) -> Iterator[dict[str, Any]]:
    step = fixed or batch_size
    stop = total - (total % step) if fixed else total
    for start in range(first, stop, step):
        yield {name: np.asarray(array[start:start + step]) for name, array in arrays.items()}


def _model_inputs(model: Any) -> list[TensorSpec]:
    from .model import ModelArtifact
    from .runtime import input_specs

    if isinstance(model, (list, tuple)):
        return list(model)
    if isinstance(model, (str, os.PathLike)):
        model = ModelArtifact.load(model)
    if isinstance(model, ModelArtifact):
        model = model.model
    return input_specs(model)


def load_data(
    spec: Any,
    model: Any,
    batch_size: int = 32,
    limit: int | None = None,
    preprocess: Preprocess | Mapping[str, Any] | None = None,
    cast: bool = False,
    rows: tuple[int, int] | None = None,
) -> DataSource:
    """A validated DataSource for `model` (path, ModelArtifact, ModelProto or list of TensorSpec).

    limit: use at most this many samples. Fixed-batch models are fed their batch size (a remainder is dropped).
    cast: accept integer/bool data for float inputs (cast as is); without it such data is a DataError.
    Samples whose values are all equal (all-zero arrays, blank frames) are named in one warning line per
    input once the data has been read.
    rows: (start, stop) of a file or folder: only those samples, batched as the whole data is (a shard,
    `DataShard`; start is a multiple of the batch size); errors name the samples by their index in the file.
    """
    if batch_size < 1:
        raise OptionError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise OptionError(f"limit must be >= 1, got {limit}")
    specs = _model_inputs(model)
    if not specs:
        raise DataError("the model has no inputs to feed")
    if preprocess and not (isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir()):
        if not isinstance(preprocess, Preprocess):
            Preprocess.from_options(preprocess)  # a bad value is reported as such first
        raise OptionError("preprocessing options apply to image folders only; this data is not a folder")
    fixed = _fixed_batch(specs)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            return _image_folder(path, specs, batch_size, limit, preprocess, fixed, rows)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file or folder")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                array = NpyFile(path)
            except Exception as exc:
                raise InputFileError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise DataError(f"{path}: a .npy file feeds one input, the model has {len(specs)} ({names}); use .npz")
            return _arrays({specs[0].name: array}, specs, batch_size, limit, str(path), fixed, cast, rows)
        if suffix == ".npz":
            try:
                archive = np.load(path, allow_pickle=False)
                arrays = {key: archive[key] for key in archive.files}
            except Exception as exc:
                raise InputFileError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
            return _arrays(arrays, specs, batch_size, limit, str(path), fixed, cast, rows)
        raise InputFileError(f"{path}: unsupported data file (use .npy, .npz or a folder of images)")
    if isinstance(spec, np.ndarray):
        if len(specs) != 1:
            raise DataError(f"an array feeds one input, the model has {len(specs)}; give a dict keyed by input name")
        return _arrays({specs[0].name: spec}, specs, batch_size, limit, "data array", fixed, cast)
    if isinstance(spec, Mapping):
        return _arrays(dict(spec), specs, batch_size, limit, "data dict", fixed, cast)
    if callable(spec) and not hasattr(spec, "__iter__"):
        return _iterable(spec, specs, batch_size, limit, f"data callable {getattr(spec, '__name__', '')}".strip(),
                         cast)
    if isinstance(spec, Iterable):
        return _iterable(spec, specs, batch_size, limit, f"data {type(spec).__name__}", cast)
    raise DataError(f"unsupported calibration data of type {type(spec).__name__}")


def _arrays(arrays: dict[str, Any], specs: list[TensorSpec], batch_size: int, limit: int | None, where: str,
            fixed: int | None, cast: bool = False, rows: tuple[int, int] | None = None) -> DataSource:
    names = [s.name for s in specs]
    for key in arrays:
        if key not in names:
            raise DataError(f"{where}: unknown input '{key}'{close_matches(key, names)} (model inputs: {', '.join(names)})")
    for name in names:
        if name not in arrays:
            raise DataError(f"{where}: no data for input '{name}' (got: {', '.join(arrays) or 'nothing'})")
    counts = set()
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim == 0:
            raise DataError(f"{where}: input '{spec.name}' is a scalar, expected samples of shape {_shape_text(spec.shape)}")
        # Validate shape and dtype up front on an empty slice (no data read).
        check_spec(np.asarray(array[:0]), spec, where, shown=tuple(array.shape), cast=cast)
        counts.add(int(array.shape[0]))
    if len(counts) != 1:
        raise DataError(f"{where}: inputs have different numbers of samples ({sorted(counts)})")
    total = counts.pop()
    if limit is not None:
        total = min(total, limit)
    first = 0
    if rows is not None:
        first, total = rows[0], min(total, rows[1])
    if total == 0:
        raise DataError(f"{where}: no samples")
    if fixed and total < fixed:
        raise DataError(f"{where}: {total} sample(s), fewer than the model's fixed batch size {fixed}")
    used = total - total % fixed if fixed else total
    return DataSource(specs, fixed or batch_size, used - first, where,
                      lambda: _slices(arrays, total, batch_size, fixed, first), cast=cast, first=first)


def _rebatch(items: Iterable[Any], specs: list[TensorSpec], limit: int | None, where: str, cast: bool = False
             ) -> Iterator[Any]:
    seen = 0
    for raw in items:
        if limit is not None and seen >= limit:
            return
        if limit is not None:
            feeds = _validate(raw, specs, where, seen, cast)
            n = batch_len(feeds)
            if seen + n > limit:
                feeds = {k: v[: limit - seen] for k, v in feeds.items()}
                n = limit - seen
            seen += n
            yield feeds
        else:
            yield raw


def _iterable(spec: Any, specs: list[TensorSpec], batch_size: int, limit: int | None, where: str,
              cast: bool = False) -> DataSource:
    num: int | None = None
    dataset = getattr(spec, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        num = len(dataset)
    elif isinstance(spec, (list, tuple)):
        num = None  # batches of unknown size until read
    if num is not None and limit is not None:
        num = min(num, limit)
    if callable(spec) and not hasattr(spec, "__iter__"):
        def make() -> Iterator[Any]:
            return _rebatch(spec(), specs, limit, where, cast)
        return DataSource(specs, batch_size, num, where, make, cast=cast)
    one_shot = iter(spec) is spec
    if one_shot:
        # Validate the first batch now, before any heavy work, and put it back in front.
        iterator = iter(spec)
        try:
            first = next(iterator)
        except StopIteration:
            raise DataError(f"{where}: no samples") from None
        _validate(first, specs, where, 0, cast)
        chained = itertools.chain([first], iterator)
        return DataSource(specs, batch_size, num, where, lambda: _rebatch(chained, specs, limit, where, cast),
                          one_shot=True, cast=cast)
    source = DataSource(specs, batch_size, num, where, lambda: _rebatch(spec, specs, limit, where, cast),
                        cast=cast)
    source.peek()
    return source


class NpyFile:
    """A .npy file read row-range by row-range with plain reads (first axis = samples).

    Unlike a memory map, rows already used do not stay resident in the process (RSS), so reading a large
    calibration file batch by batch keeps memory flat.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            self.offset = handle.tell()
        if dtype.hasobject:
            raise ValueError("object arrays are not supported")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._fortran = fortran
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.ndim else 1
        size = self.path.stat().st_size
        if size < self.offset + self._row * (self.shape[0] if self.ndim else 1) * self.dtype.itemsize:
            raise ValueError("file is truncated")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or self.ndim == 0:
            raise TypeError("NpyFile supports row slices only")
        start, stop, step = index.indices(self.shape[0])
        if self._fortran or step != 1:
            return np.asarray(np.load(self.path, mmap_mode="r")[index])
        count = max(0, stop - start)
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + start * self._row * self.dtype.itemsize)
            data = np.fromfile(handle, dtype=self.dtype, count=count * self._row)
        return data.reshape((count, *self.shape[1:]))


# ---- image folders -----------------------------------------------------------------------------------------

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_folder(folder: Path, specs: list[TensorSpec], batch_size: int, limit: int | None,
                  preprocess: Preprocess | Mapping[str, Any] | None, fixed: int | None,
                  rows: tuple[int, int] | None = None) -> DataSource:
    if len(specs) != 1:
        raise DataError(f"{folder}: an image folder feeds one input, the model has {len(specs)}")
    spec = specs[0]
    prep = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_options(preprocess)
    files = list_images(folder)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(spec.shape) != 4:
        raise DataError(f"{folder}: input '{spec.name}' has shape {_shape_text(spec.shape)}; images need a 4-D input")
    layout = prep.layout or ("nhwc" if spec.shape[3] in (1, 3, 4) and spec.shape[1] not in (1, 3, 4) else "nchw")
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "nchw" else (1, 2, 3)
    size = _final_size(prep, spec.shape[h_axis], spec.shape[w_axis], folder)
    declared = spec.shape[c_axis]
    channels = declared if isinstance(declared, int) else (1 if prep.channels == "gray" else 3)
    if prep.channels == "gray" and channels != 1:
        raise DataError(f"{folder}: preprocessing channels=gray gives 1 channel, input '{spec.name}' expects {channels}")
    for name, values in (("mean", prep.mean), ("std", prep.std)):
        if values and len(values) not in (1, channels):
            raise OptionError(f"preprocessing option '{name}' has {len(values)} values, the input has {channels} channels")
    if fixed and len(files) < fixed:
        raise DataError(f"{folder}: {len(files)} image(s), fewer than the model's fixed batch size {fixed}")
    step = fixed or batch_size
    used = len(files) - len(files) % fixed if fixed else len(files)
    dtype = prep.dtype or spec.dtype
    first, used = (rows[0], min(used, rows[1])) if rows is not None else (0, used)

    def make() -> Iterator[dict[str, np.ndarray]]:
        for start in range(first, used, step):
            batch = np.stack([_load_image(f, prep, size, channels, layout) for f in files[start:start + step]])
            yield {spec.name: batch.astype(dtype)}

    source = DataSource(specs, step, used - first, str(folder), make, first=first)
    source.peek()
    return source


def _final_size(prep: Preprocess, height: Any, width: Any, folder: Path) -> tuple[int, int]:
    if prep.crop is not None:
        return (prep.crop, prep.crop) if isinstance(prep.crop, int) else prep.crop
    if isinstance(prep.resize, tuple):
        return prep.resize
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return (height, width)
    if isinstance(prep.resize, int):
        raise DataError(f"{folder}: resize={prep.resize} keeps the aspect ratio; give crop= for a dynamic-size input")
    raise DataError(f"{folder}: the model input size is dynamic; declare resize=HxW or crop=")


def _load_image(path: Path, prep: Preprocess, size: tuple[int, int], channels: int, layout: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if isinstance(prep.resize, int):
                w, h = image.size
                ratio = prep.resize / min(w, h)
                image = image.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), Image.Resampling.BILINEAR)
            elif isinstance(prep.resize, tuple):
                image = image.resize((prep.resize[1], prep.resize[0]), Image.Resampling.BILINEAR)
            elif prep.crop is None:
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32)
    except OSError as exc:
        raise InputFileError(f"{path}: not a readable image ({exc})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if prep.crop is not None:
        ch, cw = size
        h, w = array.shape[:2]
        if h < ch or w < cw:
            raise DataError(f"{path}: image {h}x{w} is smaller than the crop {ch}x{cw}; add resize=")
        top, left = (h - ch) // 2, (w - cw) // 2
        array = array[top:top + ch, left:left + cw]
    if prep.channels == "bgr":
        array = array[:, :, ::-1]
    array = array * np.float32(prep.scale)
    if prep.mean:
        array = array - np.asarray(prep.mean, dtype=np.float32)
    if prep.std:
        array = array / np.asarray(prep.std, dtype=np.float32)
    if layout == "nchw":
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


# ---- shards: what a worker reads -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DataShard:
    """Samples [start, stop) of a data file or image folder, read where it runs (a description, no arrays):
    every worker must see `path` (the same path on every machine of a cluster)."""

    path: str
    start: int
    stop: int
    batch_size: int
    preprocess: Preprocess | None = None
    cast: bool = False

    def __str__(self) -> str:
        return f"{self.path} samples {self.start}-{self.stop - 1}"

    def load(self, model: Any) -> DataSource:
        """The DataSource of these samples for `model`, batched as a pass over the whole data would be;
        warnings about constant samples are left to the pass that reads the whole data."""
        source = load_data(self.path, model, batch_size=self.batch_size, preprocess=self.preprocess,
                           cast=self.cast, rows=(self.start, self.stop))
        source._warned = True
        return source


def shard_data(spec: Any, source: DataSource, parts: int, preprocess: Preprocess | Mapping[str, Any] | None = None,
               cast: bool = False, what: str = "--workers") -> list[DataShard]:
    """`source` (loaded from `spec`) cut into at most `parts` contiguous shards on batch boundaries, in order.
    Workers read the data by path, so `spec` must be a data file or an image folder (OptionError otherwise)."""
    from .engine import split

    if not isinstance(spec, (str, os.PathLike)) or source.num_samples is None:
        raise OptionError(f"{what}: workers read the data by path; give a .npy/.npz file or an image folder, "
                          f"not {source.description}")
    path = str(Path(spec).resolve())
    prep = preprocess if isinstance(preprocess, Preprocess) or preprocess is None else Preprocess.from_options(preprocess)
    return [DataShard(path, start, stop, source.batch_size, prep, cast)
            for start, stop in split(source.num_samples, parts, source.batch_size)]


# ---- fingerprints ------------------------------------------------------------------------------------------

class DataFingerprint:
    """SHA-256 of the data, per input in sample order: independent of how the samples are batched."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._hashes = {name: hashlib.sha256() for name in names}
        self._layout: dict[str, str] = {}
        self.num_samples = 0

    def update(self, feeds: Mapping[str, np.ndarray]) -> None:
        for name in self.names:
            array = np.ascontiguousarray(feeds[name])
            self._layout.setdefault(name, f"{array.dtype.str}{array.shape[1:]}")
            self._hashes[name].update(array.tobytes() if not array.flags.c_contiguous else array.data.cast("B"))
        self.num_samples += batch_len(feeds)

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for name in self.names:
            total.update(f"{name}\0{self._layout.get(name, '')}\0".encode() + self._hashes[name].digest())
        return total.hexdigest()
