"""Every hook a trtkit plugin can implement. This file is the reference: docs/hooks.md mirrors it exactly.

Registration hooks receive a `register` callable and call it once per component they provide. Components
are the small dataclasses in `trtkit.stages`. A plugin implements only the hooks it needs:

    from trtkit import hookimpl
    from trtkit.stages import Calibrator

    @hookimpl
    def register_calibrators(register):
        register(Calibrator(name="max-abs", description="...", compute_amax=my_function))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from .stages import Builder, Calibrator, Engine, Evaluator, Exporter, GraphPass, PruningCriterion

hookspec = pluggy.HookspecMarker("trtkit")
hookimpl = pluggy.HookimplMarker("trtkit")


@hookspec
def register_exporters(register: Callable[[Exporter], None]) -> None:
    """Register exporters that turn a trained model (e.g. a torch.nn.Module) into ONNX."""


@hookspec
def register_passes(register: Callable[[GraphPass], None]) -> None:
    """Register graph passes that rewrite an ONNX model (simplify, optimize, fuse, ...)."""


@hookspec
def register_calibrators(register: Callable[[Calibrator], None]) -> None:
    """Register calibrators that compute activation ranges from collected statistics."""


@hookspec
def register_builders(register: Callable[[Builder], None]) -> None:
    """Register builders that turn ONNX into a runnable artefact (onnxruntime model, TensorRT engine, ...)."""


@hookspec
def register_evaluators(register: Callable[[Evaluator], None]) -> None:
    """Register evaluators that measure artefacts (accuracy, speed, per-layer error, reports)."""


@hookspec
def register_pruning_criteria(register: Callable[[PruningCriterion], None]) -> None:
    """Register pruning criteria that score the channels of a torch model for structured pruning."""


@hookspec
def register_engines(register: Callable[[Engine], None]) -> None:
    """Register execution engines that run shards of the heavy loops on several workers (Ray, ...)."""


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add subcommands to the `trtkit` command line: decorate functions with `@cli.command()`."""
