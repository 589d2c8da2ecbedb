"""Meta-tests (as datasette has): every hook is documented with its exact signature and has a test."""

from __future__ import annotations

import inspect
from pathlib import Path

from trtkit import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hook_functions() -> dict[str, object]:
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("register_")}


def signature_text(name: str, fn: object) -> str:
    sig = inspect.signature(fn)  # annotations stay strings (from __future__ import annotations)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {sig.return_annotation}"


def test_there_are_eight_hooks():
    assert sorted(hook_functions()) == [
        "register_builders", "register_calibrators", "register_commands", "register_engines", "register_evaluators",
        "register_exporters", "register_passes", "register_pruning_criteria",
    ]


def test_every_hook_is_documented_with_its_exact_signature():
    docs = (ROOT / "docs" / "hooks.md").read_text()
    for name, fn in hook_functions().items():
        assert f"## {name}" in docs, f"docs/hooks.md has no section for {name}"
        assert signature_text(name, fn) in docs, f"docs/hooks.md: signature of {name} differs from hookspecs.py"


def test_every_hook_has_a_test():
    sources = "\n".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py")
                        if path.name != Path(__file__).name)
    sources += "".join((ROOT / "tests" / helper).read_text() for helper in ("plugin_dists.py", "process_engine.py"))
    for name in hook_functions():
        assert f"def {name}(" in sources, f"no test implements the hook {name}"
