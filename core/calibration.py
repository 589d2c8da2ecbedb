"""Calibration: collect activation statistics once, compute ranges with any method, save them as scales.

    scales = trtkit.calibrate("model.onnx", "calib.npz")  # the default calibrator, or method="NAME"
    scales.save("scales.json")                 # tensor -> amax (scale = amax / 127), method, fingerprints

    stats = collect("model.onnx", data)        # one onnxruntime pass, batch by batch
    stats.compute("NAME", options={...})        # any calibrator from the same statistics

Statistics are mergeable and exact: per tensor min, max, count and a histogram of |x| with FINE_BINS bins over
[0, R) where R is the smallest power of two above the largest |x| seen. When a batch exceeds R, R doubles and
pairs of bins merge; because bin edges are powers of two apart, this is exactly the histogram computed at the
final range in one go. So the statistics (and every method's result) do not depend on batch size or order.

Memory does not grow with the number of samples: each run's outputs are reduced immediately, and a
dynamic-batch model runs in slices of the data's batches holding at most about RUN_BYTES of observed
activations. Statistics of slice k are computed while onnxruntime runs slice k + 1 (it releases the GIL).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError, InputFileError, OptionError, UnknownNameError, first_line, unknown_name
from .scales import Scales, load_overrides, model_fingerprint, read_scales_file, tensor_names
from .stages import Builder, Calibrator

if TYPE_CHECKING:
    import onnx

    from .data import DataFingerprint, DataShard, DataSource
    from .engine import Execution


FINE_BINS = 8192          # internal histogram resolution (power of two)
HISTOGRAM_BINS = 2048     # default bins of TensorStats.histogram over [0, observed |x| max]
CHUNK = 1 << 16           # elements binned at a time: with their scratch (_scratch) they stay in the core's cache
NATIVE_CHUNK = 1 << 17    # the same with the compiled counter (no scratch: read twice, min/max then count)
SKIP_ZEROS_FROM = 1 << 14  # binning counts the exact zeros of at least this many values apart (see TensorStats._bin)
# Histogram positions per sample per tensor (see collect(histogram_positions=...)). Binning costs ~5 ns a value in numpy
# and holds the GIL, more than the convolutions that produce the values on depthwise nets; 4096 evenly spread
# positions of every sample change SQNR by < 0.3 dB on the benchmark models while min/max stay exact.
# Calibrators declaring statistics="exact-histogram" get every value: a KL divergence depends on how many values
# fill the tail bins (sampling moved TensorRT's KL threshold by 12 % on a test model).
DEFAULT_HISTOGRAM_POSITIONS = 4096
RUN_BYTES = 4 << 20       # observed activations per onnxruntime run (dynamic-batch models run in slices)
TINY_AMAX = 1e-8          # used for tensors that are identically zero (scales must be > 0)


# ---- statistics --------------------------------------------------------------------------------------------

@dataclass
class TensorStats:
    """Mergeable statistics of one tensor: min, max, count and a |x| histogram over [0, range)."""

    name: str
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    range: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, dtype=np.int64))
    nonfinite: int = 0

    @property
    def absmax(self) -> float:
        if self.count == 0:
            return 0.0
        return float(max(abs(self.min), abs(self.max)))

    def _grow(self, new_range: float) -> None:
        if self.range == 0.0:
            self.range = new_range
            return
        factor = int(round(new_range / self.range))
        if factor <= 1:
            return
        if factor >= FINE_BINS:
            merged = np.zeros(FINE_BINS, dtype=np.int64)
            merged[0] = self.hist.sum()
        else:
            merged = np.zeros(FINE_BINS, dtype=np.int64)
            merged[: FINE_BINS // factor] = self.hist.reshape(-1, factor).sum(axis=1)
        self.hist = merged
        self.range = new_range

    def update(self, values: np.ndarray, histogram: bool = True, histogram_positions: int | None = None) -> None:
        """Add a batch of values (first axis = samples). Non-finite values are counted and left out.

        histogram=False keeps only min/max/count (statistics="range"; the histogram is then empty).
        histogram_positions: histogram at most about this many positions of each sample (the same positions in every
        sample, a prime stride apart, whatever the batching); min, max and count always see every value.
        """
        x = np.asarray(values)
        if x.size == 0:
            return
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        items = x.shape[0] if x.ndim > 1 else 1
        flat = x.reshape(-1)
        positions = flat.size // items
        if histogram and (histogram_positions is None or positions <= histogram_positions):
            # Every value: each chunk is read from memory once and then min/max'd and binned while it is in cache
            # (the range grows chunk by chunk; _grow makes that exactly the histogram at the final range).
            chunk = NATIVE_CHUNK if flat.dtype == np.float32 and _native_counter() is not None else CHUNK
            for start in range(0, flat.size, chunk):
                part = flat[start:start + chunk]
                finite, lo, hi = self._extend(part)
                if finite is not None:
                    self._bin(part[finite] if isinstance(finite, np.ndarray) else part, lo, hi)
            return
        finite, lo, hi = self._extend(flat)
        if not histogram or finite is None:
            return
        stride = _prime_at_least(-(-positions // histogram_positions)) if histogram_positions else 1
        sample = flat.reshape(items, positions)[:, ::stride].reshape(-1)
        if isinstance(finite, np.ndarray):
            sample = sample[finite.reshape(items, positions)[:, ::stride].reshape(-1)]
        for start in range(0, sample.size, CHUNK):
            self._bin(sample[start:start + CHUNK], lo, hi)  # the range covers every value, sampled or not

    def _extend(self, values: np.ndarray) -> tuple[np.ndarray | bool | None, float, float]:
        """Count `values` (flat) into count, min, max and nonfinite. Returns (True when all are finite, else the
        mask of the finite ones, or None when none is; the finite min; the finite max)."""
        lo, hi = float(values.min()), float(values.max())  # NaN propagates, inf shows: no isfinite pass needed
        finite: np.ndarray | bool = True
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = np.isfinite(values)
            finite_count = int(np.count_nonzero(finite))
            self.nonfinite += int(values.size - finite_count)
            if finite_count == 0:
                return None, lo, hi
            lo, hi = float(values[finite].min()), float(values[finite].max())
            self.count += finite_count
        else:
            self.count += int(values.size)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        return finite, lo, hi

    def _bin(self, values: np.ndarray, lo: float, hi: float) -> None:
        """Add finite `values` (flat, at most CHUNK, or NATIVE_CHUNK float32 ones when the compiled counter
        is there) to the |x| histogram, growing the range to cover [lo, hi]
        (bounds of the values, or of the values they were sampled from).

        Bin of v: floor(|v| * FINE_BINS / range), computed as one multiply by a power of two (exact) truncated to
        an integer, the same for every batching (tests pin it against exact rational arithmetic)."""
        amax = max(-lo, hi)
        if amax > 0.0:
            _, exponent = math.frexp(amax)  # amax < 2**exponent
            new_range = math.ldexp(1.0, exponent)
            if new_range > self.range:
                self._grow(new_range)
        if self.range == 0.0:
            self.hist[0] += values.size
            return
        if values.dtype == np.float32 and _count_natively(values, FINE_BINS / self.range, self.hist):
            return
        for start in range(0, values.size, CHUNK):
            self._count(values[start:start + CHUNK], lo, hi)

    def _count(self, values: np.ndarray, lo: float, hi: float) -> None:
        """numpy's way of counting finite `values` (at most CHUNK, within the range) into the histogram."""
        magnitudes, bins, nonzero = _scratch(values.dtype, values.size)
        if lo <= 0.0 <= hi and values.size >= SKIP_ZEROS_FROM:
            # Exact zeros (often half of a ReLU's output) go to bin 0 by count: bincount is slow on them (its
            # min/max pre-pass mispredicts on runs of zeros between other values), and dropping them is cheap.
            np.not_equal(values, 0.0, out=nonzero)
            kept = int(np.count_nonzero(nonzero))
            if 4 * (values.size - kept) >= values.size:
                self.hist[0] += values.size - kept
                if kept == 0:
                    return
                values = np.compress(nonzero, values, out=magnitudes[:kept])
                magnitudes, bins = magnitudes[:kept], bins[:kept]
        if lo < 0.0:
            values = np.abs(values, out=magnitudes)
        factor = values.dtype.type(FINE_BINS / self.range)  # a power of two: the product is exact, < FINE_BINS
        np.multiply(values, factor, out=bins, casting="unsafe")  # truncates toward zero, as astype(np.intp)
        counts = np.bincount(bins)  # no minlength: chunks of small values touch few bins
        self.hist[: counts.size] += counts

    def merge(self, other: TensorStats) -> TensorStats:
        """Combine with statistics of other samples (exact: same as collecting them together)."""
        result = TensorStats(self.name, self.count, self.min, self.max, self.range, self.hist.copy(), self.nonfinite)
        if other.count == 0:
            return result
        result.min, result.max = min(self.min, other.min), max(self.max, other.max)
        result.count += other.count
        result.nonfinite += other.nonfinite
        target = max(self.range, other.range)
        result._grow(target)
        theirs = TensorStats(other.name, other.count, other.min, other.max, other.range, other.hist.copy())
        theirs._grow(target)
        if result.range == 0.0:
            result.range = theirs.range
        result.hist = result.hist + theirs.hist
        return result

    def histogram(self, bins: int = HISTOGRAM_BINS, upper: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of |x| with `bins` bins over [0, upper] (default the observed |x| max).

        Derived from the fine histogram by interpolating its cumulative counts (counts may be fractional).
        """
        upper = self.absmax if upper is None else upper
        edges = np.linspace(0.0, upper, bins + 1)
        if self.range == 0.0 or upper <= 0.0:
            counts = np.zeros(bins)
            counts[0] = float(self.hist.sum())
            return counts, edges
        fine_edges = np.linspace(0.0, self.range, FINE_BINS + 1)
        cumulative = np.concatenate([[0.0], np.cumsum(self.hist, dtype=np.float64)])
        at = np.interp(edges, fine_edges, cumulative)
        at[-1] = cumulative[-1] if upper >= self.absmax else at[-1]
        return np.diff(at), edges

    def clipped_fraction(self, amax: float) -> float | None:
        """Fraction of the histogrammed values with |x| beyond amax (bins wholly above it; None: no histogram)."""
        total = int(self.hist.sum())
        if total == 0 or self.range == 0.0:
            return None
        first = int(math.floor(amax * FINE_BINS / self.range)) + 1
        return float(self.hist[first:].sum() / total) if first < FINE_BINS else 0.0

    def to_summary(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "count": self.count}


def _native_counter() -> Any:
    """trtkit.native_count's compiled counter, or None (imported on first use: it may compile the kernel)."""
    from .native_count import count_function

    return count_function()


def _count_natively(values: np.ndarray, factor: float, hist: np.ndarray) -> bool:
    """Count the bins floor(|v| * factor) of finite float32 `values` into `hist` with the compiled kernel of
    trtkit.native_count (the same float32 product truncated, so the same counts as numpy's path below, about
    3x cheaper). False, having counted nothing, when the kernel is unavailable or the case is not its own."""
    if not (2.0 ** -120 <= factor <= 2.0 ** 120) or hist.dtype != np.int64 or not hist.flags.c_contiguous:
        return False
    count = _native_counter()
    if count is None:
        return False
    outside = count(np.ascontiguousarray(values), np.float32(factor), hist)
    if outside:  # impossible for finite values below the range; never silently wrong
        raise DataError(f"histogram: {outside} value(s) outside the range {FINE_BINS / factor}")
    return True


_SCRATCH = threading.local()


def _scratch(dtype: np.dtype[Any], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's buffers for binning `size` <= CHUNK values of `dtype`: |x|, bin numbers, nonzero mask.
    Reused from call to call: no allocation (and no page faults, no heap churn growing RSS) per chunk."""
    key = dtype.char
    buffers = getattr(_SCRATCH, key, None)
    if buffers is None or buffers[0].size < size:  # smaller: made while CHUNK was smaller (tests patch it)
        length = max(CHUNK, size)
        buffers = (np.empty(length, dtype=dtype), np.empty(length, dtype=np.intp), np.empty(length, dtype=bool))
        setattr(_SCRATCH, key, buffers)
    return buffers[0][:size], buffers[1][:size], buffers[2][:size]


@functools.lru_cache(maxsize=1024)
def _prime_at_least(n: int) -> int:
    """Smallest prime >= n (strides that are prime do not alias with power-of-two image sizes)."""
    candidate = max(2, n)
    while any(candidate % d == 0 for d in range(2, int(candidate ** 0.5) + 1)):
        candidate += 1
    return candidate


# ---- components: the calibrator, the builder that takes scales --------------------------------------

def find_calibrator(method: str | Calibrator | None) -> Calibrator:
    """A Calibrator as is, the registered calibrator of that name (UnknownNameError with close matches), or for
    None the default one (the first registered calibrator marked `default=True`)."""
    from .registry import get_registry

    if isinstance(method, Calibrator):
        return method
    registry = get_registry()
    if method is not None:
        return registry.calibrator(method)
    return registry.default("calibrators")  # type: ignore[return-value]  # the calibrators stage holds Calibrators


def scales_builder() -> Builder:
    """The builder that consumes calibrated scales: the first registered one declaring `scale_tensors` (the
    activations it quantizes, which tensors="quantizable" observes)."""
    from .registry import get_registry

    for component in get_registry().stages["builders"].values():
        if isinstance(component, Builder) and component.scale_tensors is not None:
            return component
    raise OptionError("no installed builder declares the tensors it quantizes (Builder.scale_tensors): "
                      "calibrate with tensors='all' or a list of tensor names")


# ---- which tensors to observe -----------------------------------------------------------------------------

def float_activations(model: onnx.ModelProto) -> list[str]:
    """Every floating-point activation (graph inputs and node outputs, not weights/constants), graph order."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    graph = inferred.graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    initializers = {t.name for t in graph.initializer}
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    names: list[str] = []
    seen: set[str] = set()
    candidates = [v.name for v in graph.input] + [o for n in graph.node for o in n.output]
    for name in candidates:
        if not name or name in seen or name in initializers or name in constants:
            continue
        seen.add(name)
        if types.get(name, onnx.TensorProto.FLOAT) in floats:
            names.append(name)
    return names


def tensors_to_observe(model: onnx.ModelProto, which: str | Iterable[str] = "quantizable") -> list[str]:
    """'quantizable' (what the builder that takes scales may quantize: see scales_builder), 'all' (every float
    activation) or explicit names."""
    if not isinstance(which, str):
        names = list(which)
        _check_names(model, names, "tensor")
        return names
    if which == "all":
        return float_activations(model)
    if which == "quantizable":
        scale_tensors = scales_builder().scale_tensors
        return scale_tensors(model) if scale_tensors is not None else []
    raise OptionError(f"tensors must be 'quantizable', 'all' or a list of names, got {which!r}")


def _check_names(model: onnx.ModelProto, names: Iterable[str], kind: str, where: str = "") -> None:
    known = tensor_names(model)
    for name in names:
        if name not in known:
            error = unknown_name(kind, name, known)
            raise UnknownNameError(f"{where}: {error}" if where else str(error))


# ---- collection --------------------------------------------------------------------------------------------

@dataclass
class Statistics:
    """What one pass over the calibration data collected: per-tensor statistics plus fingerprints."""

    tensors: dict[str, TensorStats]
    num_samples: int
    model: dict[str, Any]
    data: dict[str, Any]
    names: set[str] = field(default_factory=set)  # every tensor name of the model (to validate overrides)
    histograms: bool = True  # False: min/max only (statistics="range"); other calibrators need a new pass

    def compute(self, method: str | Calibrator | None = None, overrides: Any = None,
                options: Mapping[str, Any] | None = None) -> Scales:
        """Scales from these statistics with the calibrator plugin `method` (None: the default calibrator);
        `overrides` pin chosen tensors. CalibrationSettings.scales does this with settings resolved once."""
        calibrator = find_calibrator(method)
        return self._scales(calibrator, calibrator.resolve_options(options), overrides)

    def _scales(self, calibrator: Calibrator, resolved: Mapping[str, Any], overrides: Any) -> Scales:
        method = calibrator.name
        if not self.histograms and calibrator.statistics != "range":
            raise OptionError(f"calibrator '{method}' needs histograms; these statistics were collected without")
        pinned = load_overrides(overrides, self.names) if overrides is not None else {}
        amax: dict[str, float] = {}
        sources: dict[str, str] = {}
        for name, stats in self.tensors.items():
            if name in pinned:
                continue
            value = float(calibrator.compute_amax(stats, **resolved))
            if not math.isfinite(value) or value < 0:
                raise DataError(f"calibrator '{method}' returned amax {value} for tensor '{name}'")
            amax[name] = value if value > 0 else TINY_AMAX
            sources[name] = method
        for name, value in pinned.items():
            amax[name] = value
            sources[name] = "override"
        summary = {name: self.tensors[name].to_summary() for name in self.tensors}
        for name, entry in summary.items():
            clipped = self.tensors[name].clipped_fraction(amax[name]) if name in amax else None
            if clipped is not None:
                entry["clipped"] = clipped
        return Scales(
            amax, method=method, options=resolved, model=self.model, data=self.data, sources=sources, stats=summary
        )


def calibration_threads() -> int:
    """onnxruntime threads for calibration: `--threads` if given, else every usable CPU but one (left to the
    statistics of the previous run; measured 1.3-2x faster than onnxruntime on every core fighting the
    reduction). Usable CPUs honour taskset and the cgroup quota, unlike os.cpu_count()."""
    from .cpus import available_cpus, requested

    return requested() or max(1, available_cpus() - 1)


def collect(
    model: Any,
    data: Any,
    tensors: str | Iterable[str] = "quantizable",
    batch_size: int = 32,
    limit: int | None = None,
    preprocess: Any = None,
    threads: int | None = None,
    progress: bool = True,
    histograms: bool = True,
    histogram_positions: int | None = DEFAULT_HISTOGRAM_POSITIONS,
    execution: Execution | None = None,
    cast: bool = False,
) -> Statistics:
    """Run the model over the data once (onnxruntime, FP32) and reduce every observed tensor's values.

    threads: onnxruntime intra-op threads (default: `--threads` if given, else all usable CPUs but one, which
    reduces the previous run; usable = affinity and cgroup quota, trtkit.cpus).
    histograms=False collects min/max only (all a statistics="range" calibrator needs; several times cheaper).
    histogram_positions: histograms see at most about this many positions of each sample of each tensor (the same
    positions in every sample, evenly spread, so results still do not depend on batching); None = every value.
    min/max are always exact. Histogramming every value is exact but can cost more than the inference itself.
    execution: run on an engine's workers (`trtkit.engine.Execution`; None or in-process: here). `data` is
    then a data file or image folder (`collect_sharded` takes one already loaded); each worker collects the
    statistics of a contiguous shard of it and the shards are merged in order: the result is the
    in-process one, byte for byte.
    """
    from .data import DataSource, load_data
    from .model import as_artifact

    artifact = as_artifact(model)
    onnx_model = artifact.model
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx_model.graph.node):
        raise InputFileError(f"{artifact.source or 'model'}: already quantized (has Q/DQ nodes); calibrate the FP32 model")
    source = data if isinstance(data, DataSource) else load_data(
        data, onnx_model, batch_size=batch_size, limit=limit, preprocess=preprocess, cast=cast
    )
    names = tensors_to_observe(onnx_model, tensors)
    if execution is not None and not execution.in_process:
        if isinstance(data, DataSource):
            raise OptionError("collect on workers: pass the data file or folder (workers read it by path), "
                              "not a loaded DataSource; see collect_sharded")
        stats, fingerprint = _collect_sharded(artifact, data, source, names, execution, histograms,
                                              histogram_positions, preprocess, cast)
    else:
        threads = threads or calibration_threads()
        stats, fingerprint = _observe(artifact, source, names, threads, progress, histograms, histogram_positions)
    return _statistics(artifact, source, stats, fingerprint, histograms, histogram_positions)


def collect_sharded(model: Any, path: Any, source: DataSource, execution: Execution,
                    tensors: str | Iterable[str] = "quantizable", histograms: bool = True,
                    histogram_positions: int | None = DEFAULT_HISTOGRAM_POSITIONS, preprocess: Any = None,
                    cast: bool = False) -> Statistics:
    """`collect` on the workers of `execution` for a DataSource already loaded (and checked) from `path`."""
    from .model import as_artifact

    artifact = as_artifact(model)
    names = tensors_to_observe(artifact.model, tensors)
    stats, fingerprint = _collect_sharded(artifact, path, source, names, execution, histograms,
                                          histogram_positions, preprocess, cast)
    return _statistics(artifact, source, stats, fingerprint, histograms, histogram_positions)


def _statistics(artifact: Any, source: DataSource, stats: dict[str, TensorStats], fingerprint: DataFingerprint,
                histograms: bool, histogram_positions: int | None) -> Statistics:
    onnx_model = artifact.model
    for name in list(stats):
        if stats[name].count == 0:  # e.g. non-float outputs after all
            del stats[name]
    for name, item in stats.items():
        if item.nonfinite:
            raise DataError(f"tensor '{name}' produced {item.nonfinite} NaN/Inf value(s) on the calibration data")
    model_info = {"sha256": model_fingerprint(onnx_model), "name": artifact.source.name if artifact.source else None}
    data_info = {"sha256": fingerprint.hexdigest(), "samples": fingerprint.num_samples, "source": source.description,
                 "histogram_positions_per_sample": histogram_positions}  # key kept: scales bytes are pinned
    return Statistics(stats, fingerprint.num_samples, model_info, data_info, tensor_names(onnx_model), histograms)


def _observe(artifact: Any, source: DataSource, names: list[str], threads: int, progress: bool, histograms: bool,
             histogram_positions: int | None, shard: bool = False, overlap: bool = True,
             ) -> tuple[dict[str, TensorStats], DataFingerprint]:
    """The pass itself: statistics of `names` over `source` (not yet checked for emptiness or NaN).

    shard: `source` is a shard starting after sample 0 (`DataShard`): runs are then cut as the whole pass cuts
    them (the first run of one sample, which sizes the runs, is made and its statistics dropped), so every
    sample runs in the same company as in one pass and onnxruntime returns the same values for it.
    overlap: reduce one run while onnxruntime computes the next (a second thread); False: one after the
    other in this thread (an engine's task of one CPU uses one CPU). The statistics are the same.
    """
    from .data import DataFingerprint, batch_len
    from .runtime import session

    outputs = {o.name for o in artifact.model.graph.output}
    extra = [n for n in names if n not in outputs]
    sess = session(artifact, threads=threads, extra_outputs=extra)
    available = {o.name for o in sess.get_outputs()} | {i.name for i in sess.get_inputs()}
    fetch = [n for n in names if n in available and n not in source.input_names]
    observed_inputs = [n for n in names if n in source.input_names]
    stats = {name: TensorStats(name) for name in names if name in available}
    fingerprint = DataFingerprint(source.input_names)

    def reduce(feeds: dict[str, np.ndarray], results: list[np.ndarray]) -> None:
        for name in observed_inputs:
            stats[name].update(feeds[name], histograms, histogram_positions)
        for name, value in zip(fetch, results, strict=True):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                stats[name].update(value, histograms, histogram_positions)

    batches: Iterator[dict[str, np.ndarray]] = source.batches()
    if progress:
        batches = _track_samples(batches, source.num_samples)
    # A dynamic-batch model runs in slices of each batch sized so one run's observed activations stay near
    # RUN_BYTES (measured on a first run of one sample): two runs are in flight (one reduced while onnxruntime
    # computes the next), so peak memory is bounded whatever the batch size or the number of samples.
    per_run: int | None = None if _dynamic_batch(sess) else 0
    quiet = _quiet_run_options()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtkit-calib") as pool:
        pending = None
        for feeds in batches:
            fingerprint.update(feeds)
            total, start = batch_len(feeds), 0
            while start < total:
                size = total - start if per_run == 0 else min(per_run or 1, total - start)
                part = feeds if size == total else {name: value[start:start + size] for name, value in feeds.items()}
                start += size
                if start == total and size < total:  # the batch's last run reads a copy: the batch can be freed
                    part = {name: value.copy() for name, value in part.items()}  # before the next one is read
                # the first run may fail by design (see below): onnxruntime must not log it as an error
                run = (pool.submit if overlap else _now)
                future = run(sess.run, fetch, part, quiet if per_run is None else None) if fetch else _done([])
                if pending is not None:
                    reduce(*_result(pending))
                pending = (part, future)
                if per_run is None:
                    try:
                        part, results = _result(pending)
                    except DataError:  # a free batch axis in name only (e.g. a Reshape to a fixed batch)
                        per_run, start, pending = 0, 0, None  # whole batches from now on
                        continue
                    pending = None
                    observed = sum(getattr(value, "nbytes", 0) for value in results) or 1
                    per_run = _divisor_at_most(source.batch_size, RUN_BYTES // observed)
                    if shard:  # the sizing run only: this batch runs again, cut as the whole pass cuts it
                        start = 0
                        continue
                    reduce(part, results)
            del feeds, part  # (a batch in flight is referenced by its run only: one batch in memory at a time)
        if pending is not None:
            reduce(*_result(pending))
    return stats, fingerprint


@dataclass(frozen=True)
class _ShardJob:
    """What one worker collects: the tensors `names` over `shard` (a data file's sample range)."""

    shard: DataShard
    names: tuple[str, ...]
    histograms: bool
    histogram_positions: int | None


def _collect_shard(model: bytes | str, job: _ShardJob) -> dict[str, TensorStats]:
    """On a worker: the statistics of one shard (one onnxruntime thread, and each run reduced in the same thread
    before the next: the engine gives each call one CPU, and a second busy thread would take another's).
    Errors name the shard's file and sample range."""
    from .errors import TrtkitError
    from .model import ModelArtifact, as_artifact

    try:
        if isinstance(model, bytes):
            import onnx

            artifact = ModelArtifact.from_model(onnx.load_from_string(model))
        else:
            artifact = as_artifact(model)
        source = job.shard.load(artifact.model)
        stats, _ = _observe(artifact, source, list(job.names), 1, False, job.histograms, job.histogram_positions,
                            shard=job.shard.start > 0, overlap=False)
    except TrtkitError as exc:
        message, path = first_line(exc), job.shard.path
        where = f"{job.shard}{message[len(path):]}" if message.startswith(f"{path}:") else f"{job.shard}: {message}"
        raise type(exc)(where) from None
    return stats


def _collect_sharded(artifact: Any, path: Any, source: DataSource, names: list[str], execution: Execution,
                     histograms: bool, histogram_positions: int | None, preprocess: Any, cast: bool,
                     ) -> tuple[dict[str, TensorStats], DataFingerprint]:
    """Statistics merged over shards run by `execution`, in shard order, and the data's fingerprint (computed
    here, reading the data once while the workers run: SHA-256 does not merge)."""
    from .data import DataFingerprint, shard_data

    shards = shard_data(path, source, execution.slots(), preprocess, cast)
    shared: bytes | str = (str(artifact.source) if artifact.has_external_data() and artifact.source
                           else artifact.model.SerializeToString())
    jobs = [_ShardJob(shard, tuple(names), histograms, histogram_positions) for shard in shards]

    def fingerprint_pass() -> DataFingerprint:
        fingerprint = DataFingerprint(source.input_names)
        for feeds in source.batches():  # also the data checks and constant-sample warnings of a whole pass
            fingerprint.update(feeds)
        return fingerprint

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtkit-fingerprint") as pool:
        hashing = pool.submit(fingerprint_pass)
        parts = execution.map(_collect_shard, shared, jobs)
        fingerprint = hashing.result()
    merged = {name: functools.reduce(TensorStats.merge, (part[name] for part in parts)) for name in parts[0]}
    return merged, fingerprint


def _track_samples(batches: Iterator[dict[str, np.ndarray]], total: int | None) -> Iterator[dict[str, np.ndarray]]:
    """A progress bar counting samples (not batches) with their rate; silent when stderr is not a terminal."""
    import sys

    if not sys.stderr.isatty():
        yield from batches
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from .ui import console

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:7.1f} samples/s" if task.speed else "")

    columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("calibrating", total=total)
        for feeds in batches:
            yield feeds
            samples = len(next(iter(feeds.values())))
            del feeds  # not held while the next batch is read
            bar.advance(task, samples)


def _quiet_run_options() -> Any:
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only
    return options


def _divisor_at_most(batch: int, limit: int) -> int:
    """The largest divisor of `batch` that is <= limit (at least 1): every run of a full batch has one shape,
    which keeps onnxruntime's memory arena from growing with new shapes."""
    return max((d for d in range(1, batch + 1) if batch % d == 0 and d <= limit), default=1)


def _dynamic_batch(sess: Any) -> bool:
    """Whether every input's first axis is free (the model can run any number of samples at once)."""
    inputs = sess.get_inputs()
    return bool(inputs) and all(i.shape and not isinstance(i.shape[0], int) for i in inputs)


def _done(value: Any) -> Any:
    from concurrent.futures import Future

    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _now(function: Any, *args: Any) -> Any:
    """function(*args) run here, as a finished Future (its exception raised by .result(), as a pool's)."""
    from concurrent.futures import Future

    future: Future[Any] = Future()
    try:
        future.set_result(function(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _result(pending: tuple[dict[str, np.ndarray], Any]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    feeds, future = pending
    try:
        return feeds, future.result()
    except Exception as exc:
        raise DataError(f"onnxruntime failed on the calibration data: {first_line(exc)}") from None


def calibrate(
    model: Any,
    data: Any,
    method: str | Calibrator | None = None,
    overrides: Any = None,
    options: Mapping[str, Any] | None = None,
    tensors: str | Iterable[str] = "quantizable",
    batch_size: int = 32,
    limit: int | None = None,
    preprocess: Any = None,
    threads: int | None = None,
    progress: bool = True,
    output: str | os.PathLike[str] | None = None,
    histogram_positions: int | None | str = "auto",
) -> Scales:
    """Collect statistics over `data` and compute per-tensor ranges with `method` (a calibrator plugin; None:
    the default calibrator).

    model: path, ModelArtifact or ModelProto (FP32). data: anything `trtkit.data.load_data` accepts.
    overrides: tensor -> amax mapping, or a JSON/YAML file of tensor -> amax / {"amax"| "scale": v}, or a
    TensorRT calibration cache; pinned tensors keep these values. output: also save the scales JSON there.
    histogram_positions: per sample per tensor (None: every value; min/max are always exact); "auto": every
    value for calibrators declaring statistics="exact-histogram", else DEFAULT_HISTOGRAM_POSITIONS.
    """
    settings = CalibrationSettings.create(
        method=method, options=options, histogram_positions=histogram_positions, tensors=tensors,
        batch_size=batch_size, limit=limit, preprocess=preprocess, overrides=overrides)
    return settings.calibrate(model, data, threads=threads, progress=progress, output=output)


# ---- settings: built once from API arguments, CLI flags or a recipe section ----------------------------------

@dataclass(frozen=True, kw_only=True)
class CalibrationSettings:
    """How to calibrate, resolved and validated once: the calibrator object with its resolved options, what
    to collect and from how much data, the tensors pinned by custom scales.

    Build it with `create` (Python API conventions), `from_flags` (the CLI's) or `from_recipe` (a recipe's
    [calibration] section); errors name the knob as the user wrote it.
    """

    calibrator: Calibrator
    options: Mapping[str, Any]               # the calibrator's options, defaults filled
    histogram_positions: int | None          # per sample per tensor; None: every value
    tensors: str | tuple[str, ...] = "quantizable"
    batch_size: int = 32
    limit: int | None = None
    preprocess: Mapping[str, Any] | None = None
    overrides: Any = None                    # custom scales (a mapping, or a file already checked readable)

    @property
    def histograms(self) -> bool:
        """Whether the calibrator needs histograms (statistics other than "range")."""
        return self.calibrator.statistics != "range"

    @classmethod
    def create(cls, *, method: str | Calibrator | None = None, options: Mapping[str, Any] | None = None,
               histogram_positions: int | None | str = "auto", tensors: str | Iterable[str] = "quantizable",
               batch_size: int = 32, limit: int | None = None, preprocess: Mapping[str, Any] | None = None,
               overrides: Any = None, knob: str = "histogram positions", zero_is_every_value: bool = False,
               where: str | None = None) -> CalibrationSettings:
        """Resolve and validate. method: a calibrator name, object or None (the default calibrator).
        histogram_positions: "auto", None (every value) or an int >= 1; front ends that cannot say None (a CLI
        flag, a recipe key) pass zero_is_every_value=True. knob: how errors name the histogram knob; where:
        what errors about the calibrator's options start with (e.g. the recipe section)."""
        calibrator = find_calibrator(method)  # unknown names fail before any work
        resolved = calibrator.resolve_options(options, where=f"{where} method '{calibrator.name}'" if where else None)
        positions = _resolve_positions(histogram_positions, calibrator, knob, zero_is_every_value)
        if overrides is not None and not isinstance(overrides, Mapping):
            read_scales_file(overrides)  # bad files fail before any work
        return cls(calibrator=calibrator, options=resolved, histogram_positions=positions,
                   tensors=tensors if isinstance(tensors, str) else tuple(tensors), batch_size=batch_size,
                   limit=limit, preprocess=preprocess, overrides=overrides)

    @classmethod
    def from_flags(cls, *, method: str | None, options: Mapping[str, Any] | None, histogram_positions: int | None,
                   **rest: Any) -> CalibrationSettings:
        """From `trtkit calibrate` flags: --histogram-positions None is "auto", 0 is every value."""
        return cls.create(method=method, options=options,
                          histogram_positions="auto" if histogram_positions is None else histogram_positions,
                          knob="--histogram-positions", zero_is_every_value=True, **rest)

    @classmethod
    def from_recipe(cls, section: Mapping[str, Any], where: str) -> CalibrationSettings:
        """From a recipe's [calibration] section (`where` names it, e.g. "recipe.toml [calibration]"); its
        histogram_positions follows the CLI flag (0: every value)."""
        positions = section.get("histogram_positions")
        given = {key: section[key] for key in ("batch_size", "limit") if section.get(key) is not None}
        return cls.create(method=section.get("method"), options=section.get("options") or {},
                          histogram_positions="auto" if positions is None else positions,
                          overrides=section.get("overrides"), knob=f"{where} histogram_positions",
                          zero_is_every_value=True, where=where, **given)

    def collect(self, model: Any, data: Any, threads: int | None = None, progress: bool = True) -> Statistics:
        """One pass over `data` gathering what the calibrator needs (see `collect`)."""
        return collect(model, data, tensors=self.tensors, batch_size=self.batch_size, limit=self.limit,
                       preprocess=self.preprocess, threads=threads, progress=progress, histograms=self.histograms,
                       histogram_positions=self.histogram_positions)

    def collect_on(self, execution: Execution, model: Any, path: Any, source: DataSource | None = None,
                   cast: bool = False) -> Statistics:
        """`collect` on the workers of `execution`: shards of the data file or folder `path` (`source`: the
        DataSource already loaded from it, else loaded here); the same Statistics as in-process."""
        from .data import load_data
        from .model import as_artifact

        artifact = as_artifact(model)
        if source is None:
            source = load_data(path, artifact.model, batch_size=self.batch_size, limit=self.limit,
                               preprocess=self.preprocess, cast=cast)
        return collect_sharded(artifact, path, source, execution, tensors=self.tensors, histograms=self.histograms,
                               histogram_positions=self.histogram_positions, preprocess=self.preprocess, cast=cast)

    def scales(self, stats: Statistics) -> Scales:
        """Scales from `stats` with this calibrator, its options and the overrides."""
        return stats._scales(self.calibrator, self.options, self.overrides)

    def calibrate(self, model: Any, data: Any, threads: int | None = None, progress: bool = True,
                  output: str | os.PathLike[str] | None = None) -> Scales:
        """collect + scales; also saves the scales JSON to `output` when given."""
        scales = self.scales(self.collect(model, data, threads=threads, progress=progress))
        if output is not None:
            scales.save(output)
        return scales


def _resolve_positions(value: Any, calibrator: Calibrator, knob: str, zero_is_every_value: bool) -> int | None:
    """Histogram positions per sample: "auto" -> None (every value) when the calibrator declares
    statistics="exact-histogram", else DEFAULT_HISTOGRAM_POSITIONS; None: every value; else an int >= 1."""
    if isinstance(value, str) and value == "auto":
        return None if calibrator.statistics == "exact-histogram" else DEFAULT_HISTOGRAM_POSITIONS
    if value is None or (zero_is_every_value and value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        rule = ">= 0 (0: every value)" if zero_is_every_value else "an integer >= 1 or None (every value)"
        raise OptionError(f"{knob} must be {rule}, got {value!r}")
    return value
