"""Built-in pruning criteria: l1, l2, bn-scale and taylor (structured pruning, `trtkit.pruning`).

Registered through `register_pruning_criteria`, exactly as a third-party criterion is
(plugins_contrib/trtkit-prune-fpgm/ is one). Each gets one parameter of a group of coupled channels,
channel-first as [channels, k], and returns one score per channel; torch is imported by the caller only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trtkit import hookimpl
from trtkit.stages import Option, PruningCriterion


def l1(weight: Any, kind: str, grad: Any = None) -> Any:
    """Sum of |w| of each channel."""
    return weight.abs().sum(1)


def l2(weight: Any, kind: str, grad: Any = None) -> Any:
    """Euclidean norm of each channel."""
    return weight.pow(2).sum(1).sqrt()


def bn_scale(weight: Any, kind: str, grad: Any = None) -> Any:
    """|gamma| of the BatchNorm after the channel (network slimming): small scales contribute little."""
    return weight.abs().reshape(-1)


def taylor(weight: Any, kind: str, grad: Any = None, order: int = 1) -> Any:
    """|sum of w * dL/dw| of each channel: the first-order change of the loss when the channel is removed
    (Molchanov et al.); order=2 adds the diagonal-Fisher term (w * g)^2 / 2."""
    product = weight * grad
    score = product.sum(1).abs()
    if order == 2:
        score = score + 0.5 * product.pow(2).sum(1)
    return score


CRITERIA = (
    PruningCriterion(name="l1", description="L1 norm of each channel's weights (magnitude)", score=l1,
                     default=True),
    PruningCriterion(name="l2", description="L2 norm of each channel's weights (magnitude)", score=l2),
    PruningCriterion(name="bn-scale", description="|BatchNorm scale| of each channel (network slimming)",
                     score=bn_scale, kinds=("norm",)),
    PruningCriterion(name="taylor", description="first-order Taylor |w * grad| on the calibration data "
                     "(label-free: the model's own top-1)", score=taylor, needs_data=True,
                     options={"order": Option("int", 1, "1: |sum w*g|; 2: adds (w*g)^2/2", choices=(1, 2))}),
)


@hookimpl
def register_pruning_criteria(register: Callable[[PruningCriterion], None]) -> None:
    for criterion in CRITERIA:
        register(criterion)
