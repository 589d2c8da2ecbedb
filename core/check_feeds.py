"""Inputs the numerical check of `trtkit optimize` can run a model on.

Random values in [-1, 1] with every symbolic dim 1 run most models, but not all: an int64 sample-rate scalar
that an `If` compares with 16000, an audio input a subgraph reshapes into frames of 64, a state tensor whose
batch dim must match. `find_feeds` tries a short, fixed list of candidates built from the model itself
(the integer constants its comparisons and shape ops use, in the main graph and in subgraphs) and keeps the
first feeds the model runs on; the user's own arrays (`--check-data file.npz`) come first when given.

    plan, outputs, error = find_feeds(artifact, run, ranges=..., dims=..., seed=0, given=arrays)
    feeds = plan.feeds(other_artifact)   # the same choices, for a rewritten model (its own static shapes)

numpy, onnx and onnxruntime are imported inside the functions (the module loads when a check runs).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, InputFileError, TrtkitError, first_line

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .model import ModelArtifact

# At most this many candidate feeds are tried on the input model before the check gives up (each failed
# attempt is one onnxruntime run that stops at the first failing node).
MAX_ATTEMPTS = 48
# Integer constants larger than this are not tried as dimension sizes (a 65536-sample frame is already big).
MAX_DIM = 4096
COMPARISONS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")


@dataclass
class FeedPlan:
    """How check feeds are made: sizes of symbolic dims, fixed values per input, random ranges and seed.

    values: an input's array as given by the user (used as is), or a scalar hint (broadcast to the
    input's shape, e.g. the sample rate an `If` compares with).
    """

    dims: dict[str, int] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    seed: int = 0
    given: frozenset[str] = frozenset()  # inputs whose arrays came from the user

    def feeds(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        import numpy as np

        from .runtime import random_inputs

        feeds = random_inputs(model, seed=self.seed, dims=self.dims, ranges=self.ranges)
        for name, value in self.values.items():
            if name not in feeds:
                continue
            if name in self.given:
                feeds[name] = value.astype(feeds[name].dtype, copy=False)
            else:
                feeds[name] = np.full(feeds[name].shape, value, dtype=feeds[name].dtype)
        return feeds

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.dims.items())]
        parts += [f"{k}={v.item()}" for k, v in sorted(self.values.items()) if k not in self.given]
        return ", ".join(parts)


def load_check_data(path: str | os.PathLike[str], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The user's check inputs: a .npz whose keys are input names (one run's arrays, batch included), or a
    .npy for a single-input model. Names and dtypes are checked (integer data for a float input is refused,
    as everywhere trtkit reads data: core/data.py)."""
    import numpy as np

    from .data import check_dtype
    from .errors import unknown_name
    from .runtime import input_specs

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file (--check-data)")
    specs = {spec.name: spec for spec in input_specs(model)}
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: np.asarray(archive[key]) for key in archive.files}
        elif path.suffix == ".npy":
            if len(specs) != 1:
                raise DataError(f"{path}: a .npy holds one input, the model has {len(specs)} "
                                f"({', '.join(specs)}); use a .npz keyed by input name")
            arrays = {next(iter(specs)): np.load(path, allow_pickle=False)}
        else:
            raise DataError(f"{path}: check data must be a .npz (keys = input names) or a .npy")
    except TrtkitError:
        raise
    except Exception as exc:
        raise InputFileError(f"{path}: cannot read it: {first_line(exc)}") from None
    for name, array in arrays.items():
        if name not in specs:
            raise unknown_name(f"input (in {path})", name, list(specs))
        check_dtype(array, specs[name].dtype, f"{path}: input '{name}'", cast=None)
        if array.ndim != len(specs[name].shape):
            raise DataError(f"{path}: input '{name}' has rank {array.ndim}, the model expects "
                            f"{len(specs[name].shape)} ({list(specs[name].shape)})")
    return arrays


def _int_constants(graph: onnx.GraphProto) -> Iterator[tuple[str, list[int]]]:
    """(consuming op type, integer values) of the small integer constants a graph and its subgraphs use."""
    import numpy as np
    from onnx import numpy_helper

    values: dict[str, Any] = {}
    for tensor in graph.initializer:
        if tensor.data_type in (6, 7) and math.prod(tensor.dims) <= 8:
            values[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in (6, 7) and math.prod(attr.t.dims) <= 8:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.asarray(attr.i if attr.name == "value_int" else list(attr.ints))
    for node in graph.node:
        for name in node.input:
            if name in values:
                yield node.op_type, [int(v) for v in np.asarray(values[name]).reshape(-1)]
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == attr.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                yield from _int_constants(sub)


def _hints(model: onnx.ModelProto) -> tuple[list[int], list[int]]:
    """(values integer scalars are compared with, candidate sizes of symbolic dims), from the graph."""
    compared: list[int] = []
    sizes: list[int] = []
    for op, values in _int_constants(model.graph):
        if op in COMPARISONS:
            compared += values
        sizes += [v for v in values if 1 < v <= MAX_DIM]
    compared = list(dict.fromkeys(compared))
    sizes = sorted(set(sizes))
    if len(sizes) > 1:  # a size several reshapes accept at once
        common = math.lcm(*sizes[-3:])
        if common <= MAX_DIM and common not in sizes:
            sizes.append(common)
    return compared, sizes


def _candidates(model: onnx.ModelProto, base: FeedPlan) -> Iterator[FeedPlan]:
    """Plans to try, the plain one first: scalar hints for small integer inputs, then dim sizes."""
    from .runtime import input_specs

    specs = input_specs(model)
    symbolic = sorted({d for spec in specs for d in spec.shape if isinstance(d, str) and d not in base.dims})
    small_ints = [spec.name for spec in specs if spec.name not in base.values
                  and spec.dtype.startswith(("int", "uint")) and math.prod(spec.concrete_shape(base.dims)) <= 1]
    compared, sizes = _hints(model)
    value_choices: list[dict[str, Any]] = [{}]
    if small_ints:
        value_choices += [dict.fromkeys(small_ints, value) for value in compared if value >= 0]
    dim_choices: list[dict[str, int]] = [{}]
    for size in sizes:
        dim_choices += [{name: size} for name in symbolic]
        if len(symbolic) > 1:
            dim_choices.append(dict.fromkeys(symbolic, size))
    for values, dims in itertools.product(value_choices, dim_choices):
        import numpy as np

        yield FeedPlan(dims={**base.dims, **dims},
                       values={**base.values, **{k: np.asarray(v) for k, v in values.items()}},
                       ranges=base.ranges, seed=base.seed, given=base.given)


def find_feeds(artifact: ModelArtifact, run: Callable[[ModelArtifact, dict[str, np.ndarray]], dict[str, np.ndarray]],
               ranges: Mapping[str, tuple[float, float]] | None = None, dims: Mapping[str, int] | None = None,
               seed: int = 0, given: Mapping[str, np.ndarray] | None = None,
               ) -> tuple[FeedPlan | None, dict[str, np.ndarray] | None, str]:
    """The first plan whose feeds `artifact` runs on: (plan, its outputs, "") or (None, None, first error).

    given: the user's arrays (input name -> array); they fix the symbolic dims they cover.
    """
    from .runtime import input_specs

    given = dict(given or {})
    dims = dict(dims or {})
    for spec in input_specs(artifact.model):
        if spec.name in given:
            for dim, size in zip(spec.shape, given[spec.name].shape, strict=False):
                if isinstance(dim, str):
                    dims.setdefault(dim, int(size))
    base = FeedPlan(dims=dims, values=given, ranges={k: (float(v[0]), float(v[1])) for k, v in (ranges or {}).items()},
                    seed=seed, given=frozenset(given))
    first_error = ""
    for plan in itertools.islice(_candidates(artifact.model, base), MAX_ATTEMPTS):
        try:
            feeds = plan.feeds(artifact.model)
            return plan, run(artifact, feeds), ""
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next candidate
            first_error = first_error or first_line(exc)
    return None, None, first_error


def probe(artifact: ModelArtifact) -> Callable[[ModelArtifact, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A runner for find_feeds: one onnxruntime session (no graph optimizations) made now (a model onnxruntime
    cannot load is an error here), run quietly (failing candidates are expected, not logged)."""
    import onnxruntime as ort

    from .runtime import session

    sess = session(artifact, optimization="disable")
    names = [o.name for o in sess.get_outputs()]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4

    def run(_: ModelArtifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feeds, quiet), strict=True))

    return run


def runnable_feeds(artifact: ModelArtifact, seed: int = 0, value_range: tuple[float, float] = (-1.0, 1.0),
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Feeds `artifact` runs on (float inputs uniform in `value_range`) and its outputs; a pass that proves
    its own relation uses these. Raises TrtkitError naming the first failure when no candidate runs."""
    from .runtime import input_specs

    ranges = {spec.name: value_range for spec in input_specs(artifact.model)}
    plan, outputs, error = find_feeds(artifact, probe(artifact), ranges=ranges, seed=seed)
    if plan is None or outputs is None:
        raise TrtkitError(f"the model does not run on any generated inputs ({error})")
    return plan.feeds(artifact.model), outputs
