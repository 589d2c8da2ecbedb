"""Where the heavy loops run: in this process, or on the workers of an execution engine plugin (Ray).

    execution = Execution.create(workers=4)                  # the default engine; OptionError if not usable
    results = execution.map(work, shared, items)              # work(shared, item) per item, in item order

Engines are components (`trtkit.stages.Engine`, hook `register_engines`); the core never names one. With
one worker and no address nothing is looked up and nothing is imported: the loops run in-process as before.
The callers (calibration, `eval accuracy`, `eval layers`) split their work into items that are small
descriptions (a data file and a sample range, a set of layers), never arrays, so the data reach the workers
by path; `shared` (the model's bytes) goes to each worker once, through the engine's object store. Every
caller merges the results in item order, so what it computes is the same as in-process, byte for byte.

Nothing heavy is imported here: the CLI loads this module at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import OptionError

if TYPE_CHECKING:
    from .stages import Engine


@dataclass(frozen=True)
class Execution:
    """How to run: `engine` None is in-process; else the engine, its worker count and cluster address."""

    engine: Engine | None = None
    workers: int | None = None   # calls running at once (None: every CPU of the cluster at `address`)
    address: str | None = None   # the cluster to connect to (None: start one on this machine)

    @property
    def in_process(self) -> bool:
        return self.engine is None

    @classmethod
    def create(cls, *, engine: str | None = None, workers: int | None = None, address: str | None = None,
               where: str = "--workers") -> Execution:
        """Resolve and check: an unknown engine, a bad worker count or an engine that is not usable here
        (e.g. Ray not installed) is a one-line OptionError naming `where` (the flag or recipe section)."""
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise OptionError(f"{where}: workers must be an integer >= 1, got {workers!r}")
        if engine is None and (workers or 1) == 1 and not address:
            return cls()
        from .registry import get_registry

        registry = get_registry()
        component: Engine = (registry.get("engines", engine) if engine is not None  # type: ignore[assignment]
                             else registry.default("engines"))
        reason = component.available()
        if reason:
            raise OptionError(f"{where}: {reason}")
        return cls(component, workers, address or None)

    @classmethod
    def from_recipe(cls, section: Mapping[str, Any], where: str) -> Execution:
        """From a recipe's [execution] section: engine, workers, address."""
        return cls.create(engine=section.get("engine"), workers=section.get("workers"),
                          address=section.get("address"), where=where)

    def slots(self) -> int:
        """How many calls run at once (1 in-process); connects to (or starts) the engine's cluster."""
        if self.engine is None:
            return 1
        return max(1, int(self.engine.slots(self.workers, self.address)))

    def map(self, work: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> list[Any]:
        """work(shared, item) for every item, results in item order. `work` must be a module-level function
        (workers import it by name); a failing call raises its own exception."""
        if self.engine is None:
            return [work(shared, item) for item in items]
        return list(self.engine.map(work, shared, list(items), workers=self.workers, address=self.address))


def split(total: int, parts: int, step: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges covering [0, total) in at most `parts` contiguous pieces of nearly equal size,
    every boundary a multiple of `step` (a batch: each piece then runs the same batches as one pass would)."""
    blocks = -(-total // step)
    parts = max(1, min(parts, blocks))
    bounds = [min(total, (blocks * i // parts) * step) for i in range(parts + 1)]
    bounds[-1] = total
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]
