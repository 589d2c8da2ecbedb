"""`trtkit export SOURCE -o OUT.onnx` and `trtkit optimize IN.onnx -o OUT.onnx --pass NAME ...`.

Nothing heavy is imported here: torch, onnx and onnxruntime load inside the API functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _parse_inputs(values: list[str] | None) -> dict[str, str] | list[str] | None:
    """`--input NAME:1x3x64x64` (or just `1x3x64x64`) -> {name: shape} (or a list of shapes)."""
    if not values:
        return None
    named = [v.partition(":") for v in values]
    if all(sep for _, sep, _ in named):
        return {name.strip(): shape.strip() for name, _, shape in named}
    if any(sep for _, sep, _ in named):
        from ..errors import OptionError

        raise OptionError("--input: give every input as NAME:SHAPE, or every input as SHAPE only")
    return list(values)


def _parse_ranges(values: list[str] | None) -> dict[str, tuple[float, float]]:
    from ..errors import OptionError

    ranges: dict[str, tuple[float, float]] = {}
    for value in values or []:
        name, sep, bounds = value.partition("=")
        low, comma, high = bounds.partition(",")
        try:
            if not sep or not comma:
                raise ValueError
            ranges[name.strip()] = (float(low), float(high))
        except ValueError:
            raise OptionError(f"--range expects NAME=LOW,HIGH, got {value!r}") from None
    return ranges


def _parse_dims(values: list[str] | None) -> dict[str, int]:
    from ..errors import OptionError

    dims: dict[str, int] = {}
    for value in values or []:
        name, sep, size = value.partition("=")
        try:
            if not sep:
                raise ValueError
            dims[name.strip()] = int(size)
        except ValueError:
            raise OptionError(f"--dim expects NAME=SIZE, got {value!r}") from None
    return dims


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        source: Annotated[str, typer.Argument(help="A model factory: file.py:factory or package.module:factory "
                                              "(a callable returning a torch.nn.Module).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")],
        inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="Input NAME:SHAPE, e.g. "
                                                         "image:1x3x224x224 (repeatable, in order).")] = None,
        output_names: Annotated[list[str] | None, typer.Option("--output-name", help="Output name (repeatable, "
                                                               "in order).")] = None,
        dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Axis 0 of inputs and outputs is "
                                                    "dynamic ('batch').")] = False,
        opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 17).")] = None,
        method: Annotated[str | None, typer.Option("--exporter", help="auto, dynamo or torchscript (auto: dynamo "
                                                   "when onnxscript is installed).")] = None,
        checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="State dict to load (torch.load "
                                                        "weights_only=True).")] = None,
        exporter: Annotated[str, typer.Option("--with", help="Exporter plugin.")] = "torch",
        option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Exporter option KEY=VALUE "
                                                         "(repeatable).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Export a trained model to ONNX, check it, and compare onnxruntime with the framework."""
        from ..exporting import export
        from ..ui import console
        from . import parse_key_values

        options = parse_key_values(option, "--option")
        parsed = _parse_inputs(inputs)
        with console.status(f"exporting {source}", spinner="dots"):
            artifact = export(
                source, output, exporter=exporter, input_shapes=parsed,
                output_names=list(output_names) if output_names else None,
                dynamic_batch=True if dynamic_batch else None, opset=opset, method=method,
                checkpoint=checkpoint, options=options,
            )
        info = dict(artifact.metadata.get("export", {}))
        summary = {
            "output": str(output), "exporter": info.get("exporter"), "opset": info.get("opset"),
            "nodes": len(artifact.model.graph.node), "max_abs_diff": info.get("max_abs_diff"),
            "inputs": info.get("inputs"), "outputs": [o.name for o in artifact.model.graph.output],
            "dynamic_axes": info.get("dynamic_axes"),
        }
        if as_json:
            typer.echo(json.dumps(summary, indent=2, sort_keys=True))
            return
        diff = summary["max_abs_diff"]
        console.print(
            f"[green]exported[/green] {output} ({summary['nodes']} nodes, {summary['exporter']} exporter, "
            f"opset {summary['opset']})"
            + (f"; onnxruntime vs torch max |diff| {diff:.2e}" if diff is not None else "")
        )

    @app.command("optimize")
    def optimize_command(
        model: Annotated[Path | None, typer.Argument(help="Input ONNX model (never modified).",
                                                     show_default=False)] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Optimized ONNX file to write.",
                                                    show_default=False)] = None,
        passes: Annotated[list[str] | None, typer.Option("--pass", "-p", help="Pass to run, in order "
                                                         "(repeatable; default: simplify, optimize).")] = None,
        option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Pass option KEY=VALUE or "
                                                         "PASS.KEY=VALUE (repeatable).")] = None,
        no_check: Annotated[bool, typer.Option("--no-check", help="Skip the numerical check after each pass.")]
        = False,
        ranges: Annotated[list[str] | None, typer.Option("--range", help="Input value range for the check, "
                                                         "NAME=LOW,HIGH (default -1,1).")] = None,
        dims: Annotated[list[str] | None, typer.Option("--dim", help="Size of a symbolic dimension for the "
                                                       "check, NAME=SIZE (default 1).")] = None,
        rtol: Annotated[float | None, typer.Option("--rtol", help="Check tolerance relative to max |output| "
                                                   "(default 1e-3).")] = None,
        atol: Annotated[float | None, typer.Option("--atol", help="Absolute check tolerance (default 1e-4).")]
        = None,
        threshold: Annotated[list[float] | None, typer.Option("--threshold", help="Probability threshold(s) to "
                                                              "convert to logits (with remove-sigmoid).")] = None,
        list_passes: Annotated[bool, typer.Option("--list", help="List the available passes and options.")]
        = False,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Rewrite an ONNX graph with passes; each pass is checked numerically; prints a summary table."""
        from ..errors import OptionError
        from ..optimizing import DEFAULT_ATOL, DEFAULT_PASSES, DEFAULT_RTOL, optimize
        from ..ui import console, stdout
        from . import parse_key_values

        if list_passes:
            _list_passes(as_json)
            return
        if model is None or output is None:
            raise OptionError("optimize needs MODEL and -o OUTPUT (or --list to see the passes)")
        if no_check and (rtol is not None or atol is not None or ranges):
            raise OptionError("--no-check contradicts --rtol/--atol/--range (they only set the check)")
        selected: list[Any] = list(passes) if passes else list(DEFAULT_PASSES)
        options = parse_key_values(option, "--option")
        if threshold:
            if "remove-sigmoid" not in selected:
                raise OptionError("--threshold needs --pass remove-sigmoid (thresholds become logits only when "
                                  "the Sigmoid is removed)")
            if len(threshold) == 1:
                options["remove-sigmoid.threshold"] = threshold[0]
            else:
                raise OptionError("--threshold: give one value, or per-output values with "
                                  '-O thresholds=\'{"NAME": P}\'')
        duplicates = sorted({name for name in selected if selected.count(name) > 1})
        if duplicates and any("." in key and key.split(".")[0] in duplicates for key in options):
            raise OptionError(f"pass '{duplicates[0]}' is selected twice; PASS.KEY options would be ambiguous")
        result = optimize(
            model, selected, output=output, check=not no_check, options=options,
            rtol=DEFAULT_RTOL if rtol is None else rtol, atol=DEFAULT_ATOL if atol is None else atol,
            ranges=_parse_ranges(ranges), dims=_parse_dims(dims), progress=True,
        )
        data = result.to_dict()
        if as_json:
            typer.echo(json.dumps(data, indent=2, sort_keys=True))
            return
        console.print(result.table())
        if any(r.checked == "by the pass" for r in result.reports):
            console.print("* checked by the pass itself against its exact relation (outputs change by design)")
        for name, entry in sorted(result.thresholds.items()):
            stdout.print(f"threshold {name}: probability {entry['probability']:g} -> logit {entry['logit']:.6g}")
        preprocess = result.artifact.metadata.get("preprocess")
        if preprocess and any(r.name == "fuse-preprocess" for r in result.reports):
            convs = ", ".join(f["conv"] for f in preprocess.get("folded_into", []))
            console.print(f"fused preprocessing of input '{preprocess['input']}' into {convs}; the model now takes "
                          f"raw input in {preprocess.get('raw_range')}")
        console.print(f"[green]wrote[/green] {output} ({data['nodes_before']} -> {data['nodes_after']} nodes)")


def _list_passes(as_json: bool) -> None:
    from ..optimizing import DEFAULT_PASSES
    from ..registry import get_registry
    from ..ui import stdout

    passes = get_registry().stages["passes"]
    rows = [{
        "name": name, "description": p.description, "default": name in DEFAULT_PASSES, "exact": p.exact,  # type: ignore[attr-defined]
        "options": {k: {"type": o.type, "default": o.default, "help": o.help} for k, o in p.options.items()},
    } for name, p in sorted(passes.items())]
    if as_json:
        typer.echo(json.dumps({"passes": rows, "default": DEFAULT_PASSES}, indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table(title="graph passes (default: " + ", ".join(DEFAULT_PASSES) + ")")
    for column in ("pass", "description", "options"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["description"], ", ".join(row["options"]))
    stdout.print(table)
