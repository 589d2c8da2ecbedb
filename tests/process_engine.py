"""A third party's execution engine for tests: worker processes of concurrent.futures (what an engine plugin
looks like), registered as "processes". `MAPS` records how many items each `map` call got."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from trtkit import hookimpl
from trtkit.registry import Registry, load_plugins
from trtkit.stages import Engine

MAPS: list[int] = []


def _pool_map(work, shared, items, workers=None, address=None):
    MAPS.append(len(items))
    with ProcessPoolExecutor(max_workers=workers or 2) as pool:
        return list(pool.map(work, [shared] * len(items), items))


class ProcessEngine:
    @hookimpl
    def register_engines(self, register):
        register(Engine(name="processes", description="worker processes of this machine", map=_pool_map,
                        slots=lambda workers, address: workers or 2))


def process_engine_registry() -> Registry:
    """The installed plugins plus the process engine."""
    return load_plugins(extra_modules=[ProcessEngine()])
