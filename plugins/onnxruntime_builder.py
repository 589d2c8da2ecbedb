"""Built-in plugin: the `onnxruntime` builder (the embedded default, runs anywhere onnxruntime runs).

Writes the model as onnxruntime optimizes it (session option `optimized_model_filepath`) at a chosen graph
optimization level, for the chosen execution providers, with the build facts in the trtkit metadata.

QDQ models on x86 CPUs without VNNI: onnxruntime fuses DequantizeLinear -> Conv/MatMul -> QuantizeLinear into
u8 x s8 kernels whose pair sums saturate int16 there (AVX2 VPMADDUBSW), which gives badly wrong outputs.
By default (`no_vnni=requantize`) the builder requantizes int8 weights to 7 bits (reduced range, [-64, 63]),
where the pair sums cannot saturate; `no_vnni=refuse` stops with a clear message instead; `no_vnni=ignore`
keeps the 8-bit weights. Which one happened is recorded in the output's metadata (`build.int8_weights`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from trtkit import hookimpl
from trtkit.errors import BuildError, InputFileError, OptionError, first_line, unknown_name
from trtkit.stages import Builder, Option, Runner

LEVELS = ("disable", "basic", "extended", "all")
OPTIONS = {
    "optimization": Option("str", "extended", choices=LEVELS,
                           help="graph optimization level; 'all' adds layout transforms tied to this CPU"),
    "threads": Option("int", None, help="intra-op threads used while optimizing (and recorded for running)"),
    "providers": Option("list", None, help="execution providers, e.g. CPUExecutionProvider,CUDAExecutionProvider"),
    "no_vnni": Option("str", "requantize", choices=("requantize", "refuse", "ignore"),
                      help="QDQ models on an x86 CPU without VNNI: 7-bit weights, refuse, or keep 8-bit"),
    "vnni": Option("str", "auto", choices=("auto", "yes", "no"),
                   help="does the target CPU have VNNI (auto: detect on this machine)"),
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def cpu_has_vnni(cpuinfo: str | None = None) -> bool | None:
    """True/False on x86 Linux (from /proc/cpuinfo flags); None when it cannot tell (not x86, no cpuinfo)."""
    import platform

    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
            return None
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return None
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def requantize_reduced_range(artifact: Any) -> tuple[Any, list[str]]:
    """A copy whose int8 weights feeding DequantizeLinear use 7 bits: q' = round(q * 63/127), scale * 127/63.

    The dequantized weights change by at most half a 7-bit step; returns (artifact, names requantized).
    Weights shared with non-DequantizeLinear consumers, and non-int8 weights, are left as they are.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    from trtkit.graph import GraphIndex

    result = artifact.copy()
    index = GraphIndex(result.model.graph)
    inits = index.initializers

    def only_dequantized(name: str) -> bool:
        return all(reader.op_type == "DequantizeLinear" for reader in index.readers(name))

    done: list[str] = []
    for node in result.model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[0] in done:
            continue
        weight = inits[node.input[0]]
        if weight.data_type != TensorProto.INT8 or not only_dequantized(weight.name):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        scale_proto = inits[node.input[1]]
        if not only_dequantized(scale_proto.name):
            continue
        q = result.tensor(weight).astype(np.int32)
        zero = None
        if len(node.input) > 2 and node.input[2] in inits:
            zero = result.tensor(node.input[2]).astype(np.int32)
            if np.any(zero != 0):
                continue  # asymmetric weights: not what TensorRT-style QDQ produces; leave them
        q7 = np.clip(np.round(q * (63.0 / 127.0)), -64, 63).astype(np.int8)
        scale = result.tensor(scale_proto)
        new_scale = (scale.astype(np.float64) * (127.0 / 63.0)).astype(scale.dtype)
        weight.CopyFrom(numpy_helper.from_array(q7, weight.name))
        scale_proto.CopyFrom(numpy_helper.from_array(new_scale, scale_proto.name))
        done.append(weight.name)
    return result, done


def _has_qdq(model: Any) -> bool:
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def build(model: str | os.PathLike[str], output: str | os.PathLike[str], *, optimization: str = "extended",
          threads: int | None = None, providers: list[str] | None = None, no_vnni: str = "requantize",
          vnni: str = "auto") -> Path:
    import onnxruntime as ort

    from trtkit.fileio import check_output_path, sha256_file
    from trtkit.model import ModelArtifact
    from trtkit.runtime import session, session_options

    source = Path(model)
    artifact = ModelArtifact.load(source)
    out = check_output_path(output, source)
    if out.suffix.lower() != ".onnx":
        raise OptionError(f"output {out}: the onnxruntime builder writes an ONNX model (use a .onnx name)")
    providers = list(providers or ["CPUExecutionProvider"])
    have = ort.get_available_providers()
    for provider in providers:
        if provider not in have:
            raise OptionError(f"option 'providers': {unknown_name('execution provider', provider, have)}")
    if threads is not None and threads < 1:
        raise OptionError("option 'threads' must be >= 1")

    notes: list[str] = []
    has_vnni = {"yes": True, "no": False}.get(vnni, cpu_has_vnni())
    build_info: dict[str, Any] = {
        "builder": "onnxruntime",
        "onnxruntime_version": ort.__version__,
        "optimization": optimization,
        "providers": providers,
        "threads": threads,
        "vnni": has_vnni,
        "source": {"file": source.name, "sha256": sha256_file(source)},
    }
    if _has_qdq(artifact.model) and "CPUExecutionProvider" in providers[:1]:
        if has_vnni is False and no_vnni == "refuse":
            raise BuildError(
                f"{source}: QDQ model on an x86 CPU without VNNI: onnxruntime's int8 kernels saturate here; "
                "use no_vnni=requantize (7-bit weights), run Q/DQ in float, or build on a VNNI/ARM target"
            )
        if has_vnni is False and no_vnni == "requantize":
            artifact, names = requantize_reduced_range(artifact)
            build_info["int8_weights"] = "reduced-range (7-bit): CPU without VNNI"
            build_info["requantized_weights"] = len(names)
            notes.append(f"CPU without VNNI: {len(names)} int8 weight tensor(s) requantized to 7 bits (reduced range) "
                         "so onnxruntime's int8 kernels do not saturate")
        elif has_vnni is False:
            build_info["int8_weights"] = "8-bit kept (no_vnni=ignore): int8 kernels may saturate on this CPU"
            notes.append("CPU without VNNI and no_vnni=ignore: int8 kernels may saturate; outputs can be wrong")
        else:
            build_info["int8_weights"] = "8-bit" + (" (VNNI)" if has_vnni else " (VNNI unknown: not x86)")
    if optimization == "all":
        notes.append("optimization=all adds CPU-specific layout transforms: run the result on this kind of CPU only")
    build_info["notes"] = notes

    with tempfile.TemporaryDirectory(prefix="trtkit-ort-") as folder:
        staged = Path(folder) / "input.onnx"
        artifact.save(staged)
        optimized = Path(folder) / "optimized.onnx"
        # The builder's model runs on onnxruntime's own kernels (int8 included), so Q/DQ is not emulated.
        options = session_options(emulate_qdq=False, threads=threads or None, optimization=optimization)
        options.optimized_model_filepath = str(optimized)
        if artifact.has_external_data():
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             "optimized.onnx.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
        try:
            ort.InferenceSession(str(staged), sess_options=options, providers=providers)
        except Exception as exc:
            raise BuildError(f"{source}: onnxruntime cannot optimize it: {first_line(exc)}") from None
        if not optimized.is_file():
            raise BuildError(f"{source}: onnxruntime wrote no optimized model")
        result = ModelArtifact.load(optimized)
        result.metadata = {**artifact.metadata, **result.metadata, "build": build_info}
        result.save(out)
    # Prove the written file loads (a model that does not load is not a build).
    session(out, emulate_qdq=False, threads=1, optimization="disable", providers=providers)
    if result.metadata.get("build") is None:  # pragma: no cover - defensive
        raise InputFileError(f"{out}: build metadata missing")
    return out


def load(path: str | os.PathLike[str], **options: Any) -> Runner:
    from trtkit.runners import OrtRunner

    path = Path(path)
    if path.suffix.lower() not in (".onnx", ".ort"):
        raise InputFileError(f"{path}: not an ONNX model")
    return OrtRunner(path, **options)


def check(model: Path) -> dict[str, Any]:
    """Builder.check: whether onnxruntime can load the model (the reason in "error" when it cannot)."""
    from trtkit.runtime import session

    path = Path(model)
    try:
        session(path, optimization="disable")
    except InputFileError as exc:
        return {"model": str(path), "builder": "onnxruntime", "supported": False, "unsupported": [],
                "error": str(exc)}
    return {"model": str(path), "builder": "onnxruntime", "supported": True, "unsupported": []}


def available() -> str | None:
    try:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime)"
    except (ImportError, ValueError):
        return "onnxruntime is not importable"
    return None


@hookimpl
def register_builders(register: Any) -> None:
    register(Builder(
        name="onnxruntime",
        description="onnxruntime-optimized ONNX model for the CPU (or CUDA/TensorRT execution providers)",
        options=OPTIONS, build=build, load=load, available=available, check=check, suffix=".ort.onnx", default=True,
    ))
