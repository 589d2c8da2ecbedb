"""`trtkit init [RECIPE]`: write a commented starter recipe (the built-in plugins as examples)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trtkit import hookimpl

HELP_ORDER = 80


def init_command(
    output: Annotated[Path, typer.Argument(help="Recipe file to write.")] = Path("recipe.toml"),
    onnx: Annotated[str | None, typer.Option("--onnx", help="Start from this ONNX file.")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Start from a torch factory "
                                               "'file.py:factory' or 'package.module:factory'.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter recipe for your model."""
    from trtkit.errors import OptionError
    from trtkit.fileio import write_text
    if output.exists() and not force:
        raise OptionError(f"{output} exists; pass --force to overwrite it")
    if onnx is not None and source is not None:
        raise OptionError("give --onnx or --source, not both")
    if onnx is not None:
        from trtkit.model import ModelArtifact

        ModelArtifact.load(onnx)  # a missing or damaged model is a one-line error now, not at `trtkit run`
    write_text(output, starter_recipe(onnx=onnx, source=source))
    from trtkit.fileio import described

    typer.echo(f"wrote {described(output)}; check it with: trtkit run {output} --dry-run")


def starter_recipe(onnx: str | None = None, source: str | None = None) -> str:
    """A commented recipe covering every section, for `trtkit init`."""
    if onnx is not None:
        model = f'onnx = "{onnx}"                 # the FP32 model to deploy'
    else:
        model = (f'source = "{source or "my_model.py:build_model"}"   # a function returning a trained torch '
                 'module\n# checkpoint = "weights.pt"         # loaded with torch.load(weights_only=True)\n'
                 'exporter = "torch"\n\n[model.options]\ninput_names = ["input"]\noutput_names = ["output"]\n'
                 'input_shapes = { input = [1, 3, 224, 224] }\ndynamic_batch = true               # axis 0 is "batch"\nopset = 17')
    return f"""# trtkit recipe. Run it with: trtkit run recipe.toml   (--dry-run prints the plan)
# Every key is checked: a typo is an error naming the key and its section. Paths are relative to this file.

[model]
{model}

# Graph passes, in order (default: simplify, optimize). `trtkit plugins` lists every installed pass.
[[passes]]
name = "simplify"

[[passes]]
name = "optimize"

# [[passes]]
# name = "fuse-preprocess"          # fold /255, mean/std and BGR<->RGB into the first Conv
# options = {{ scale = 0.00392156862745098, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }}

# [[passes]]
# name = "remove-sigmoid"           # drop the trailing Sigmoid; thresholds become logits

# INT8 calibration. Remove this section for an FP32/FP16-only deployment.
[calibration]
data = "calibration.npy"            # .npy (first axis = samples), .npz (keys = input names) or an image folder
method = "percentile"               # percentile, entropy (TensorRT's), minmax, mse, or a plugin's calibrator
# options = {{ percentile = 99.99 }}
# overrides = "pinned-scales.json"  # tensor -> amax pinned by you; the calibrator fills the rest
# cache = true                      # also write a TensorRT calibration cache (TensorRT <= 10, DLA)
# trt_version = "10.3.0"

[quantize]
per_channel = true
# exclude = ["/head/conv/Conv"]     # node names kept in float (see `trtkit eval layers`)
# exclude_op_types = ["Softmax"]

[[builders]]
name = "onnxruntime"                # runs anywhere

# [[builders]]
# name = "tensorrt"                 # on a machine with NVIDIA TensorRT and a GPU (Jetson: JetPack)
# optional = true
# options = {{ workspace_mb = 1024 }}

# [[evaluators]]
# name = "accuracy"
# data = "test_inputs.npy"
# labels = "test_labels.npy"

[[evaluators]]
name = "speed"

# [gates]
# max_accuracy_drop = 0.01          # INT8 top-1 within 1 point of FP32 (needs labels)
# min_top1_agreement = 0.99
# min_sqnr_db = 20.0

[report]
title = "trtkit report"

# [output]
# dir = "trtkit-run"
"""


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    cli.command("init")(init_command)
