"""`trtkit run recipe.toml`: the steps of a recipe and what each runs, export -> optimize -> calibrate ->
quantize -> build -> eval, then gates and the report.

Each action receives its Step, the results of earlier steps and an empty folder to write into, and returns
the names of the files it wrote (plus small JSON-able facts). `trtkit.steps` caches and runs the steps: a
re-run with an unchanged recipe redoes nothing; changing the calibration method redoes calibration and what
follows only. `trtkit.recipe` loads and checks the recipe.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import Execution
from .errors import GateError, OptionError, TrtkitError, close_matches
from .recipe import Recipe, load_recipe
from .steps import Step, StepResult, assign_keys, run_steps

if TYPE_CHECKING:
    from .calibration import CalibrationSettings

# recipe [gates] key -> the evaluator option it sets, on every evaluator that has all of these options.
GATE_OPTIONS = {"max_accuracy_drop": "max_top1_drop", "min_top1_agreement": "min_agreement",
                "min_sqnr_db": "min_sqnr"}


def check_components(recipe: Recipe) -> CalibrationSettings | None:
    """Every plugin name and its options, checked before any work starts; errors name the recipe.
    Returns the calibration settings (None without a [calibration] section)."""
    try:
        return _check_components(recipe)
    except OptionError as exc:
        message = str(exc)
        raise OptionError(message if message.startswith(str(recipe.path)) else f"{recipe.path}: {message}") from None


def _check_components(recipe: Recipe) -> CalibrationSettings | None:
    from .calibration import CalibrationSettings
    from .optimizing import parse_pass_specs
    from .registry import get_registry

    registry = get_registry()
    model = recipe.section("model")
    if "source" in model:
        registry.exporter(model.get("exporter") or registry.default("exporters").name)
    passes = recipe.section("passes")
    if passes:
        parse_pass_specs([(item["name"], item.get("options", {})) for item in passes])
    calibration = recipe.section("calibration")
    settings = CalibrationSettings.from_recipe(calibration, f"{recipe.path} [calibration]") if calibration else None
    for item in recipe.section("builders"):
        registry.builder(item["name"]).resolve_options(item.get("options", {}),
                                                       where=f"{recipe.path} [[builders]] '{item['name']}'")
    for item in recipe.section("evaluators"):
        evaluator = registry.evaluator(item["name"])
        for key in item.get("options", {}):  # values are checked when it runs (tolerances take several forms)
            if key not in evaluator.options:
                raise OptionError(f"{recipe.path} [[evaluators]] '{item['name']}': no option '{key}'"
                                  f"{close_matches(key, evaluator.options)}")
    return settings


def plan(recipe: Recipe) -> list[Step]:
    """The ordered steps a recipe asks for, each with its cache key."""
    return assign_keys(steps_for(recipe))


def steps_for(recipe: Recipe) -> list[Step]:
    from .optimizing import DEFAULT_PASSES
    from .registry import get_registry

    settings = check_components(recipe)
    registry = get_registry()
    steps: list[Step] = []
    model = recipe.section("model")
    if "onnx" in model:
        steps.append(Step("model", {"onnx": model["onnx"]}, files=recipe.model_files, action=_copy_model))
    else:
        config = {"source": model["source"], "exporter": model.get("exporter") or registry.default("exporters").name,
                  "checkpoint": model.get("checkpoint"), "options": model.get("options", {})}
        files = list(recipe.model_files)
        if recipe.section("prune") or recipe.section("distill"):  # changed before export (trtkit.compress)
            from .compress import example_shape

            example_shape(config["options"], str(recipe.path))
            data = (recipe.section("distill").get("data") or recipe.section("prune").get("data")
                    or recipe.section("calibration").get("data"))
            config.update(prune=recipe.section("prune"), distill=recipe.section("distill"), data=data)
            files += [Path(data)] if data else []
        steps.append(Step("export", config, files=files, action=_export))
    first = steps[0].name

    passes = recipe.section("passes") or [{"name": name} for name in DEFAULT_PASSES]
    pass_specs = [[item["name"], item.get("options", {})] for item in passes]
    check_data = recipe.section("optimize").get("check_data")
    if check_data is None:
        steps.append(Step("optimize", {"passes": pass_specs}, needs=[first], action=_optimize))
    else:  # the check's inputs are part of what the step depends on
        steps.append(Step("optimize", {"passes": pass_specs, "check_data": check_data}, needs=[first],
                          files=[Path(check_data)], action=_optimize))

    quantize = recipe.section("quantize")
    calibration = recipe.section("calibration")
    int8 = bool(calibration) and quantize.get("enabled", True)
    # [execution]: where calibration (and evaluators that run on workers) run; results identical
    execution = Execution.from_recipe(recipe.section("execution"), f"{recipe.path} [execution]")
    if int8 and settings is not None:
        data = calibration.get("data")
        if data is None:
            raise TrtkitError(f"{recipe.path} [calibration]: missing key 'data'")
        overrides = calibration.get("overrides")
        config = {key: calibration.get(key) for key in ("method", "options", "batch_size", "limit", "cache",
                                                            "trt_version", "histogram_positions")}
        config.update(data=data, overrides=overrides)
        if calibration.get("cast"):  # only when set: recipes without it keep their cache keys
            config["cast"] = True
        config["method"] = settings.calibrator.name
        steps.append(Step("calibrate", config, needs=["optimize"],
                          files=[Path(data)] + ([Path(overrides)] if overrides else []),
                          action=functools.partial(_calibrate, settings, execution)))
        qconfig = {key: quantize.get(key) for key in ("exclude", "exclude_op_types", "per_channel", "reduce_range",
                                                      "adaptive_round", "recenter", "target", "task_metrics",
                                                      "max_float")}
        for key in ("smooth", "choose_ranges"):  # only when set: recipes without them keep their cache keys
            if quantize.get(key) is not None:
                qconfig[key] = quantize[key]
        qconfig["data"] = data  # the scales builder refines and checks on it when it can (it declares 'data')
        steps.append(Step("quantize", qconfig, needs=["optimize", "calibrate"], files=[Path(data)],
                          action=functools.partial(_quantize, execution=recipe.section("execution"))))

    built: list[str] = []
    for item in recipe.section("builders") or [{"name": registry.default("builders").name}]:
        precisions = item.get("precisions") or ["fp32", "int8"]
        for precision in precisions:
            if precision not in ("fp32", "int8"):
                raise TrtkitError(f"{recipe.path} [builders] {item['name']}: precision must be fp32 or int8, "
                                  f"got {precision!r}")
            if precision == "int8" and not int8:
                continue
            source = "quantize" if precision == "int8" else "optimize"
            name = f"build:{item['name']}:{precision}"
            config = {"builder": item["name"], "options": item.get("options", {}),
                      "optional": item.get("optional", False), "precision": precision}
            steps.append(Step(name, config, needs=[source], action=_build))
            built.append(name)

    evaluators = recipe.section("evaluators")
    gates = {GATE_OPTIONS[key]: value for key, value in recipe.section("gates").items()}
    for item in evaluators:
        data, labels = item.get("data"), item.get("labels")
        options = dict(item.get("options", {}))
        if gates and set(gates) <= set(registry.evaluator(item["name"]).options):
            options.update({key: str(value) for key, value in gates.items()})
        config = {"evaluator": item["name"], "data": data, "labels": labels, "options": options}
        files = [Path(path) for path in (data, labels) if path is not None]
        steps.append(Step(f"eval:{item['name']}", config, needs=["optimize", *built], files=files,
                          action=functools.partial(_evaluate, execution=recipe.section("execution"))))
    return steps


# ---- actions -------------------------------------------------------------------------------------------

def _copy_model(step: Step, results: dict[str, StepResult], folder: Path) -> dict[str, Any]:
    from .model import ModelArtifact

    ModelArtifact.load(step.config["onnx"]).save(folder / "model.onnx")
    return {"model": "model.onnx"}


def _export(step: Step, results: dict[str, StepResult], folder: Path) -> dict[str, Any]:
    from .exporting import export

    config = step.config
    if config.get("prune") or config.get("distill"):
        return _export_compressed(step, folder)
    export(config["source"], folder / "model.onnx", exporter=config["exporter"],
           checkpoint=config["checkpoint"], **config["options"])
    return {"model": "model.onnx"}


def _export_compressed(step: Step, folder: Path) -> dict[str, Any]:
    """[prune] / [distill]: the exporter's model, pruned and/or distilled, exported as model.onnx; the
    original exported as dense.onnx (the compression table's reference)."""
    from .compress import compress, example_shape, write_json
    from .exporting import export
    from .registry import get_registry

    config = step.config
    exporter = get_registry().exporter(config["exporter"])
    if exporter.load_model is None:
        raise TrtkitError(f"exporter '{exporter.name}' cannot load the model for [prune]/[distill] (no load_model)")
    original = exporter.load_model(config["source"], config["checkpoint"])
    changed, report = compress(original, example_shape(config["options"], "[model]"), config.get("prune"),
                               config.get("distill"), config.get("data"))
    export(original, folder / "dense.onnx", exporter=config["exporter"], **config["options"])
    export(changed, folder / "model.onnx", exporter=config["exporter"], **config["options"])
    write_json(folder / "compression.json", report)
    return {"model": "model.onnx", "dense": "dense.onnx", "compression": "compression.json"}


def _upstream_model(step: Step, results: dict[str, StepResult]) -> Path:
    return results[step.needs[0]].path("model")


def _optimize(step: Step, results: dict[str, StepResult], folder: Path) -> dict[str, Any]:
    from .optimizing import optimize

    passes = [(name, options) for name, options in step.config["passes"]]
    result = optimize(_upstream_model(step, results), passes, output=folder / "model.onnx", progress=True,
                      check_data=step.config.get("check_data"))
    report = result.to_dict()
    (folder / "optimize.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return {"model": "model.onnx", "report": "optimize.json", "thresholds": result.thresholds}


def _calibrate(settings: CalibrationSettings, execution: Execution, step: Step, results: dict[str, StepResult],
               folder: Path) -> dict[str, Any]:
    config = step.config  # the settings were built from the same [calibration] keys (check_components)
    from .data import load_data

    model = results["optimize"].path("model")
    source = load_data(config["data"], model, batch_size=settings.batch_size, limit=settings.limit,
                       preprocess=settings.preprocess, cast=bool(config.get("cast")))
    if execution.in_process:
        scales = settings.calibrate(model, source, output=folder / "scales.json")
    else:
        scales = settings.scales(settings.collect_on(execution, model, config["data"], source,
                                                     cast=bool(config.get("cast"))))
        scales.save(folder / "scales.json")
    outputs: dict[str, Any] = {"scales": "scales.json", "tensors": len(scales)}
    if config.get("cache"):
        from .trtcache import DEFAULT_TRT_VERSION, write_cache

        write_cache(scales, folder / "calibration.cache", trt_version=config.get("trt_version") or DEFAULT_TRT_VERSION)
        outputs["cache"] = "calibration.cache"
    return outputs


def _quantize(step: Step, results: dict[str, StepResult], folder: Path,
              execution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from .calibration import scales_builder

    builder = scales_builder()  # the builder that takes calibrated scales (it declares scale_tensors)
    given = {key: value for key, value in step.config.items() if value is not None}
    if "workers" in builder.options and step.config.get("data") is not None:  # [execution]: not in the cache key
        given.update({key: (execution or {}).get(key) for key in ("workers", "address", "engine")
                      if (execution or {}).get(key) is not None})
    if "data" in builder.options and step.config.get("data") is not None:
        given["data"] = str(step.config["data"])  # a builder that can use the calibration data gets it
    else:
        given.pop("data", None)
    options = builder.resolve_options({**given, "scales": str(results["calibrate"].path("scales"))},
                                      where=f"[quantize] builder '{builder.name}'")
    builder.build(results["optimize"].path("model"), folder / "model.onnx", **options)
    return {"model": "model.onnx"}


def _build(step: Step, results: dict[str, StepResult], folder: Path) -> dict[str, Any]:
    from .building import build, default_output, get_builder

    config = step.config
    builder = get_builder(config["builder"])
    reason = builder.available()
    if reason:
        if config["optional"]:
            return {"skipped": reason}
        raise TrtkitError(f"builder '{config['builder']}' is not usable here: {reason}")
    source = _upstream_model(step, results)
    suffix = default_output(source, config["builder"]).suffix or ".out"
    name = f"model.{config['precision']}{suffix}"
    written = build(source, folder / name, builder=config["builder"], **config["options"])
    if builder.describe is not None:  # an engine's build warnings (e.g. a batch-1 profile), one line each
        from .building import describe
        from .ui import console

        for note in (describe(written) or {}).get("notes", []):
            if note.startswith("warning: "):
                console.print(f"         {note}", markup=False)
    extra = sorted(p.name for p in folder.iterdir() if p.name != written.name)  # sidecars, timing caches
    return {"model": written.name, "files": extra}


def _evaluate(step: Step, results: dict[str, StepResult], folder: Path,
              execution: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from .evaluation import evaluate, jsonable
    from .registry import get_registry

    config = step.config
    reference = results["optimize"].path("model")
    candidates = _runnable_builds(step, results)
    name = config["evaluator"]
    evaluator = get_registry().evaluator(name)
    options = dict(config["options"])
    if "workers" in evaluator.options:  # the recipe's [execution], for evaluators that run on workers
        given = {"workers": (execution or {}).get("workers"), "address": (execution or {}).get("address")}
        options.update({key: value for key, value in given.items() if value is not None and key not in options})
    for key in ("data", "labels"):
        if config.get(key) and key in evaluator.options:
            options[key] = config[key]
    if evaluator.compares == "all":
        result = evaluate(name, [path for _, path in candidates], **options)
        runs = [{"label": "all builds", "data": jsonable(result.data), "summary": result.summary,
                 "passed": result.passed}]
    else:
        from .errors import NotApplicable, first_line
        from .ui import console

        runs = []
        for label, path in candidates:
            try:
                result = evaluate(name, [reference, path], **options)
            except NotApplicable as exc:  # e.g. layers on the FP32 build: skip this one, go on with the rest
                console.print(f"         {name} skipped for {label}: {first_line(exc)}", markup=False)
                runs.append({"label": label, "skipped": first_line(exc), "data": {}, "summary": "", "passed": True})
                continue
            runs.append({"label": label, "data": jsonable(result.data), "summary": result.summary,
                         "passed": result.passed})
    (folder / "result.json").write_text(json.dumps(runs, indent=2, sort_keys=True, default=str) + "\n")
    return {"result": "result.json", "passed": all(run["passed"] for run in runs)}


def _runnable_builds(step: Step, results: dict[str, StepResult]) -> list[tuple[str, Path]]:
    """(label, path) of built artefacts that can run on this machine, in build order."""
    from .runners import open_runner

    runnable = []
    for name in step.needs:
        if not name.startswith("build:") or "model" not in results[name].outputs:
            continue
        path = results[name].path("model")
        try:
            open_runner(path)
        except TrtkitError:
            continue
        runnable.append((name.removeprefix("build:"), path))
    return runnable


# ---- gates and publishing ------------------------------------------------------------------------------

def check_gates(recipe: Recipe, results: dict[str, StepResult]) -> list[tuple[str, bool, str]]:
    """One row per evaluation that judged something (tolerances / gates): (what, passed, headline)."""
    rows = []
    for name, result in results.items():
        if not name.startswith("eval:"):
            continue
        for run in json.loads(result.path("result").read_text()):
            data = run["data"]
            if not data.get("checks") and run["passed"]:
                continue  # measured, not judged (e.g. speed)
            rows.append((f"{name.removeprefix('eval:')} {run['label']}", bool(run["passed"]), _headline(data)))
    return rows


def _headline(data: dict[str, Any]) -> str:
    """The numbers a person wants on one line: task accuracy, agreement, SQNR, and each check."""
    parts = []
    task = data.get("task") or {}
    if "candidate_top1" in task:
        parts.append(f"top-1 {task['candidate_top1']:.4f} vs reference {task['reference_top1']:.4f}")
    if "agreement" in task:
        parts.append(f"top-1 agreement {task['agreement']:.4f}")
    for output, metrics in (data.get("outputs") or {}).items():
        if isinstance(metrics, dict) and "sqnr_db" in metrics:
            sqnr = metrics["sqnr_db"]
            sqnr_text = f"{sqnr:.1f}" if isinstance(sqnr, (int, float)) else str(sqnr)
            parts.append(f"{output} SQNR {sqnr_text} dB, cosine {metrics.get('cosine', float('nan')):.5f}")
    for failed in data.get("failed") or []:  # artefacts an evaluator could not run (e.g. speed)
        parts.append(f"{Path(str(failed.get('model'))).name} could not run: {failed.get('error')}")
    for check in data.get("checks") or []:
        verdict = "ok" if check.get("passed") else "FAILED"
        value = check.get("value")
        value_text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{check.get('metric')} {value_text} {check.get('op', '')} {check.get('limit')} {verdict}")
    return "; ".join(parts) or "no checks"


def _publish_model(source: Path, target: Path) -> None:
    """Publish an ONNX model; one with external data is re-saved so its weights file follows the new name."""
    from .model import ModelArtifact

    artifact = ModelArtifact.load(source)
    if artifact.has_external_data():
        artifact.save(target)  # streams the weights into TARGET.data, atomically with the model
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: Path, target: Path) -> None:
    """Publish `source` at `target` atomically: hard-linked (or copied) under a temporary name, then renamed."""
    from .fileio import atomic_path

    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def publish(recipe: Recipe, results: dict[str, StepResult], gates: list[tuple[str, bool, str]],
            out: Path) -> Path | None:
    """Put the final artefacts at the top of the output folder and write the report."""
    names = {"optimize": "model.onnx", "quantize": "model.int8.onnx"}
    published: dict[str, str] = {}
    for step, target in names.items():
        if step in results:
            _publish_model(results[step].path("model"), out / target)
            published[step] = target
    if "calibrate" in results:
        for key in ("scales", "cache"):
            if key in results["calibrate"].outputs:
                target = results["calibrate"].outputs[key]
                _link_or_copy(results["calibrate"].path(key), out / target)
                published[key] = target
    for name, result in results.items():
        if name.startswith("build:") and "model" in result.outputs:
            _, builder, precision = name.split(":")
            target_dir = out / "builds" / builder
            target_dir.mkdir(parents=True, exist_ok=True)
            for file in [result.outputs["model"], *result.outputs.get("files", [])]:
                _link_or_copy(result.folder / file, target_dir / file)
            published[name] = str(Path("builds") / builder / result.outputs["model"])
    summary = {
        "recipe": str(recipe.path),
        "steps": {name: {"key": r.key, "cached": r.cached, "seconds": round(r.seconds, 3),
                         "outputs": {k: v for k, v in r.outputs.items() if k != "files"}}
                  for name, r in results.items()},
        "artefacts": published,
        "gates": [{"check": what, "passed": ok, "summary": text} for what, ok, text in gates],
    }
    from .fileio import write_text

    write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    if not recipe.section("report").get("enabled", True):
        return None
    from .evaluation import write_report

    html, _ = write_report(out / "report.html", report_context(recipe, results, out, gates))
    return html


def report_context(recipe: Recipe, results: dict[str, StepResult], out: Path,
                   gates: list[tuple[str, bool, str]] | None = None) -> dict[str, Any]:
    """The report's context (schema in trtkit.evaluation.write_report) from the step results."""
    from .evaluation import graph_stats

    context: dict[str, Any] = {"title": recipe.section("report").get("title") or f"trtkit: {recipe.path.name}"}
    models = []
    graph = {}
    for step, label, published in (("optimize", "FP32 (optimized)", "model.onnx"),
                                   ("quantize", "INT8 (QDQ)", "model.int8.onnx")):
        if step in results:
            path = results[step].path("model")
            models.append({"name": label, "path": str(out / published),
                           "role": "reference" if step == "optimize" else "candidate"})
            graph[label] = graph_stats(path)
    for name, result in results.items():  # every built artefact, and the ones skipped with their reason
        if name.startswith("build:"):
            _, builder, precision = name.split(":")
            if "model" in result.outputs:
                models.append({"name": f"{builder} {precision.upper()}", "role": "build",
                               "path": str(out / "builds" / builder / result.outputs["model"])})
            elif result.outputs.get("skipped"):
                models.append({"name": f"{builder} {precision.upper()}", "role": "not built",
                               "path": f"skipped: {result.outputs['skipped']}"})
    first = "export" if "export" in results else "model"
    graph = {"input": graph_stats(results[first].path("model")), **graph}
    context.update(models=models, graph=graph)
    if "optimize" in results:
        report = json.loads(results["optimize"].path("report").read_text())
        context["passes"] = [
            {"name": p["name"], "options": p["options"],
             "detail": f"{p['total_before']} -> {p['total_after']} nodes, max |diff| {p['max_abs_diff']}"}
            for p in report["passes"]
        ]
    if "quantize" in results:
        from .evaluation import activation_histograms

        calibration = recipe.section("calibration")
        context["histograms"] = activation_histograms(
            str(results["optimize"].path("model")), str(results["quantize"].path("model")),
            calibration.get("data"), num_samples=256)
        for entry in context["histograms"].values():
            entry["method"] = json.loads(results["calibrate"].path("scales").read_text())["method"]
    if "calibrate" in results:
        scales = json.loads(results["calibrate"].path("scales").read_text())
        tensors = scales.get("tensors", {})
        context["calibration"] = {  # every label from what was recorded (scales.json), not from defaults
            "method": scales.get("method"),
            "num_samples": scales.get("num_samples") or (scales.get("data") or {}).get("samples"),
            "scales": {name: entry["scale"] if isinstance(entry, dict) else entry for name, entry in tensors.items()},
        }
    from .registry import get_registry

    skipped_runs: list[str] = []
    for name, result in results.items():
        if not name.startswith("eval:"):
            continue
        evaluator = get_registry().evaluator(name.split(":", 1)[1])
        runs = json.loads(result.path("result").read_text())
        data = [run["data"] for run in runs if not run.get("skipped")]
        skipped_runs.extend(f"{name.removeprefix('eval:')} {run['label']}: skipped ({run['skipped']})"
                            for run in runs if run.get("skipped"))
        if evaluator.report_section and data:
            context[evaluator.report_section] = data[0] if evaluator.compares == "all" else data
    if "export" in results and "dense" in results["export"].outputs:  # [prune] / [distill]: the trade-off
        from .compress import table

        artefacts = [("dense FP32", results["export"].path("dense")), ("compressed FP32", results["optimize"].path("model"))]
        if "quantize" in results:
            artefacts.append(("compressed INT8", results["quantize"].path("model")))
        evaluated = next((item.get("data") for item in recipe.section("evaluators") if item.get("data")), None)
        context["compression"] = table(artefacts, evaluated or recipe.section("calibration").get("data"))
    built = [(n, r.outputs.get("skipped")) for n, r in results.items() if n.startswith("build:")]
    context["notes"] = [f"{n.removeprefix('build:')}: skipped ({why})" for n, why in built if why] + skipped_runs
    context["verdict"] = verdict(results, gates or [])
    return context


def verdict(results: dict[str, StepResult], gates: list[tuple[str, bool, str]]) -> dict[str, Any]:
    """What the report opens with: pass/fail against the gates, and per built artefact its precision, the
    headline metric (task top-1, else agreement / SQNR vs FP32) and its speed-up over FP32."""
    accuracy: dict[str, dict[str, Any]] = {}
    speedups: dict[str, float] = {}
    for name, result in results.items():
        if not name.startswith("eval:"):
            continue
        for run in json.loads(result.path("result").read_text()):
            data = run.get("data") or {}
            if "outputs" in data and run["label"] not in accuracy:
                accuracy[run["label"]] = data
            for row in data.get("models") or []:  # speed: one row per build, in build order
                if "speedup" in row:
                    speedups[str(row["model"])] = float(row["speedup"])
    rows = []
    for name, result in results.items():
        if not name.startswith("build:") or "model" not in result.outputs:
            continue
        label = name.removeprefix("build:")
        _, precision = label.split(":")
        data = accuracy.get(label, {})
        task = data.get("task") or {}
        if "candidate_top1" in task:
            metric = f"top-1 {task['candidate_top1']:.4f} (FP32 {task['reference_top1']:.4f})"
        elif "agreement" in task:
            metric = f"top-1 agreement with FP32 {task['agreement']:.4f}"
        else:
            measured = [m.get("sqnr_db") for m in (data.get("outputs") or {}).values() if isinstance(m, dict)]
            sqnr = [s for s in measured if isinstance(s, (int, float))]
            metric = f"SQNR {min(sqnr):.1f} dB vs FP32" if sqnr and len(sqnr) == len(measured) else "not measured"
        speedup = speedups.get(str(result.path("model")))
        rows.append([label, precision.upper(), metric, "not measured" if speedup is None else f"{speedup:.2f}x"])
    failed = [what for what, ok, _ in gates if not ok]
    if not gates:
        head = "NO GATES: nothing was judged"
    elif failed:
        head = f"FAIL: {len(failed)} of {len(gates)} gate(s) not met ({'; '.join(failed)})"
    else:
        head = f"PASS: all {len(gates)} gate(s) met"
    best = [row for row in rows if row[1] != "FP32"]
    if best:
        head += f". {best[0][0]}: {best[0][2]}, speed-up {best[0][3]} over FP32"
    return {"passed": not failed, "sentence": head, "columns": ["artefact", "precision", "headline metric",
                                                               "speed-up vs FP32"], "rows": rows}


# ---- run -----------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    output: Path
    results: dict[str, StepResult]
    gates: list[tuple[str, bool, str]]
    report: Path | None

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.gates)


def output_folder(recipe: Recipe, override: str | os.PathLike[str] | None = None) -> Path:
    """Where a run writes: `override`, else the recipe's [output] dir, else trtkit-run beside the recipe."""
    if override is not None:
        return Path(override)
    configured = recipe.section("output").get("dir")
    return Path(configured) if configured else recipe.folder / "trtkit-run"


def run_recipe(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, force: bool = False,
               log: Callable[[str], None] | None = None) -> RunResult:
    """Run every step of the recipe, reusing cached results whose key is unchanged."""
    recipe = load_recipe(path)
    threads = recipe.section("run").get("threads")
    if threads is not None:
        from .cpus import configure, requested

        if requested() is None:  # --threads on the command line wins (not part of any cache key)
            configure(threads)
    steps = plan(recipe)
    out = output_folder(recipe, output)
    results = run_steps(steps, out, force=force, log=log)
    gates = check_gates(recipe, results)
    report = publish(recipe, results, gates, out)
    return RunResult(out, results, gates, report)


def gate_error(result: RunResult) -> GateError | None:
    failed = [f"{name}: {detail}" for name, ok, detail in result.gates if not ok]
    return GateError("accuracy gate failed: " + "; ".join(failed)) if failed else None
