"""Flag families shared by the commands, each declared once (the style of Polygraphy's tools/args): a command
takes a family by annotating a parameter with it, so every command spells a knob the same way, with the same
short flag, type and parsing.

    from trtkit.cli_args import DataFlag, JsonFlag, OptionsFlag, output_flag, parse_options

    def my_command(model: Path, data: DataFlag, output: Annotated[Path, output_flag("Report to write.")],
                   option: OptionsFlag = None, as_json: JsonFlag = False) -> None:
        options = parse_options(option)

Command modules (built-in or third-party) import this at start-up, so nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .errors import OptionError

# Output: what a command prints.
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


def output_flag(help: str) -> Any:
    """`--output/-o`: the file (or folder) a command writes; `help` says what it is."""
    return typer.Option("--output", "-o", help=help, show_default=False)


# Component options: KEY=VALUE strings, validated later against the chosen component's schema.
def options_flag(component: str, note: str = "") -> Any:
    """`--option/-O KEY=VALUE` (repeatable) for the options of the chosen `component` kind."""
    return typer.Option("--option", "-O", help=f"{component} option KEY=VALUE (repeatable{'; ' + note if note else ''}).")


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """The values of `--option` as {key: string value}."""
    return parse_key_values(pairs, "--option")


# Task metrics: what "accurate" means for an output (detection scores, boxes, probability maps).
TaskMetricFlag = Annotated[list[str] | None, typer.Option(
    "--task-metric", help="Task metric 'KIND key=value ...' (positives, boxes, map; repeatable), "
    "e.g. 'positives output=output0 axis=1 start=4 threshold=0.25'.",
)]


# Threads: every command that runs a model takes it; it applies while the command line is parsed, before
# numpy, torch or onnxruntime load (trtkit.cpus), so every pool (onnxruntime, BLAS/OpenMP, torch) gets it.
def _apply_threads(value: int | None) -> int | None:
    if value is not None:
        from .cpus import configure

        configure(value)
    return value


ThreadsFlag = Annotated[int | None, typer.Option(
    "--threads", help="Threads for onnxruntime, BLAS and torch (default: the CPUs this process may use, "
    "honouring taskset and container limits).", callback=_apply_threads, show_default=False,
)]


# Execution: where the heavy loops run (trtkit.engine). One worker and no address: in this process, and no
# engine is looked up or imported; more, or an address: the default engine plugin (Ray), checked usable.
WorkersFlag = Annotated[int | None, typer.Option(
    "--workers", help="Run on this many workers of the execution engine (Ray; pip install 'trtkit[ray]'), "
    "each one CPU, on shards of the data; results identical to one worker. Default: 1, in this process.",
    show_default=False,
)]
RayAddressFlag = Annotated[str | None, typer.Option(
    "--ray-address", help="Run on the Ray cluster at this address (`ray start --head` prints it; 'auto': the "
    "one on this machine). Without --workers: every CPU of the cluster.", show_default=False,
)]


def execution(workers: int | None, address: str | None) -> Any:
    """The `trtkit.engine.Execution` of --workers / --ray-address (checked: a one-line error if not usable)."""
    from .engine import Execution

    return Execution.create(workers=workers, address=address,
                            where="--ray-address" if address and workers is None else "--workers")


# Data: the samples a command runs the model on.
DataFlag = Annotated[str | None, typer.Option("--data", "-d", help="Samples: .npy, .npz or a folder of images.")]
BatchSizeFlag = Annotated[int, typer.Option("--batch-size", "-b", help="Samples per run of the model.")]
CastFlag = Annotated[bool, typer.Option("--cast", help="Accept integer data for float inputs (cast as is; "
                                         "refused without it).")]
NumSamplesFlag = Annotated[int | None, typer.Option("--num-samples", "-n", help="Use at most this many samples.")]
PreprocessFlag = Annotated[list[str] | None, typer.Option(
    "--preprocess", "-P", help="Image preprocessing KEY=VALUE: resize, crop, scale, mean, std, channels, layout."
)]


def parse_preprocess(pairs: list[str] | None) -> dict[str, Any] | None:
    """The values of `--preprocess` as {key: string value}; None when none were given."""
    return parse_key_values(pairs, "--preprocess") or None


def parse_key_values(pairs: list[str] | None, flag: str = "--option") -> dict[str, Any]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"} (values stay strings; components parse them by schema)."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{flag} expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = value
    return result
