"""`trtkit build MODEL --builder NAME -o OUT` (with `--check` and `--list-options`).

Nothing heavy is imported here: the builders load onnx/onnxruntime/tensorrt inside their functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag, ThreadsFlag, options_flag, output_flag, parse_options

HELP_ORDER = 50


def build_command(
    model: Annotated[Path, typer.Argument(help="Input ONNX model (FP32 or QDQ).")],
    builder: Annotated[str | None, typer.Option("--builder", "-b", help="Builder: onnxruntime (the default), "
                                                "tensorrt, tensorrt-rtx, or one a plugin adds (see `trtkit plugins`).")] = None,
    output: Annotated[Path | None, output_flag("Artefact to write (default: next to MODEL: MODEL.ort.onnx or "
                                               "MODEL.<builder>.engine).")] = None,
    option: Annotated[list[str] | None, options_flag("Builder", "`--list-options` shows them")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only report which nodes the builder's parser "
                                        "supports (no build); exit code 1 when some are unsupported.")] = False,
    list_options: Annotated[bool, typer.Option("--list-options", help="Show the builder's options.")] = False,
    threads: ThreadsFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a runnable artefact: an optimized onnxruntime model or a TensorRT / TensorRT-RTX engine."""
    import json

    from trtkit.building import build, describe, get_builder
    from trtkit.building import check as check_model
    from trtkit.ui import console

    component = get_builder(builder)
    if list_options:
        _show_options(component, as_json)
        return
    options = parse_options(option)
    if check:
        report = check_model(model, builder=component.name)
        if as_json:
            typer.echo(json.dumps(report, indent=2, sort_keys=True))
        else:
            _show_check(report)
        if not report.get("supported"):
            from trtkit.errors import CheckFailed

            raise CheckFailed(f"{model}: not every node is supported by {component.name} (exit code 1)")
        return
    # TensorRT builds draw their own phase progress bars on a terminal (one rich live display at a time).
    written = build(model, output, builder=component.name, **options)
    # A builder without `describe` that writes no ONNX model has nothing to read back.
    info = describe(written) if component.describe is not None or written.suffix == ".onnx" else {}
    summary = _summary(info, written, component.name)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    from trtkit.fileio import described

    console.print(f"[green]built[/green] {described(written)} ({summary['bytes']:,} bytes) with {component.name}")
    for key in ("tensorrt", "precision", "profiles", "sidecar", "int8_weights"):
        if summary.get(key):
            console.print(f"  {key}: {_human(key, summary[key])}", markup=False)
    for note in summary.get("notes", []):
        if note.startswith("warning: "):
            console.print(f"[yellow]warning:[/yellow] {note.removeprefix('warning: ')}", markup=True)
        else:
            console.print(f"  [yellow]note:[/yellow] {note}")


def _summary(info: dict[str, Any], written: Path, builder: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"artifact": str(written), "bytes": written.stat().st_size}
    if info.get("kind") == "engine":
        summary.update({
            "builder": info.get("builder"),
            "tensorrt": f"{info.get('module')} {info.get('tensorrt_version')}",
            "precision": info.get("precision"),
            "profiles": info.get("profiles"),
            "inputs": info.get("inputs"),
            "outputs": info.get("outputs"),
            "sidecar": str(written.with_name(written.name + ".json")),
            "notes": info.get("notes", []),
        })
    else:
        build_info = info.get("build") or {}
        summary.update({
            "builder": build_info.get("builder", builder),
            "optimization": build_info.get("optimization"),
            "providers": build_info.get("providers"),
            "vnni": build_info.get("vnni"),
            "int8_weights": build_info.get("int8_weights"),
            "notes": build_info.get("notes", []),
        })
    return summary


def _human(key: str, value: Any) -> str:
    if key == "precision" and isinstance(value, dict):
        parts = ["QDQ (explicit INT8)" if value.get("qdq") else "no Q/DQ", f"mode {value.get('mode')}",
                 "flags " + (", ".join(value.get("flags") or []) or "none")]
        if value.get("strongly_typed"):
            parts.append("strongly typed")
        if value.get("layer_precisions"):
            parts.append(f"{len(value['layer_precisions'])} layer(s) pinned")
        if value.get("calibration"):
            parts.append(f"calibration from {value['calibration'].get('source')}")
        return "; ".join(parts)
    if key == "profiles" and isinstance(value, list):
        return "; ".join(
            f"{name}: " + ", ".join(f"{kind} {'x'.join(map(str, shapes[kind]))}" for kind in ("min", "opt", "max"))
            for profile in value for name, shapes in profile.items()
        )
    return str(value)


def _show_check(report: dict[str, Any]) -> None:
    from rich.table import Table

    from trtkit.ui import console, stdout

    where = report.get("tensorrt") or report.get("builder")
    if report.get("supported"):
        console.print(f"[green]supported:[/green] every node of {report['model']} parses in {where}")
        return
    if report.get("error"):
        console.print(f"[red]not supported:[/red] {report['error']}")
        return
    table = Table(title=f"{len(report['unsupported'])} node(s) of {report['model']} that {where} cannot parse")
    for column in ("#", "node", "op type", "reason"):
        table.add_column(column)
    for row in report["unsupported"]:
        table.add_row(str(row["index"]), row["node"], row["op_type"], row["reason"])
    stdout.print(table)


def _show_options(component: Any, as_json: bool) -> None:
    import json

    from trtkit.ui import stdout

    rows = [{"name": key, "type": opt.type, "default": opt.default, "choices": list(opt.choices or []) or None,
             "help": opt.help} for key, opt in component.options.items()]
    if as_json:
        typer.echo(json.dumps({"builder": component.name, "options": rows}, indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table(title=f"options of builder '{component.name}' (-O KEY=VALUE)")
    for column in ("name", "type", "default", "help"):
        table.add_column(column)
    for row in rows:
        help_text = row["help"] + (f" [{', '.join(map(str, row['choices']))}]" if row["choices"] else "")
        table.add_row(row["name"], row["type"], str(row["default"]), help_text)
    stdout.print(table)


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("build")(build_command)
