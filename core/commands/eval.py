"""`trtkit eval NAME MODELS...`: run an evaluator (accuracy, speed, layers, report, jetson, or a plugin's).

Exit codes: 0 all gates passed; 3 the evaluation ran but a tolerance gate failed (for CI); 2 bad input
(unknown evaluator, option, file, mismatching models) as for every command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import parse_key_values

GATE_FAILED_EXIT_CODE = 3


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        name: Annotated[str, typer.Argument(help="Evaluator: accuracy, speed, layers, report, jetson, ...")],
        models: Annotated[list[Path], typer.Argument(help="Artefacts; for comparisons the first is the reference.")],
        data: Annotated[str | None, typer.Option("--data", help="Evaluation inputs (.npy, .npz, folder).")] = None,
        option: Annotated[
            list[str] | None, typer.Option("-O", "--option", help="Evaluator option KEY=VALUE (repeatable).")
        ] = None,
        output: Annotated[
            Path | None, typer.Option("-o", "--output", help="Write the report (report) or the JSON result here.")
        ] = None,
        runtime_kernels: Annotated[
            bool | None,
            typer.Option("--runtime-kernels/--emulate-qdq",
                         help="QDQ models on onnxruntime's int8 kernels, or with Q/DQ emulated in float."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
    ) -> None:
        """Measure artefacts: accuracy (gates: exit code 3 on failure), speed, per-layer error, reports."""
        from ..evaluation import evaluate, to_json
        from ..fileio import write_text
        from ..registry import get_registry
        from ..ui import console, stdout

        evaluator = get_registry().evaluator(name)
        options = parse_key_values(option, "-O/--option")
        if data is not None:
            options["data"] = data
        if runtime_kernels is not None:
            options["runtime_kernels"] = runtime_kernels
        writes_output = "output" in evaluator.options and evaluator.options["output"].type == "path"
        if output is not None and writes_output:
            options["output"] = str(output)
        result = evaluate(name, [str(m) for m in models], **options)
        if output is not None and not writes_output:
            write_text(output, to_json({"evaluator": name, "passed": result.passed, "data": result.data}) + "\n")
        if as_json:
            stdout.print(to_json({"evaluator": name, "passed": result.passed, "data": result.data}),
                         markup=False, highlight=False)
        if result.summary:
            console.print(result.summary, markup=False, highlight=False, soft_wrap=True)
        if not result.passed:
            console.print(f"FAILED: evaluator '{name}' gates not met (exit code {GATE_FAILED_EXIT_CODE})",
                          markup=False, highlight=False)
            # SystemExit, not typer.Exit: the core runs click with standalone_mode=False, which turns
            # typer.Exit into a return value that trtkit.cli.main does not propagate.
            raise SystemExit(GATE_FAILED_EXIT_CODE)
