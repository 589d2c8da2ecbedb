"""Run graph passes over an ONNX model, each followed by a numerical check, with a per-pass report.

    from trtkit.optimizing import optimize
    result = optimize("model.onnx", passes, output="model.opt.onnx")
    # passes: registered pass names and (name, {option: value}) pairs, in order (`trtkit optimize --list`
    # shows them); None runs the default passes
    result.artifact            # the optimized ModelArtifact (metadata["passes"] lists what ran)
    result.reports             # one PassReport per pass: op counts before/after, seconds, max output diff
    print(result.table())      # the summary table `trtkit optimize` prints

Every exact pass is checked against the model before it with onnxruntime on the same inputs: the user's
(`check_data`, a .npz keyed by input name), or random ones within the declared ranges, with symbolic dims,
integer scalars and the like chosen so that the input model runs (core/check_feeds.py). Each output must
agree within atol + rtol * (max - min of the reference output) + float round-off (64 eps x max|reference|),
so a drift that is small in absolute terms but large against what the output spans still fails (failure
raises NumericalCheckError naming the pass). When the input model runs on none of the candidate inputs, one
warning says so and each pass gets the structural check only (the result loads in onnxruntime, outputs keep
their names and types): a model onnxruntime loads is never refused for want of inputs.
Passes that change outputs by design (`GraphPass.exact=False`) prove their own relation instead and may report the difference they measured (`GraphPass.measured_difference`), which the report
records; `check=False` turns both off. Which passes run by default is each pass's `default` flag.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NumericalCheckError, OptionError, TrtkitError, first_line

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .check_feeds import FeedPlan
    from .model import ModelArtifact
    from .registry import Registry
    from .stages import GraphPass

DEFAULT_RTOL = 1e-4  # of each output's range (max - min) on the check inputs
DEFAULT_ATOL = 1e-6
ROUNDOFF_EPS = 64  # float round-off allowance: this many machine epsilons of max|output|

PassSpec = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]


def default_passes(registry: Registry | None = None) -> list[str]:
    """Names of the passes that run when none is selected: every pass registered with `default=True`, in
    registration order."""
    from .registry import get_registry

    passes = (registry or get_registry()).stages["passes"]
    return [name for name, graph_pass in passes.items() if graph_pass.default]


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_PASSES":  # the default pass names as a module constant (computed from the registry)
        return default_passes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PassReport:
    """What one pass did."""

    name: str
    options: dict[str, Any]
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    seconds: float
    max_abs_diff: float | None = None  # None when not checked
    tolerance: float | None = None
    checked: str = "no"  # "onnxruntime", "by the pass", "structure" (no inputs run the model) or "no"

    @property
    def total_before(self) -> int:
        return sum(self.nodes_before.values())

    @property
    def total_after(self) -> int:
        return sum(self.nodes_after.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "options": self.options, "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after, "total_before": self.total_before, "total_after": self.total_after,
            "seconds": round(self.seconds, 4), "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
            "checked": self.checked,
        }


@dataclass
class OptimizeResult:
    artifact: ModelArtifact
    reports: list[PassReport] = field(default_factory=list)
    output: Path | None = None
    max_abs_diff: float | None = None  # final model vs the input model (exact passes only)

    @property
    def thresholds(self) -> dict[str, Any]:
        return dict(self.artifact.metadata.get("thresholds", {}))

    def to_dict(self) -> dict[str, Any]:
        before = self.reports[0].nodes_before if self.reports else {}
        after = self.reports[-1].nodes_after if self.reports else {}
        return {
            "output": str(self.output) if self.output else None,
            "passes": [r.to_dict() for r in self.reports],
            "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
            "max_abs_diff": self.max_abs_diff,
            "thresholds": self.thresholds,
            "preprocess": self.artifact.metadata.get("preprocess"),
        }

    def table(self) -> Any:
        """A rich Table: op types as rows, node counts before and after each pass, time and max diff."""
        from rich.table import Table

        table = Table(title="trtkit optimize")
        table.add_column("op type")
        first = self.reports[0].nodes_before if self.reports else {}
        table.add_column("input", justify="right")
        for report in self.reports:
            table.add_column(report.name, justify="right")
        ops = sorted(set(first).union(*(r.nodes_after for r in self.reports)))
        for op in ops:
            cells = [str(first.get(op, 0))] + [str(r.nodes_after.get(op, 0)) for r in self.reports]
            table.add_row(op, *cells)
        table.add_section()
        table.add_row("total nodes", str(sum(first.values())), *(str(r.total_after) for r in self.reports))
        table.add_row("time (s)", "", *(f"{r.seconds:.3f}" for r in self.reports))
        table.add_row("max |diff|", "", *(_fmt_diff(r) for r in self.reports))
        table.add_row("tolerance", "", *(f"{r.tolerance:.2e}" if r.tolerance is not None else "" for r in self.reports))
        return table


def _fmt_diff(report: PassReport) -> str:
    if report.max_abs_diff is None:
        return "structure" if report.checked == "structure" else "unchecked"
    suffix = "" if report.checked == "onnxruntime" else "*"
    return f"{report.max_abs_diff:.2e}{suffix}"


def parse_pass_specs(passes: Sequence[PassSpec] | None, options: Mapping[str, Any] | None = None,
                     registry: Registry | None = None) -> list[tuple[GraphPass, dict[str, Any]]]:
    """Resolve pass names and options (validated by each pass's schema).

    `options` holds extra KEY=VALUE settings (from `-O`): `pass.key` goes to that pass; a bare `key` goes to
    every selected pass that declares it (an error if none does).
    """
    from .registry import get_registry

    registry = registry or get_registry()
    specs = list(default_passes(registry) if passes is None else passes)
    if not specs:
        raise OptionError("no passes selected")
    resolved: list[tuple[Any, dict[str, Any]]] = []
    for spec in specs:
        if isinstance(spec, str):
            name, given = spec, {}
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
            name, given = spec[0], dict(spec[1] or {})
        elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):  # {"name": ..., "options": {...}}
            name = spec["name"]
            given = dict(spec.get("options") or {})
            given.update({k: v for k, v in spec.items() if k not in ("name", "options")})
        else:
            raise OptionError(f"a pass is a name or (name, options), got {spec!r}")
        resolved.append((registry.graph_pass(name), given))
    names = [p.name for p, _ in resolved]
    for key, value in (options or {}).items():
        target, dot, option = key.partition(".")
        if dot:
            if target not in names:
                from .errors import unknown_name

                raise unknown_name("selected pass", target, names)
            for graph_pass, given in resolved:
                if graph_pass.name == target:
                    given[option] = value
            continue
        takers = [(p, g) for p, g in resolved if key in p.options]
        if not takers:
            from .errors import close_matches

            known = sorted({k for p, _ in resolved for k in p.options})
            raise OptionError(f"no selected pass has option '{key}'{close_matches(key, known)}")
        for _, given in takers:
            given[key] = value
    return [(p, p.resolve_options(given, where=f"pass '{p.name}'")) for p, given in resolved]


def optimize(
    model: str | os.PathLike[str] | ModelArtifact | onnx.ModelProto,
    passes: Sequence[PassSpec] | None = None,
    output: str | os.PathLike[str] | None = None,
    check: bool = True,
    *,
    options: Mapping[str, Any] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    check_data: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
    external_data: bool | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Apply `passes` (default: the default passes) in order; check each; optionally write `output` atomically.

    model: a path, ModelArtifact or ModelProto (never modified).
    passes: names, (name, options) pairs or {"name": ..., "options": {...}} tables; `options` adds `-O`-style
    settings (see parse_pass_specs).
    check: numerical check after every pass (random inputs in `ranges`, default [-1, 1]; symbolic dims from
    `dims`, default 1, or sizes the model needs; `check_data`: a .npz of the user's own inputs).
    Returns an OptimizeResult (artifact, per-pass reports, overall max diff).
    """
    from .fileio import check_output_path
    from .graph import op_counts
    from .model import ModelArtifact, as_artifact

    if rtol < 0 or atol < 0:
        raise OptionError("tolerances must be >= 0")
    for name, bounds in (ranges or {}).items():
        if len(bounds) != 2 or not float(bounds[0]) <= float(bounds[1]):
            raise OptionError(f"range for input '{name}' must be LOW,HIGH with LOW <= HIGH, got {bounds!r}")
    source = as_artifact(model, "model")
    if output is not None:
        check_output_path(output, source.source)
    selected = parse_pass_specs(passes, options, registry)
    _check_input_names(source, ranges, "range")
    current = source
    reports: list[PassReport] = []
    # Outputs already computed, per artefact: a pass's checked result is the next pass's reference, and the
    # input model's outputs are the final check's. Each model is run once per set of feeds, one session at
    # a time (a >2 GB model's session holds its weights; two alive would double the peak memory).
    known: dict[int, tuple[ModelArtifact, dict[str, np.ndarray], dict[str, np.ndarray]]] = {}

    def outputs_of(artifact: ModelArtifact, feeds: dict[str, np.ndarray], pass_name: str,
                   when: str) -> dict[str, np.ndarray]:
        cached = known.get(id(artifact))
        if cached is not None and cached[0] is artifact and _same_feeds(cached[1], feeds):
            return cached[2]
        outputs = _run(artifact, feeds, pass_name, when)
        for key in [k for k, (art, _, _) in known.items() if art is not source and art is not artifact]:
            del known[key]  # keep the input model's and the latest model's outputs only
        known[id(artifact)] = (artifact, feeds, outputs)
        return outputs

    plan = None
    if check and any(p.exact for p, _ in selected):
        plan = _check_plan(source, ranges, dims, seed, check_data, known)

    from .ui import track

    steps = track(selected, total=len(selected), description="passes") if progress else selected
    for graph_pass, resolved in steps:
        given = dict(resolved)
        if "verify" in graph_pass.options:
            given["verify"] = bool(check and given.get("verify", True))
        if "raw_range" in graph_pass.options and given.get("raw_range") is None and ranges:
            # the declared input range is the raw range a preprocessing pass should prove itself on
            raw = ranges.get(given.get("input") or "") or (next(iter(ranges.values())) if len(ranges) == 1
                                                            else None)
            if raw is not None:
                given["raw_range"] = [float(raw[0]), float(raw[1])]
        before = op_counts(current.model)
        start = time.perf_counter()
        try:
            result = graph_pass.apply(current.copy(), **given)
        except TrtkitError:
            raise
        except Exception as exc:
            raise NumericalCheckError(f"pass '{graph_pass.name}' failed: {type(exc).__name__}: {first_line(exc)}") from exc
        seconds = time.perf_counter() - start
        if not isinstance(result, ModelArtifact):
            raise TrtkitError(f"pass '{graph_pass.name}' returned {type(result).__name__}, not a ModelArtifact")
        report = PassReport(graph_pass.name, _jsonable(resolved), before, op_counts(result.model), seconds)
        if check and graph_pass.exact and plan is not None:
            feeds = plan.feeds(result.model)
            try:
                reference = outputs_of(current, feeds, graph_pass.name, "before")
            except _BeforeFails as exc:  # a non-exact pass before changed the inputs: check the structure
                _warn(f"numerical check off from pass '{graph_pass.name}' on: {exc}; structural checks only")
                plan = None
        if check and graph_pass.exact and plan is not None:
            got = outputs_of(result, feeds, graph_pass.name, "after")
            report.max_abs_diff, report.tolerance = _compare(reference, got, graph_pass.name, rtol, atol)
            report.checked = "onnxruntime"
        elif check and graph_pass.exact:
            _check_structure(current, result, graph_pass.name)
            report.checked = "structure"
        elif check and not graph_pass.exact:
            # the pass proved its own relation (when its `verify` option was on); record what it measured
            measured = graph_pass.measured_difference(result) if graph_pass.measured_difference else None
            report.max_abs_diff = measured if measured is not None else (0.0 if given.get("verify") else None)
            report.checked = "by the pass" if given.get("verify") else "no"
        history = list(result.metadata.get("passes", []))
        history.append({"name": graph_pass.name, "options": _jsonable(resolved)})
        result.metadata["passes"] = history
        reports.append(report)
        current = result

    overall = None
    if check and all(p.exact for p, _ in selected) and reports and plan is not None:
        feeds = plan.feeds(current.model)
        ref = outputs_of(source, feeds, "input model", "before")
        got = outputs_of(current, feeds, "all passes", "after")
        overall = max((float(abs(got[k].astype("float64") - ref[k]).max()) if ref[k].size else 0.0)
                      for k in ref) if ref else 0.0
    known.clear()
    written = None
    if output is not None:
        written = current.save(output, external_data=external_data)
        if current.has_external_data():
            # its tensors still point into the input's data file: hand back the written model instead
            current = ModelArtifact.load(written)
        else:
            current.source = written
            current.base_dir = written.parent
    return OptimizeResult(current, reports, written, overall)


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    result = {}
    for key, value in sorted(options.items()):
        if isinstance(value, tuple):
            value = list(value)
        result[key] = value
    return result


def _check_input_names(artifact: ModelArtifact, mapping: Mapping[str, Any] | None, what: str) -> None:
    from .runtime import input_specs

    names = [spec.name for spec in input_specs(artifact.model)]
    for name in mapping or {}:
        if name not in names:
            from .errors import unknown_name

            raise unknown_name(f"input (in {what})", name, names)


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)


def _check_plan(source: ModelArtifact, ranges: Mapping[str, tuple[float, float]] | None,
                dims: Mapping[str, int] | None, seed: int, check_data: str | os.PathLike[str] | None,
                known: dict[int, Any]) -> FeedPlan | None:
    """Inputs the input model runs on (its outputs go to `known`), or None after one warning line."""
    from .check_feeds import find_feeds, load_check_data, probe

    given = load_check_data(check_data, source.model) if check_data is not None else None
    plan, outputs, error = find_feeds(source, probe(source), ranges, dims, seed, given)
    if plan is None or outputs is None:
        what = f"the inputs in {check_data}" if given is not None else "any generated inputs"
        _warn(f"numerical check off: the input model does not run on {what} ({error}); structural checks "
              "only (--check-data FILE.npz gives inputs it runs on)")
        return None
    known[id(source)] = (source, plan.feeds(source.model), outputs)
    return plan


def _check_structure(before: ModelArtifact, after: ModelArtifact, pass_name: str) -> None:
    """Without inputs to run: the result loads in onnxruntime and keeps the outputs' names and types."""
    from .runtime import output_specs, session

    try:
        session(after, optimization="disable")
    except TrtkitError as exc:
        raise NumericalCheckError(f"pass '{pass_name}' produced a model onnxruntime cannot load: {exc}") from None
    old = {spec.name: spec for spec in output_specs(before.model)}
    new = {spec.name: spec for spec in output_specs(after.model)}
    for name, spec in old.items():
        if name not in new:
            raise NumericalCheckError(f"pass '{pass_name}' removed output '{name}'")
        if new[name].dtype != spec.dtype or (spec.shape and new[name].shape and len(new[name].shape) != len(spec.shape)):
            raise NumericalCheckError(f"pass '{pass_name}' changed output '{name}' from {spec.dtype} "
                                      f"{list(spec.shape)} to {new[name].dtype} {list(new[name].shape)}")


def _same_feeds(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _run(artifact: ModelArtifact, feeds: dict[str, np.ndarray], pass_name: str, when: str) -> dict[str, np.ndarray]:
    from .runtime import run, session

    try:
        sess = session(artifact, optimization="disable")
    except TrtkitError as exc:
        if when == "after":
            raise NumericalCheckError(f"pass '{pass_name}' produced a model onnxruntime cannot load: {exc}") from None
        raise
    try:
        return run(sess, feeds)
    except Exception as exc:
        first = first_line(exc)
        if when == "after":
            raise NumericalCheckError(f"pass '{pass_name}' produced a model that fails to run: {first}") from None
        raise _BeforeFails(f"the model before pass '{pass_name}' fails to run on the check inputs: {first}") from None


class _BeforeFails(TrtkitError):
    """The model before a pass does not run on the check inputs (only after a pass that changed its inputs)."""


def _compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], pass_name: str, rtol: float,
             atol: float) -> tuple[float, float]:
    import numpy as np

    worst, tolerance = 0.0, atol
    for name, ref in reference.items():
        if name not in got:
            raise NumericalCheckError(f"pass '{pass_name}' removed output '{name}'")
        new = got[name]
        if new.shape != ref.shape:
            raise NumericalCheckError(
                f"pass '{pass_name}' changed output '{name}' shape from {list(ref.shape)} to {list(new.shape)}"
            )
        if ref.size == 0:
            continue
        if ref.dtype.kind not in "fc":
            if not np.array_equal(ref, new):
                raise NumericalCheckError(f"pass '{pass_name}' changed the values of output '{name}'")
            continue
        ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
        finite = np.isfinite(ref64)
        if not np.array_equal(finite, np.isfinite(new64)):
            raise NumericalCheckError(f"pass '{pass_name}' changed which values of output '{name}' are finite")
        diff = float(np.max(np.abs(new64[finite] - ref64[finite]))) if finite.any() else 0.0
        values = ref64[finite]
        span = float(values.max() - values.min()) if values.size else 0.0
        magnitude = float(np.max(np.abs(values))) if values.size else 0.0
        # relative to what the output spans (a constant output: to its magnitude), plus float round-off
        bound = atol + rtol * (span or magnitude) + ROUNDOFF_EPS * float(np.finfo(ref.dtype).eps) * magnitude
        if not diff <= bound:
            raise NumericalCheckError(
                f"pass '{pass_name}' changed output '{name}' by {diff:.3g} (tolerance {bound:.3g})"
            )
        worst, tolerance = max(worst, diff), max(tolerance, bound)
    return worst, tolerance
