"""Evaluators on an execution engine's workers (`trtkit.engine`, e.g. Ray): the same outputs as in-process.

accuracy: the evaluation data is cut into shards (file + sample range, on batch boundaries); each worker runs
the reference and every candidate on its shard and returns their outputs; the driver concatenates them in
shard order, which gives exactly the arrays `run_batches(runner, load_batches(...))` gives, so every metric
and gate is computed from the same numbers.
layers: the sensitivity sweep's variants (which layers are kept in float) are split between the workers;
each reads the whole evaluation data by path, builds its variants from the candidate (sent once through
the engine's object store) and returns the judged output of each.

ONNX models travel as bytes (once); other artefacts (engines) are opened by path on the workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtkit.data import DataShard, DataSource, load_data, shard_data
from trtkit.engine import Execution, split
from trtkit.errors import OptionError
from trtkit.evaluation import model_input_specs, open_model, run_batches


def execution(workers: int, address: str | None, data: str | None) -> Execution:
    """The evaluator options `workers` / `address` resolved; workers read the data by path, so they need it."""
    run_on = Execution.create(workers=workers if workers != 1 else None, address=address,
                              where="option 'address'" if address and workers == 1 else "option 'workers'")
    if not run_on.in_process and data is None:
        raise OptionError("option 'workers': workers read the evaluation data by path; give --data "
                          "(random inputs are made in-process only)")
    return run_on


@dataclass(frozen=True)
class _Model:
    path: str
    onnx: bytes | None  # the model itself for ONNX files; None: opened by path on the worker
    emulate_qdq: bool


def _shipped(path: str, emulate_qdq: bool) -> _Model:
    from trtkit.model import ModelArtifact

    if str(path).endswith(".onnx"):
        artifact = ModelArtifact.load(path)
        if not artifact.has_external_data():
            return _Model(str(path), artifact.model.SerializeToString(), emulate_qdq)
    return _Model(str(path), None, emulate_qdq)


def _runner(model: _Model, onnx_model: Any = None) -> Any:
    """One onnxruntime thread per worker call (the engine gives each call one CPU)."""
    if onnx_model is None and model.onnx is None:
        return open_model(model.path, emulate_qdq=model.emulate_qdq, threads=1)
    import onnx

    from trtkit.model import ModelArtifact
    from trtkit.runners import OrtRunner

    proto = onnx_model if onnx_model is not None else onnx.load_from_string(model.onnx or b"")
    return OrtRunner(ModelArtifact.from_model(proto), emulate_qdq=model.emulate_qdq, threads=1)


def _batches(shard: DataShard, specs: Any) -> list[dict[str, np.ndarray]]:
    """The shard's batches, cut at its end (as trtkit.evaluation.load_batches cuts the data at num_samples)."""
    kept, count, wanted = [], 0, shard.stop - shard.start
    for batch in shard.load(specs).batches():
        size = len(next(iter(batch.values())))
        take = min(size, wanted - count)
        if take <= 0:
            break
        kept.append({k: np.asarray(v[:take]) for k, v in batch.items()})
        count += take
    return kept


def _source(data: str, reference: str, num_samples: int, batch_size: int) -> tuple[DataSource, Any]:
    specs = model_input_specs(reference)
    source = load_data(str(data), specs if specs is not None else reference, batch_size=max(1, batch_size),
                       limit=num_samples or None)
    return source, specs if specs is not None else reference


def _shard_outputs(models: Sequence[_Model], item: tuple[DataShard, Any]) -> list[dict[str, np.ndarray]]:
    shard, specs = item
    batches = _batches(shard, specs)
    return [run_batches(_runner(model), batches, "shard") for model in models]


def sharded_outputs(models: Sequence[tuple[str, bool]], data: str, num_samples: int, batch_size: int,
                    run_on: Execution) -> tuple[list[dict[str, np.ndarray]], int]:
    """The outputs of each (model path, emulate_qdq) over the evaluation data, run on the workers shard by
    shard and joined in order; and the number of samples."""
    source, specs = _source(data, models[0][0], num_samples, batch_size)
    shards = shard_data(data, source, run_on.slots(), what="option 'workers'")
    parts = run_on.map(_shard_outputs, [_shipped(path, emulate) for path, emulate in models],
                       [(shard, specs) for shard in shards])
    joined = [{name: np.concatenate([part[index][name] for part in parts], axis=0) if first.ndim else first
               for name, first in parts[0][index].items()} for index in range(len(models))]
    count = sum(shard.stop - shard.start for shard in shards)
    return joined, count


def variant_batches(item: tuple[DataShard, Any, list[tuple[str, ...]]]) -> list[dict[str, np.ndarray]]:
    """On a worker: the evaluation batches of a `sharded_variants` item."""
    return _batches(item[0], item[1])


def variant_runner(candidate: _Model, model: Any) -> Any:
    """On a worker: a runner for one variant (an onnx.ModelProto built from the candidate)."""
    return _runner(candidate, model)


def sharded_variants(work: Any, candidate: str, reference: str, judged: str, variants: list[tuple[str, ...]],
                     data: str, num_samples: int, batch_size: int, run_on: Execution) -> list[np.ndarray]:
    """The judged output of each variant (layers kept in float) over the evaluation data, the variants
    split between the workers; in the variants' order. work((candidate, judged), (shard, specs, variants)) ->
    [output per variant] runs on a worker (the evaluator's own module-level function: it builds variants)."""
    source, specs = _source(data, reference, num_samples, batch_size)
    whole = shard_data(data, source, 1, what="option 'workers'")[0]
    model = _shipped(candidate, True)
    if model.onnx is None:
        raise OptionError(f"{candidate}: workers need the candidate inline (ONNX without external data)")
    chunks = split(len(variants), run_on.slots())
    parts = run_on.map(work, (model, judged),
                       [(whole, specs, variants[start:stop]) for start, stop in chunks])
    return [output for part in parts for output in part]
