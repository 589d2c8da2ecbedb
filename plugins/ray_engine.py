"""The Ray execution engine: `--workers N` / `--ray-address ADDR`, a recipe's `[execution]` (docs/scale.md).

Each call is a Ray task of one CPU (`ray.remote(num_cpus=1, max_retries=RETRIES)`): a task whose worker
process dies is run again by Ray; a task that raises is not (bad data stays bad) and its exception, with
its trtkit class and message, is raised here. The shared value (the model's bytes) is put in Ray's object
store once and every task receives it from there. Results come back in item order.

Ray is optional (`pip install 'trtkit[ray]'`) and imported only when a call is made: this module is loaded
at start-up, so it imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from trtkit import hookimpl
from trtkit.stages import Engine

RETRIES = 3  # runs of a task whose worker process died, after the first (Ray's max_retries)
INSTALL = "pip install 'trtkit[ray]'"


def _available() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return f"several workers need Ray, which is not installed: {INSTALL}"
    return None


def _connect(workers: int | None, address: str | None) -> Any:
    """Ray, initialised: connected to `address`, or a local cluster of `workers` CPUs (this machine's CPUs
    when None). A Ray already initialised in this process (e.g. by the caller) is used as it is."""
    import ray

    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=workers, **options)
    return ray


def _slots(workers: int | None, address: str | None) -> int:
    ray = _connect(workers, address)
    if workers is not None:
        return workers
    return int(ray.cluster_resources().get("CPU", 1))


def _call(work: Callable[[Any, Any], Any], shared: Any, item: Any) -> Any:
    return work(shared, item)


def _map(work: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any], workers: int | None = None,
         address: str | None = None) -> list[Any]:
    ray = _connect(workers, address)
    shared_ref = ray.put(shared)  # once: every task reads it from the object store
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(_call)
    refs = [task.remote(work, shared_ref, item) for item in items]
    index = {ref: position for position, ref in enumerate(refs)}
    pending = list(refs)
    done: list[Any] = []
    try:
        while pending:  # as they finish: the first failure is reported at once, not after every earlier item
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
    except ray.exceptions.RayTaskError as exc:
        _cancel(ray, pending)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:  # e.g. a worker that died RETRIES + 1 times
        _cancel(ray, pending)
        from trtkit.errors import TrtkitError, first_line

        failed = items[index[done[0]]] if done else "a task"
        raise TrtkitError(f"Ray could not run {failed}: {first_line(exc)}") from None
    return list(ray.get(refs))


def _cancel(ray: Any, refs: list[Any]) -> None:
    import contextlib

    for ref in refs:
        with contextlib.suppress(Exception):  # already finished or gone: nothing to cancel
            ray.cancel(ref, force=True)


@hookimpl
def register_engines(register: Callable[[Engine], None]) -> None:
    register(Engine(
        name="ray",
        description=f"Ray tasks on this machine or a cluster (--workers N, --ray-address ADDR; {INSTALL})",
        map=_map, slots=_slots, available=_available, default=True))
