"""The package's shape (issue 13): no import cycles, and a core that names no built-in plugin.

Both checks read the source with `ast` (nothing is imported for the walk), so they see every import a module
can run: module level, inside functions, under `if TYPE_CHECKING:`, relative or absolute, and `from pkg import
sub` where `sub` is a submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"  # the package trtkit
PLUGINS = ROOT / "plugins"  # the package trtkit.plugins
PACKAGES = ((CORE, "trtkit"), (PLUGINS, "trtkit.plugins"))


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of trtkit and trtkit.plugins."""
    modules = {}
    for folder, package in PACKAGES:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def lazy_attributes() -> dict[str, str]:
    """trtkit's lazy public API (core/__init__.py `_LAZY`: name -> module): `from trtkit import calibrate`
    imports trtkit.calibration on first use, so it is an edge to that module."""
    for node in ast.parse((CORE / "__init__.py").read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_LAZY" and node.value is not None:
            return dict(ast.literal_eval(node.value))
    return {}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its source)."""
    lazy = lazy_attributes()

    def known(name: str) -> str | None:
        """The module `name` loads: itself, a lazy attribute's module, or the nearest enclosing module."""
        if name in modules:
            return name
        package, _, attribute = name.rpartition(".")
        if package == "trtkit" and attribute in lazy:
            return lazy[attribute]
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    # `from pkg import sub` loads pkg.sub; `from mod import name` loads mod
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else known(full) if base == "trtkit" else known(base))
        graph[name] = {target for target in targets if target is not None and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(following) == 1:
                return path[path.index(following):] + [following]
            elif not state.get(following):
                state[following] = 1
                path.append(following)
                stack.append(iter(sorted(graph.get(following, ()))))
    return None


def test_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_walker_sees_function_level_relative_and_submodule_imports():
    graph = import_graph(package_modules())
    assert "trtkit.plugins.calibrators.entropy" in graph
    # function-level relative import (core/qat.py calibrate: `from .calibration import ...`)
    assert "trtkit.calibration" in graph["trtkit.qat"]
    # `from .hookspecs import hookimpl` (relative, module level), `from trtkit import metrics` (a submodule),
    # `from trtkit import hookimpl` (a name of the package: the package itself)
    assert "trtkit.hookspecs" in graph["trtkit"]
    assert "trtkit.metrics" in graph["trtkit.plugins.evaluators.speed"]
    assert {"trtkit", "trtkit.stages", "trtkit.plugins.calibrators.entropy"} <= graph["trtkit.plugins.calibrators"]


def test_no_import_cycles():
    graph = import_graph(package_modules())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# ---- core names no built-in plugin ---------------------------------------------------------------------

# String literals in core/*.py that equal a built-in plugin's name but do not refer to the plugin. Each entry is
# (file, literal): the reason. An entry that no longer matches anything fails the test, so the list stays short.
NOT_PLUGIN_REFERENCES = {
    ("recipe.py", "mse"): "the recipe schema's [distill] mse key (the weight of the output MSE), not the mse "
                          "calibrator",
    ("__init__.py", "optimize"): "public API name trtkit.optimize (the optimize stage's function), not the "
                                 "onnxruntime graph-optimization pass",
    ("__init__.py", "equalize"): "public API name trtkit.equalize: a lazy re-export of the ptq plugin's "
                                 "function kept for `from trtkit import equalize`; it looks up no pass",
    ("cpus.py", "torch"): "sys.modules key of the torch library (thread count), not the torch exporter",
    ("optimizing.py", "onnxruntime"): "OptimizeReport.checked value: the core's own numerical check of a pass "
                                      "ran on onnxruntime (trtkit.runtime); not the onnxruntime builder",
    ("pipeline.py", "optimize"): "the recipe's [optimize] section and step name, not the pass",
    ("pipeline.py", "report"): "the recipe's [report] section and the step output key, not the report evaluator",
    ("recipe.py", "optimize"): "the recipe schema's [optimize] section, not the pass",
    ("recipe.py", "report"): "the recipe schema's [report] section, not the report evaluator",
    ("pipeline.py", "recenter"): "the [quantize] key passed to the scales builder as its option, not the pass",
    ("recipe.py", "recenter"): "the recipe schema's [quantize] recenter key (a builder option), not the pass",
    ("pipeline.py", "smooth"): "the [quantize] key passed to the scales builder as its option, not the pass",
    ("recipe.py", "smooth"): "the recipe schema's [quantize] smooth key (a builder option), not the pass",
}


def builtin_plugin_names(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Name -> what it names, for every component and entry point of the built-in plugins."""
    from trtkit.registry import load_plugins
    from trtkit.stages import STAGES

    monkeypatch.setenv("TRTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # built-ins only
    monkeypatch.delenv("TRTKIT_BLOCK_PLUGINS", raising=False)
    registry = load_plugins()
    assert not registry.problems, registry.problems
    names = {}
    for plugin in registry.plugins.values():
        assert plugin.builtin
        # entry points named after a stage ('passes', 'calibrators', 'evaluators') share the name of the
        # registry's stage key, which is the core's own hookspec vocabulary: those are not plugin references
        if plugin.name not in STAGES:
            names[plugin.name] = f"plugin entry point {plugin.module}"
    for stage, components in registry.stages.items():
        for name in components:
            names[name] = f"{stage} component"
    return names


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every str constant in the file except docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_core_names_no_builtin_plugin(monkeypatch):
    names = builtin_plugin_names(monkeypatch)
    # sanity: the registry really held the built-ins this test is about
    assert {"entropy", "minmax", "fuse-preprocess", "tensorrt", "speed"} <= set(names)
    found = []
    allowed_used = set()
    for path in sorted(CORE.glob("*.py")):  # core/examples/ is the bundled example, not the core
        for line, value in string_literals(path):
            if value not in names:
                continue
            if (path.name, value) in NOT_PLUGIN_REFERENCES:
                allowed_used.add((path.name, value))
            else:
                found.append(f"core/{path.name}:{line}: {value!r} ({names[value]})")
    assert not found, "core names built-in plugins:\n" + "\n".join(found)
    stale = set(NOT_PLUGIN_REFERENCES) - allowed_used
    assert not stale, f"allow-list entries that match nothing any more (remove them): {sorted(stale)}"
