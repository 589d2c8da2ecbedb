"""The option schema shared by the `tensorrt` and `tensorrt-rtx` builders (light: loaded at start-up)."""

from __future__ import annotations

from trtkit.stages import Option

PRECISIONS = ("auto", "fp32", "fp16", "int8", "best")
LAYER_PRECISIONS = ("fp32", "fp16", "int8")

OPTIONS: dict[str, Option] = {
    "precision": Option(
        "str", "auto", choices=PRECISIONS,
        help="auto: the graph decides (Q/DQ nodes); fp16/int8/best set builder flags (TensorRT <= 10 only)",
    ),
    "min_shapes": Option("str", None, help="profile minimum shapes, trtexec style: 'x:1x3x224x224,y:...'"),
    "opt_shapes": Option("str", None, help="profile optimum shapes (default: max_shapes)"),
    "max_shapes": Option("str", None, help="profile maximum shapes"),
    "max_batch": Option("int", 1, help="max (and opt) of a dynamic first dim not given in *_shapes"),
    "workspace_mb": Option("int", None, help="workspace memory pool limit in MiB"),
    "timing_cache": Option("path", None, help="timing cache file: loaded when it exists, saved after the build"),
    "calibration_cache": Option("path", None, help="implicit INT8 calibration cache (TensorRT <= 10, DLA)"),
    "calibration_data": Option(
        "path", None, help=".npz (one array per input) or .npy batches fed to a calibrator (TensorRT <= 10)",
    ),
    "calibrator": Option("str", "entropy", choices=("entropy", "minmax"), help="calibrator class"),
    "calibration_batch_size": Option("int", 8, help="batch size fed to the calibrator"),
    "layer_precisions": Option(
        "str", None, help="keep layers in a precision: 'node_or_glob:fp32,conv*:fp16' (TensorRT <= 10)",
    ),
    "dla_core": Option("int", None, help="build for this DLA core (Jetson); needs fp16 or int8"),
    "gpu_fallback": Option("bool", True, help="let layers DLA cannot run fall back to the GPU"),
    "strongly_typed": Option("bool", False, help="strongly typed network (TensorRT 10; always on for 11/RTX)"),
    "compute_capability": Option(
        "list", None, help="target GPUs for TensorRT-RTX ahead-of-time builds, e.g. sm86,sm89 (default: all)",
    ),
    "optimization_level": Option("int", None, help="builder optimization level 0..5"),
    "sparse_weights": Option("bool", False, help="BuilderFlag.SPARSE_WEIGHTS: let 2:4 sparse weights run on sparse "
                             "tensor cores (Ampere+; mask them with the sparse-2of4 pass)"),
}
