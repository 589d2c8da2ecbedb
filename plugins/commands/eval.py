"""`trtkit eval NAME MODELS...`: run an evaluator (accuracy, speed, layers, report, jetson, or a plugin's).

Exit codes, as for every command (trtkit.errors): 0 all gates passed; 1 the evaluation ran but a tolerance gate
failed (for CI); 2 bad input (unknown evaluator, option, file, mismatching models); 130 interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from trtkit import hookimpl
from trtkit.cli_args import (
    DataFlag,
    JsonFlag,
    RayAddressFlag,
    TaskMetricFlag,
    ThreadsFlag,
    WorkersFlag,
    options_flag,
    output_flag,
    parse_options,
)

HELP_ORDER = 60


def eval_command(
    name: Annotated[str, typer.Argument(help="Evaluator: accuracy, speed, layers, report, jetson, ...")],
    models: Annotated[list[Path], typer.Argument(help="Artefacts; for comparisons the first is the reference.")],
    data: DataFlag = None,
    option: Annotated[list[str] | None, options_flag("Evaluator")] = None,
    output: Annotated[Path | None, output_flag("Write the report (report) or the JSON result here.")] = None,
    runtime_kernels: Annotated[
        bool | None,
        typer.Option("--runtime-kernels/--emulate-qdq",
                     help="QDQ models on onnxruntime's int8 kernels, or with Q/DQ emulated in float."),
    ] = None,
    task_metric: TaskMetricFlag = None,
    threads: ThreadsFlag = None,
    workers: WorkersFlag = None,
    ray_address: RayAddressFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure artefacts: accuracy (gates: exit code 1 on failure), speed, per-layer error, reports."""
    from trtkit.evaluation import evaluate, to_json
    from trtkit.fileio import write_text
    from trtkit.registry import get_registry
    from trtkit.ui import console, stdout

    evaluator = get_registry().evaluator(name)
    if output is not None:
        from trtkit.fileio import check_output_path

        check_output_path(output, *models, data)
    options = parse_options(option)
    if data is not None:
        options["data"] = data
    if runtime_kernels is not None:
        options["runtime_kernels"] = runtime_kernels
    if task_metric:
        if "task_metrics" in options:
            from trtkit.errors import OptionError

            raise OptionError("give task metrics with --task-metric or with -O task_metrics, not both")
        options["task_metrics"] = task_metric
    if workers is not None or ray_address is not None:  # evaluators that can run on workers declare the options
        if "workers" not in evaluator.options:
            from trtkit.errors import OptionError

            raise OptionError(f"evaluator '{name}' runs in this process only (no --workers / --ray-address)")
        if workers is not None:
            options["workers"] = workers
        if ray_address is not None:
            options["address"] = ray_address
    writes_output = "output" in evaluator.options and evaluator.options["output"].type == "path"
    if output is not None and writes_output:
        options["output"] = str(output)
    result = evaluate(name, [str(m) for m in models], **options)
    if output is not None and not writes_output:
        write_text(output, to_json({"evaluator": name, "passed": result.passed, "data": result.data}) + "\n")
    if as_json:
        stdout.print(to_json({"evaluator": name, "passed": result.passed, "data": result.data}),
                     markup=False, highlight=False, soft_wrap=True)
    if not show_tables(result.data):
        console.print(result.summary, markup=False, highlight=False, soft_wrap=True)
    if output is not None:
        from trtkit.fileio import described

        console.print(f"wrote {described(output)}", markup=False, highlight=False, soft_wrap=True)
    if not result.passed:
        from trtkit.errors import GateError

        raise GateError(f"evaluator '{name}' gates not met (exit code 1)")


def _number(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def show_tables(data: dict[str, Any]) -> bool:
    """Rich tables on stderr for accuracy and speed results; False when the data is of another kind."""
    from rich.table import Table

    from trtkit.ui import console  # not squeezed into 80 columns when stderr is not a terminal (trtkit.ui)
    candidates = data.get("candidates")
    runs: list[Any] = candidates if isinstance(candidates, list) else [data]
    if all("outputs" in run and "checks" in run for run in runs):
        for run in runs:
            # the title on its own line: a table title is wrapped to the table's width, whatever the console's
            console.print(f"{Path(str(run['candidate'])).name} vs {Path(str(run['reference'])).name} "
                          f"({run['mode']}, {run['num_samples']} samples)", markup=False, highlight=False,
                          soft_wrap=True)
            table = Table()
            for column in ("output", "cosine", "SQNR dB", "max |err|", "mean |err|", "p99 |err|", "max rel"):
                table.add_column(column, justify="left" if column == "output" else "right")
            for name, m in run["outputs"].items():
                table.add_row(name, _number(m["cosine"], 6), _number(m["sqnr_db"]), _number(m["max_abs"]),
                              _number(m["mean_abs"]), _number(m["p99_abs"]), _number(m["max_rel"]))
            console.print(table)
            task = run.get("task") or {}
            if "agreement" in task:
                console.print(f"top-1 agreement {_number(task['agreement'])}; on the confident subset "
                              f"({_number(task['confident_fraction'], 3)} of samples) "
                              f"{_number(task['confident_agreement'])}", markup=False, highlight=False, soft_wrap=True)
            for key in sorted(k for k in task if k.startswith(("reference_top", "candidate_top"))):
                console.print(f"{key} {_number(task[key])}", markup=False, highlight=False, soft_wrap=True)
            if run.get("task_metrics"):
                from trtkit.plugins.evaluators.accuracy import task_metric_lines

                for line in task_metric_lines(run["task_metrics"]):
                    console.print(line, markup=False, highlight=False, soft_wrap=True)
            if run["checks"]:
                checks = Table(title="tolerances")
                for column in ("output", "metric", "value", "limit", "result"):
                    checks.add_column(column)
                for c in run["checks"]:
                    checks.add_row(c["output"], c["metric"], _number(c["value"], 6), f"{c['op']} {c['limit']:g}",
                                   "pass" if c["passed"] else "[red]FAIL[/red]")
                console.print(checks)
        return True
    models = data.get("models")
    if isinstance(models, list) and models and all("latency" in m for m in models):
        table = Table(title=f"latency (ms), batch {', '.join(sorted({str(m['batch']) for m in models}))}")
        for column in ("model", "mode", "iters", "median", "mean", "p90", "p99", "min", "max", "CoV", "qps",
                       "speed-up"):
            table.add_column(column, justify="left" if column in ("model", "mode") else "right")
        for m in models:
            lat = m["latency"]
            table.add_row(Path(str(m["model"])).name, m["mode"], str(m["iterations"]),
                          *(f"{lat[k]:.3f}" for k in ("median_ms", "mean_ms", "p90_ms", "p99_ms", "min_ms", "max_ms")),
                          f"{lat['cov']:.1%}", f"{m['throughput_qps']:.1f}", f"{m.get('speedup', 1.0):.2f}x")
        console.print(table)
        for m in models:
            for key, value in (m.get("split") or {}).items():
                console.print(f"{Path(str(m['model'])).name} {key}: median {value['median_ms']:.3f} ms",
                              markup=False, highlight=False, soft_wrap=True)
            if m.get("jetson"):
                j = m["jetson"]
                console.print(f"{Path(str(m['model'])).name}: {j['mean_power_w']:.2f} W, "
                              f"{j['energy_per_inference_mj']:.3f} mJ/inference ({j['samples_in_run']} tegrastats "
                              f"samples, {j['summary']['power_source']})", markup=False, highlight=False, soft_wrap=True)
            if m.get("unstable"):
                console.print(f"[yellow]warning:[/yellow] {Path(str(m['model'])).name}: unstable timings "
                              f"(CoV {m['latency']['cov']:.1%}); pin threads (-O threads=N) or run longer", soft_wrap=True)
            from trtkit.plugins.evaluators.speed import cpu_int8_note

            note = cpu_int8_note(m)
            if note:
                console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
        for failed in data.get("failed") or []:  # artefacts that could not run; the others are above
            console.print(f"FAILED {Path(str(failed['model'])).name}: {failed['error']}", markup=False,
                          highlight=False, soft_wrap=True)
        return True
    return False


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("eval")(eval_command)
