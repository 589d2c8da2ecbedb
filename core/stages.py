"""The small objects plugins hand to the core, one kind per pipeline stage.

Each is a frozen dataclass: a unique `name`, a one-line `description`, an `options` schema and the callable
that does the work. The core validates options against the schema (unknown keys, wrong types, missing
required values are one-line errors) and fills defaults before calling, so a component's callable receives
every declared option as a keyword argument.

Nothing here imports onnx, numpy or a runtime: this module is loaded at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

from .errors import OptionError, close_matches

if TYPE_CHECKING:
    import os
    from pathlib import Path

    import onnx

    from .model import ModelArtifact

_MISSING: Any = object()


def _not_registered(*args: Any, **kwargs: Any) -> NoReturn:
    """The default of a component's work callable: the plugin registered the component without one."""
    raise NotImplementedError("this component was registered without the callable that does its work")
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
    "path": (str,),
}


@dataclass(frozen=True)
class Option:
    """One option of a component.

    type: one of "str", "int", "float", "bool", "list", "dict", "path".
    default: used when the option is not given; `required=True` options have none.
    choices: allowed values, when the option is an enumeration.
    """

    type: str = "str"
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"option type must be one of {sorted(_TYPES)}, not {self.type!r}")

    def parse(self, text: str) -> Any:
        """Convert a command-line string (`--option key=value`) to this option's type."""
        if self.type == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true/false, got {text!r}")
        if self.type == "int":
            return int(text)
        if self.type == "float":
            return float(text)
        if self.type == "list":
            return [item.strip() for item in text.split(",") if item.strip()]
        if self.type == "dict":
            import json

            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        return text


@dataclass(frozen=True)
class Component:
    """Fields shared by every registered component.

    default: True for the component used when none is named (the first one registered wins).
    """

    name: str
    description: str
    options: Mapping[str, Option] = field(default_factory=dict)
    default: bool = False

    @property
    def kind(self) -> str:
        return type(self).__name__

    def resolve_options(self, given: Mapping[str, Any] | None, where: str | None = None) -> dict[str, Any]:
        """Validate `given` against the schema and fill defaults; errors name the option and the component."""
        where = where or f"{self.kind.lower()} '{self.name}'"
        given = dict(given or {})
        unknown = [key for key in given if key not in self.options]
        if unknown:
            key = unknown[0]
            raise OptionError(f"{where} has no option '{key}'{close_matches(key, self.options)}")
        resolved: dict[str, Any] = {}
        for key, option in self.options.items():
            if key not in given:
                if option.required:
                    raise OptionError(f"{where} needs option '{key}' ({option.help or option.type})")
                resolved[key] = option.default
                continue
            value = given[key]
            if isinstance(value, str) and option.type not in ("str", "path"):
                try:
                    value = option.parse(value)
                except ValueError as exc:
                    raise OptionError(f"{where} option '{key}': {exc}") from None
            if value is not None and (
                not isinstance(value, _TYPES[option.type])
                or (option.type in ("int", "float") and isinstance(value, bool))
            ):
                raise OptionError(
                    f"{where} option '{key}' must be {option.type}, got {type(value).__name__} {value!r}"
                )
            if option.type == "float" and isinstance(value, int):
                value = float(value)  # an int given for a float option (bools were refused above)
            if option.choices is not None and value not in option.choices:
                choices = ", ".join(map(str, option.choices))
                raise OptionError(f"{where} option '{key}' must be one of {choices}, got {value!r}")
            resolved[key] = value
        return resolved


@dataclass(frozen=True)
class Exporter(Component):
    """Turns a trained model into ONNX.

    export(source, output, **options) -> ModelArtifact
      source: a model object, or a spec string such as `file.py:factory` / `package.module:factory`.
      output: where the .onnx file is written (atomically).
    load_model(source, checkpoint) -> model   (optional; the framework's model object, weights loaded, for
      the stages that change the model before export: a recipe's [prune] and [distill])
    """

    export: Callable[..., ModelArtifact] = field(default=_not_registered, repr=False)
    load_model: Callable[[Any, str | None], Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class GraphPass(Component):
    """Rewrites an ONNX graph.

    apply(artifact, **options) -> ModelArtifact
      Returns a new artefact (the input is never modified). `exact=False` marks passes that change outputs
      by design (such as Sigmoid removal); the core then skips the generic numerical check and the pass
      proves its own relation.
    measured_difference(result) -> float | None   (optional, for exact=False passes)
      The max |output difference| the pass measured on `result` (the artefact it returned) when it proved
      its relation, None when it did not measure one. `trtkit optimize` records it as the pass's checked
      difference; without it, a pass whose `verify` option was on is recorded as checked with difference 0.
    default: the pass runs when none is selected (every default pass, in registration order).
    """

    apply: Callable[..., ModelArtifact] = field(default=_not_registered, repr=False)
    exact: bool = True
    measured_difference: Callable[[ModelArtifact], float | None] | None = field(default=None, repr=False)


# What a calibrator needs collected (Calibrator.statistics), cheapest first.
STATISTICS = ("range", "histogram", "exact-histogram")


@dataclass(frozen=True)
class Calibrator(Component):
    """Computes activation ranges (amax) from statistics collected once over the calibration data.

    compute_amax(stats, **options) -> float
      stats: a `trtkit.calibration.TensorStats` (min, max, |x| histogram with fixed bin edges).
      Returns the symmetric range amax > 0; the INT8 scale is amax / 127.
    statistics: what the collection must gather for it: "range" (min/max only, several times cheaper),
      "histogram" (|x| histogram of evenly spread positions of each sample) or "exact-histogram" (every
      value histogrammed, for methods sensitive to the counts in sparse tail bins).
    """

    compute_amax: Callable[..., float] = field(default=lambda *a, **k: 0.0, repr=False)
    statistics: str = "histogram"

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"calibrator '{self.name}': statistics must be one of {', '.join(STATISTICS)}, "
                             f"not {self.statistics!r}")


@runtime_checkable
class Runner(Protocol):
    """A loaded artefact that runs: inputs dict -> outputs dict (numpy arrays), names as in the ONNX model."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Builder(Component):
    """Turns an (optionally quantized) ONNX model into an artefact for a target runtime.

    build(model, output, **options) -> pathlib.Path
      model: path of the input .onnx; output: the artefact to write (atomically). Returns the written path.
    load(path, **runtime_options) -> Runner    (optional; raises TrtkitError for artefacts it cannot open)
    available() -> str | None                  (None when usable here, else the reason it is not)
    check(model) -> dict                       (optional; what of the .onnx model it can take, without building:
                                                {"model", "builder", "supported": bool, "unsupported": [{"index",
                                                "node", "op_type", "reason"}], ...}; `trtkit build --check`)
    describe(artifact) -> dict | None          (optional; facts about a built non-ONNX artefact read from its
                                                sidecar or metadata: {"kind", "inputs": [{"name", "dtype",
                                                "shape"}], ...}; None when the artefact is not its kind;
                                                `trtkit inspect`)
    suffix: the default output's name after the model's stem, e.g. ".ort.onnx" ("" gives ".<name>.engine")
    scale_tensors(model) -> list[str]          (optional; for builders that take calibrated scales: the activations
                                                they quantize, in graph order; what `trtkit calibrate` observes
                                                by default, tensors="quantizable")
    """

    build: Callable[..., Any] = field(default=lambda *a, **k: None, repr=False)
    load: Callable[..., Runner] | None = field(default=None, repr=False)
    available: Callable[[], str | None] = field(default=lambda: None, repr=False)
    check: Callable[[Path], dict[str, Any]] | None = field(default=None, repr=False)
    describe: Callable[[Path], dict[str, Any] | None] | None = field(default=None, repr=False)
    suffix: str = ""
    scale_tensors: Callable[[onnx.ModelProto], list[str]] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Evaluator(Component):
    """Measures artefacts: accuracy, speed, per-layer error, reports, device profiles.

    evaluate(models, **options) -> EvaluationResult
      models: list of artefact paths (by convention the first is the reference where one is needed).
    compares: what one evaluation takes in a recipe run: "pair" (the reference and one candidate; run once per
      built artefact, e.g. accuracy) or "all" (every built artefact at once, e.g. a speed table).
    report_section: the section of the run's report its data fills ("": none); a "pair" evaluator fills it
      with the list of its per-candidate data, an "all" evaluator with its one data.
    write_report(path, context) -> (html_path, markdown_path)   (optional; for an evaluator that renders
      reports: `trtkit.evaluation.write_report` and the recipe run use the first one that declares it)
    """

    evaluate: Callable[..., EvaluationResult] = field(default=_not_registered, repr=False)
    compares: str = "pair"
    report_section: str = ""
    write_report: Callable[[str | os.PathLike[str], Mapping[str, Any]], tuple[Path, Path]] | None = field(
        default=None, repr=False)

    def __post_init__(self) -> None:
        if self.compares not in ("pair", "all"):
            raise ValueError(f"evaluator '{self.name}': compares must be 'pair' or 'all', not {self.compares!r}")


# What a pruning criterion can score (PruningCriterion.kinds).
PRUNABLE_KINDS = ("conv", "linear", "norm")


@dataclass(frozen=True)
class PruningCriterion(Component):
    """Scores the channels of a torch model for structured pruning (how important each channel is).

    score(weight, kind, grad, **options) -> torch.Tensor [channels]   (higher: more important, kept)
      weight: one parameter of a layer in a group of coupled channels, channel-first and flattened to
        [channels, k] (a Conv/Linear weight sliced along the pruned dimension, or a norm's scale with k = 1).
      kind: "conv", "linear" or "norm" (BatchNorm/LayerNorm/GroupNorm scale).
      grad: the gradient of the same shape (a label-free loss on the calibration data) when `needs_data`,
        else None.
      The core averages the scores over the group's layers the criterion scores (`kinds`), normalises them
      by their mean and removes the lowest channels (per layer or globally).
    kinds: the layer kinds it scores (a group with none of them is left unpruned).
    needs_data: True for data-driven criteria (Taylor): the core back-propagates a label-free loss over the
      calibration batches first (gradients are passed as `grad`).
    """

    score: Callable[..., Any] = field(default=_not_registered, repr=False)
    kinds: tuple[str, ...] = PRUNABLE_KINDS
    needs_data: bool = False

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.kinds if kind not in PRUNABLE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"pruning criterion '{self.name}': kinds must be some of "
                             f"{', '.join(PRUNABLE_KINDS)}, not {self.kinds!r}")


@dataclass
class EvaluationResult:
    """What an evaluator returns: machine-readable data, a human summary, and whether its gates passed."""

    data: dict[str, Any]
    summary: str = ""
    passed: bool = True


@dataclass(frozen=True)
class Engine(Component):
    """Runs independent calls (shards of a data set, variants of a model) on several workers (`trtkit.engine`).

    map(work, shared, items, workers=N, address=A) -> list
      Calls work(shared, item) for every item on the workers and returns the results in the items' order.
      `work` is a module-level function (workers import it by name); `shared` (a model's bytes) reaches the
      workers once; items are small descriptions (a data file and a sample range), never arrays. A dead
      worker's call is retried; a call that fails raises its own exception (class and message).
      workers: calls at once (None: every CPU of the cluster); address: the cluster (None: a local one).
    slots(workers, address) -> int   how many calls run at once with these settings (connecting as needed)
    available() -> str | None        None when usable here, else the reason (e.g. the extra to install)
    default: the engine `--workers N` uses when none is named.
    """

    map: Callable[..., list[Any]] = field(default=_not_registered, repr=False)
    slots: Callable[[int | None, str | None], int] = field(default=_not_registered, repr=False)
    available: Callable[[], str | None] = field(default=lambda: None, repr=False)


STAGES: dict[str, type[Component]] = {
    "exporters": Exporter,
    "passes": GraphPass,
    "calibrators": Calibrator,
    "builders": Builder,
    "evaluators": Evaluator,
    "engines": Engine,
    "pruning_criteria": PruningCriterion,
}
