"""`eval layers` on an execution engine: the mixed-precision search scores its next steps on the workers
together (speculatively, a round per batch of slots) and reports exactly what the one-at-a-time search reports.

The engine is a third party's, of real worker processes (concurrent.futures), so no Ray is needed; the Ray engine
itself runs the same evaluator in tests/test_ray.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from eval_helpers import mlp_fp32, mlp_inputs, quantize_max
from process_engine import MAPS, process_engine_registry

import trtkit
from trtkit.engine import Execution
from trtkit.evaluation import to_json
from trtkit.registry import set_registry


@pytest.fixture(scope="module")
def engine():
    registry = process_engine_registry()
    set_registry(registry)
    yield registry.get("engines", "processes")
    set_registry(None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layers_engine")
    fp32 = mlp_fp32(folder / "mlp.onnx")
    x = mlp_inputs(40)
    np.save(folder / "x.npy", x)
    return str(fp32), str(quantize_max(fp32, folder / "mlp.int8.onnx", {"x": x})), str(folder / "x.npy")


def test_search_on_workers_reports_what_the_serial_search_reports(engine, pair, monkeypatch):
    import trtkit.plugins.evaluators.layers as layers

    fp32, qdq, data = pair
    def search(target, **options):
        return trtkit.evaluate("layers", [fp32, qdq], data=data, batch_size=8, target_sqnr=target, **options)

    # targets from the SQNR with the worst layer in float up to the SQNR with every layer in float: searches that
    # keep 1, 2, ... layers in float, and one that fails
    one, every = search(10.0, sensitivity="none"), search(1000.0, sensitivity="none")
    low, high = one.data["search"]["sqnr_db"], every.data["search"]["sqnr_db"]
    targets = [low - 1.0, low + 0.2 * (high - low), low + 0.6 * (high - low), high - 1e-3, 1000.0]
    modes = ("none", "single", "leave-one-out")
    serial = [search(t, sensitivity=mode) for mode in modes for t in targets]
    assert {len(r.data["exclude"]) for r in serial if r.data["search"]["met"]} >= {1, 2, 3}
    # some search dropped a layer it had added (the kept layers are not the first ones of its order)
    assert any(r.data["exclude"] != r.data["offenders"][:len(r.data["exclude"])] for r in serial)
    assert any(not r.data["search"]["met"] for r in serial)

    for workers in (2, 3):
        monkeypatch.setattr(layers, "execution", lambda w, a, d, n=workers: Execution(engine, workers=n))
        MAPS.clear()
        parallel = [search(t, sensitivity=mode, workers=workers) for mode in modes for t in targets]
        for here, there in zip(serial, parallel, strict=True):
            assert to_json(here.data) == to_json(there.data)
            assert (here.summary, here.passed) == (there.summary, there.passed)
        assert MAPS and max(MAPS) > 1  # the search's rounds really ran on several workers


def test_search_rounds_give_the_one_at_a_time_result_whatever_the_width():
    from trtkit.plugins.evaluators.layers import _search

    rng = np.random.default_rng(0)
    for case in range(300):
        layers = [f"n{i}" for i in range(int(rng.integers(0, 8)))]
        gains = dict(zip(layers, rng.exponential(3.0, len(layers)), strict=True))
        clash = rng.normal(0.0, 1.5)  # layers in float together may also cost (not additive: drops can succeed)

        def score(in_float, gains=gains, clash=clash):
            return 10.0 + sum(gains[n] for n in in_float) + clash * (len(in_float) > 2), 0.9

        target = 10.0 + float(rng.uniform(0.0, sum(gains.values()) + 2.0))
        calls: list[int] = []

        def score_all(variants, score=score, calls=calls):
            calls.append(len(variants))
            return [score(v) for v in variants]

        one = _search(layers, score_all, 1, target, None)
        assert set(calls) <= {1}
        for width in (2, 3, 5):
            assert _search(layers, score_all, width, target, None) == one, (case, width)
