"""`trtkit prune SOURCE -i 1x3x224x224 -o OUT.onnx --ratio 0.3`: structured channel pruning, then export.

Nothing heavy is imported here: torch and torch_pruning load inside the command. Every option is checked
(ratios in (0, 1), layer names, the model traceable by the dependency graph) before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl
from trtkit.cli_args import JsonFlag, ThreadsFlag, output_flag, parse_options

HELP_ORDER = 15


def _layer_ratios(values: list[str] | None) -> dict[str, float]:
    from trtkit.errors import OptionError

    ratios: dict[str, float] = {}
    for value in values or []:
        name, sep, ratio = value.rpartition("=")
        try:
            ratios[name] = float(ratio)
        except ValueError:
            raise OptionError(f"--layer-ratio {value!r}: expected NAME=RATIO, e.g. features.3=0.5") from None
        if not sep or not name:
            raise OptionError(f"--layer-ratio {value!r}: expected NAME=RATIO, e.g. features.3=0.5")
    return ratios


def prune_command(
    source: Annotated[str, typer.Argument(help="A model factory: file.py:factory or package.module:factory.")],
    output: Annotated[Path, output_flag("Pruned ONNX file to write.")],
    input_shape: Annotated[str, typer.Option("--input", "-i", help="Example input shape, e.g. 1x3x224x224 "
                                             "(traced by the dependency graph, then exported).")],
    criterion: Annotated[str | None, typer.Option("--criterion", "-c", help="Pruning criterion (default l1; "
                                                  "`trtkit plugins` lists them).")] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of each layer's channels removed, "
                                                "in (0, 1).")] = None,
    layer_ratio: Annotated[list[str] | None, typer.Option("--layer-ratio", help="NAME=RATIO for one layer "
                                                          "(repeatable).")] = None,
    global_ranking: Annotated[bool, typer.Option("--global", help="Rank channels of all layers together.")] = False,
    target_flops: Annotated[float | None, typer.Option("--target-flops", help="Prune until the MACs are at most "
                                                       "this fraction of the original, e.g. 0.7.")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer whose output channels are kept "
                                                     "(repeatable).")] = None,
    round_to: Annotated[int | None, typer.Option("--round-to", help="Keep channel counts multiples of this "
                                                 "(8 suits TensorRT).")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Calibration samples .npy: data-driven "
                                              "criteria (taylor) rank with them and the removed channels' means "
                                              "are folded into the next layers' biases.")] = None,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Refit the layers that lost inputs to the "
                                              "unpruned network's outputs on --data (least squares).")] = False,
    keep_coupled: Annotated[bool, typer.Option("--keep-coupled", help="Leave residual streams and Concat "
                                               "branches alone.")] = False,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="State dict to load first.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-O", help="Criterion option KEY=VALUE "
                                                     "(repeatable).")] = None,
    save_torch: Annotated[Path | None, typer.Option("--save-torch", help="Also write the pruned torch module "
                                                    "(torch.save) for fine-tuning.")] = None,
    threads: ThreadsFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove channels of a torch model (Torch-Pruning dependency graph) and export the smaller network."""
    from trtkit import pruning
    from trtkit.exporting import export
    from trtkit.plugins.torch_export import load_checkpoint, parse_shape, resolve_module
    from trtkit.ui import console

    shape = parse_shape(input_shape)
    ratios = _layer_ratios(layer_ratio)
    samples = None
    if data is not None:
        from trtkit.distill import load_samples

        samples = load_samples(data)
    module, where = resolve_module(source)
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    import torch

    with console.status(f"pruning {where}", spinner="dots"):
        pruned, report = pruning.prune(
            module.eval(), torch.zeros(shape), criterion=criterion, ratio=ratio, ratios=ratios,
            global_ranking=global_ranking, target_flops=target_flops, ignore=list(ignore or []),
            round_to=round_to, data=samples, options=parse_options(option), reconstruct=reconstruct,
            keep_coupled=keep_coupled)
    with console.status(f"exporting {output}", spinner="dots"):
        export(pruned, output, input_shapes=[shape], dynamic_batch=True)
    if save_torch is not None:
        pruning.save(pruned, save_torch)
    report["output"] = str(output)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    from trtkit.fileio import described

    console.print(f"[green]pruned[/green] {described(output)}: MACs {report['after']['macs']:,} "
                  f"({report['macs_fraction']:.1%} of {report['before']['macs']:,}), params "
                  f"{report['after']['params']:,} ({report['params_fraction']:.1%}), criterion {report['criterion']}, "
                  f"{len(report['narrowed'])} layers narrowed")


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("prune")(prune_command)
