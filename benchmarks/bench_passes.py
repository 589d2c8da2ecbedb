"""Benchmark: trtkit's default graph passes against onnxslim and onnxsim on the same models.

    python -m benchmarks.bench_passes [--repeat 3] [--folder /tmp/trtkit-zoo] [--no-write]

Models: the zoo (benchmarks/models.py: resnet, mobilenet, yolo, transformer; static batch 1), the YOLO and
transformer zoo models with a dynamic batch, the zoo exported without torch's constant folding (BatchNorm
nodes and Constant chains kept, as other exporters produce), an LSTM sequence tagger (torch export) and a model with an If
node (onnx.helper). For every tool: node count after, wall time (median of --repeat runs, model loading
included, trtkit's numerical check off as the others do not check; trtkit with its check is a separate
column), max |output difference| against the original on realistic inputs (benchmarks.models.sample_inputs),
and failures (the tool raised, or its model does not load or run in onnxruntime).

Results go to the `passes` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import markdown_table, write_section
from benchmarks.models import ZOO_NAMES, build_zoo, sample_inputs


def lstm_model(path: Path) -> Path:
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(16, 32)
            self.lstm = torch.nn.LSTM(32, 32, num_layers=2, batch_first=True)
            self.fc = torch.nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(torch.relu(self.embed(x)))[0]).sigmoid()

    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tagger().eval(), (torch.zeros(1, 20, 16),), str(path), input_names=["x"],
                          output_names=["tags"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {1: "steps"}, "tags": {1: "steps"}})
    return path


def if_model(path: Path) -> Path:
    """A gated model: If(sum(x) > 0) picks one of two conv branches; constant-foldable parts around it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def const(name: str, value: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value), name)

    def branch(name: str, weight: str) -> Any:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", weight], [f"{name}_c"], pads=[1, 1, 1, 1]),
             helper.make_node("Identity", [f"{name}_c"], [f"{name}_i"]),
             helper.make_node("Relu", [f"{name}_i"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 8, 16, 16])])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["picked"], then_branch=branch("then", "w_then"),
                         else_branch=branch("else", "w_else")),
        helper.make_node("Mul", ["k1", "k2"], ["k"]),  # constant subgraph
        helper.make_node("Mul", ["picked", "k"], ["scaled"]),
        helper.make_node("Identity", ["scaled"], ["y"]),
    ]
    inits = [const("zero", np.float32(0)), const("w_then", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             const("w_else", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             const("k1", np.full((1, 8, 1, 1), 2.0, np.float32)), const("k2", np.full((1, 8, 1, 1), 0.5, np.float32))]
    graph = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_models(folder: Path) -> dict[str, Path]:
    models = dict(build_zoo(folder))
    dynamic = build_zoo(folder, names=["yolo", "transformer"], dynamic_batch=True)
    models.update({f"{name} (dynamic batch)": path for name, path in dynamic.items()})
    unfolded = build_zoo(folder, names=list(ZOO_NAMES), fold_constants=False)
    models.update({f"{name} (unfolded export)": path for name, path in unfolded.items()})
    models["lstm"] = lstm_model(folder / "lstm.onnx")
    models["if"] = if_model(folder / "if.onnx")
    return models


# ---- tools -------------------------------------------------------------------------------------------------
def run_trtkit(path: Path, check: bool = False) -> Any:
    from trtkit.optimizing import optimize

    return optimize(path, check=check).artifact.model


def run_onnxslim(path: Path) -> Any:
    import onnxslim

    return onnxslim.slim(str(path))


def run_onnxsim(path: Path) -> Any:
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return model


TOOLS: dict[str, Callable[[Path], Any]] = {
    "trtkit": run_trtkit,
    "trtkit+check": lambda path: run_trtkit(path, check=True),
    "onnxslim": run_onnxslim,
    "onnxsim": run_onnxsim,
}


def outputs(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    session = ort.InferenceSession(str(data) if isinstance(data, Path) else data, options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def feeds_for(path: Path) -> dict[str, np.ndarray]:
    feeds = sample_inputs(path, n=1, seed=0)
    if path.name.startswith("lstm"):
        feeds = {name: value.astype(np.float32) for name, value in feeds.items()}
    return feeds


def measure(tool: Callable[[Path], Any], path: Path, repeat: int, reference: dict[str, np.ndarray],
            feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    times, model = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = tool(path)
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return {"failure": f"raised {type(exc).__name__}: {line[:80]}"}
        times.append(time.perf_counter() - start)
    try:
        got = outputs(model, feeds)
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"failure": f"output does not run: {line[:80]}", "nodes": len(model.graph.node)}
    diff = max(float(np.max(np.abs(got[k].astype(np.float64) - ref))) if ref.size else 0.0
               for k, ref in reference.items())
    return {"nodes": len(model.graph.node), "seconds": statistics.median(times), "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trtkit-bench-") as tmp:
        folder = args.folder or Path(tmp)
        models = build_models(folder)
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for name, path in models.items():
            import onnx

            feeds = feeds_for(path)
            reference = outputs(path, feeds)
            original = len(onnx.load(str(path)).graph.node)
            results[name] = {"original": {"nodes": original}}
            for tool_name, tool in TOOLS.items():
                try:
                    results[name][tool_name] = measure(tool, path, args.repeat, reference, feeds)
                except Exception:  # the benchmark itself must finish; record the failure
                    results[name][tool_name] = {"failure": traceback.format_exc().strip().splitlines()[-1][:80]}
                print(name, tool_name, results[name][tool_name], flush=True)
    body = report(results, args.repeat)
    print(body)
    if not args.no_write:
        write_section("passes", "Graph passes: trtkit vs onnxslim vs onnxsim", body)


def cell(entry: dict[str, Any]) -> str:
    if "failure" in entry:
        return "FAILED"
    return f"{entry['nodes']}"


def report(results: dict[str, dict[str, dict[str, Any]]], repeat: int) -> str:
    tools = list(TOOLS)
    rows_nodes, rows_time, rows_err, failures = [], [], [], []
    wins = {"nodes": 0, "speed": 0, "total": 0}
    for name, by_tool in results.items():
        rows_nodes.append([name, by_tool["original"]["nodes"], *(cell(by_tool[t]) for t in tools)])
        rows_time.append([name, *("FAILED" if "failure" in by_tool[t] else f"{by_tool[t]['seconds'] * 1000:.0f}"
                                  for t in tools)])
        rows_err.append([name, *("FAILED" if "failure" in by_tool[t] else f"{by_tool[t]['max_abs_diff']:.1e}"
                                 for t in tools)])
        for t in tools:
            if "failure" in by_tool[t]:
                failures.append(f"- {name}, {t}: {by_tool[t]['failure']}")
        ours = by_tool["trtkit"]
        peers = [by_tool[t] for t in ("onnxslim", "onnxsim") if "failure" not in by_tool[t]]
        wins["total"] += 1
        if "failure" not in ours and all(ours["nodes"] <= p["nodes"] for p in peers):
            wins["nodes"] += 1
        slim = by_tool["onnxslim"]
        if "failure" not in ours and ("failure" in slim or ours["seconds"] <= slim["seconds"]):
            wins["speed"] += 1
    lines = [
        "Default passes (`simplify`, `optimize`) against onnxslim and onnxsim, each tool run on the model file "
        f"(load included), median of {repeat} runs. `trtkit` runs without its numerical check, like the others; "
        "`trtkit+check` is the default `trtkit optimize` (onnxruntime check after every pass). Max |diff| is "
        "against the original model on realistic inputs (`benchmarks.models.sample_inputs`).",
        "",
        f"Targets: node count no higher than the best peer on **{wins['nodes']}/{wins['total']}** models; at least "
        f"as fast as onnxslim on **{wins['speed']}/{wins['total']}**; trtkit failures: "
        f"**{sum(1 for r in results.values() for t in ('trtkit', 'trtkit+check') if 'failure' in r[t])}**.",
        "",
        "### Nodes after",
        "",
        markdown_table(["model", "original", *tools], rows_nodes),
        "",
        "### Time (ms)",
        "",
        markdown_table(["model", *tools], rows_time),
        "",
        "### Max |output difference| vs the original",
        "",
        markdown_table(["model", *tools], rows_err),
        "",
        "### Failures",
        "",
        "\n".join(failures) if failures else "none",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
