"""A third-party pruning criterion for trtkit: FPGM (He et al., "Filter Pruning via Geometric Median", 2019).

A filter close to the geometric median of its layer's filters is the most replaceable by the others, so
it scores low: score = the sum of its Euclidean distances to every other filter of the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trtkit import hookimpl
from trtkit.stages import Option, PruningCriterion


def fpgm(weight: Any, kind: str, grad: Any = None, p: float = 2.0) -> Any:
    import torch

    rows = weight.reshape(weight.shape[0], -1).float()
    return torch.cdist(rows[None], rows[None], p=p)[0].sum(1)


@hookimpl
def register_pruning_criteria(register: Callable[[PruningCriterion], None]) -> None:
    register(PruningCriterion(
        name="fpgm", description="distance to the layer's other filters (geometric median: low = redundant)",
        score=fpgm, kinds=("conv", "linear"), options={"p": Option("float", 2.0, "norm of the distance")}))
