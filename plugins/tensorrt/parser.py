"""The network and the ONNX parser: parse errors per node (ONNX name + op type), and the capability check
that lists what the parser rejects before a long build."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from trtkit.errors import BuildError, InputFileError, OptionError

from .module import import_trt, is_rtx, make_logger, product, strongly_typed_only, version_tuple

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass
class ParseIssue:
    node_index: int
    node_name: str
    op_type: str
    message: str

    def describe(self) -> str:
        name = self.node_name or f"#{self.node_index}"
        return f"node '{name}' ({self.op_type or '?'}): {self.message}"


def parser_issues(parser: Any) -> list[ParseIssue]:
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = _call(error, "node", -1)
        issues.append(ParseIssue(
            node_index=int(node) if node is not None else -1,
            node_name=str(_call(error, "node_name", "") or ""),
            op_type=str(_call(error, "node_operator", "") or ""),
            message=" ".join(str(_call(error, "desc", "") or "").split()),
        ))
    return issues


def _call(obj: Any, name: str, default: Any) -> Any:
    """Parser errors grew node_name()/node_operator() in TensorRT 10; older parsers lack them."""
    method = getattr(obj, name, None)
    if method is None:
        return default
    try:
        return method()
    except Exception:
        return default


def _onnx_nodes(model_path: Path) -> list[tuple[str, str]]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [(node.name, node.op_type) for node in model.graph.node]


def _fill_names(issues: list[ParseIssue], model_path: Path) -> None:
    """Older parsers report only the node index: look up the ONNX node name and op type."""
    if all(i.node_name and i.op_type for i in issues):
        return
    nodes = _onnx_nodes(model_path)
    for issue in issues:
        if 0 <= issue.node_index < len(nodes):
            name, op = nodes[issue.node_index]
            issue.node_name = issue.node_name or name
            issue.op_type = issue.op_type or op


def create_network(module: ModuleType, builder: trt.Builder, strongly_typed: bool) -> trt.INetworkDefinition:
    flags = 0
    creation = module.NetworkDefinitionCreationFlag
    major = version_tuple(module)[0]
    if not is_rtx(module) and major < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed and not strongly_typed_only(module):
        if not hasattr(creation, "STRONGLY_TYPED"):
            raise OptionError(f"option 'strongly_typed': {product(module)} has no strongly typed networks (TensorRT >= 9.2)")
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return builder.create_network(flags)


def parse_onnx(module: ModuleType, builder: trt.Builder, network: trt.INetworkDefinition, logger: Any,
               model_path: Path) -> Any:
    """Parse the ONNX file into `network`; BuildError listing every failing node by ONNX name and op type."""
    parser = module.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(model_path))
    if not ok:
        issues = parser_issues(parser)
        _fill_names(issues, model_path)
        detail = "; ".join(i.describe() for i in issues) or "; ".join(logger.errors()[-3:]) or "unknown error"
        raise BuildError(f"{model_path}: {product(module)} parser failed: {detail}")
    return parser


def check_capability(builder_name: str, model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Which nodes the TensorRT parser supports, before a long build. Raises BuildError when no TensorRT."""
    from trtkit.model import ModelArtifact

    module = import_trt(builder_name)
    path = check_model_file(model_path)
    model = ModelArtifact.load(path).model
    logger = make_logger(module)
    builder = module.Builder(logger)
    network = create_network(module, builder, strongly_typed=False)
    parser = module.OnnxParser(network, logger)
    nodes = [(node.name, node.op_type) for node in model.graph.node]
    if hasattr(parser, "supports_model_v2"):
        supported = bool(parser.supports_model_v2(path.read_bytes(), str(path)))
    else:  # TensorRT 8.6
        supported = bool(parser.supports_model(path.read_bytes(), str(path))[0])
    issues = parser_issues(parser)
    _fill_names(issues, path)
    by_index: dict[int, ParseIssue] = {}
    for issue in issues:
        by_index.setdefault(issue.node_index, issue)
    # Ops the parser has no importer for, even where the first failure hid them.
    for index, (name, op) in enumerate(nodes):
        if index not in by_index and hasattr(parser, "supports_operator") and not parser.supports_operator(op):
            by_index[index] = ParseIssue(index, name, op, "no importer for this operator")
    unsupported = [
        {"index": i.node_index, "node": i.node_name, "op_type": i.op_type, "reason": i.message}
        for _, i in sorted(by_index.items())
    ]
    return {
        "model": str(path),
        "builder": builder_name,
        "tensorrt": product(module),
        "nodes": len(nodes),
        "supported": supported and not unsupported,
        "unsupported": unsupported,
        "unsupported_op_types": sorted({u["op_type"] for u in unsupported}),
    }


def check_model_file(model_path: str | os.PathLike[str]) -> Path:
    path = Path(model_path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.suffix.lower() != ".onnx":
        raise InputFileError(f"{path}: expected an ONNX model (.onnx)")
    return path
