"""Make real installed distributions (a module plus a .dist-info with entry_points.txt) in a folder.

This is the on-disk layout pip produces; putting the folder on PYTHONPATH makes importlib.metadata discover
the entry points for real, so plugin tests exercise the true discovery path without pip's slowness.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_distribution(folder: Path, dist: str, modules: dict[str, str], version: str = "0.1.0") -> Path:
    """Write `modules` (module name -> source) and a dist-info whose `trtkit` entry points name them."""
    folder.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    entry_points = "\n".join(f"{module} = {module}" for module in modules)
    (info / "entry_points.txt").write_text(f"[trtkit]\n{entry_points}\n")
    (info / "RECORD").write_text("")
    return folder


GOOD = """
    from trtkit import hookimpl
    from trtkit.stages import Calibrator, Option

    def max_abs(stats, margin=1.0):
        return float(max(abs(stats.min), abs(stats.max))) * margin

    @hookimpl
    def register_calibrators(register):
        register(Calibrator(name="max-abs", description="largest |x| seen, times a margin",
                            options={"margin": Option("float", 1.0, "multiplier")}, compute_amax=max_abs))

    @hookimpl
    def register_commands(cli):
        @cli.command("hello-plugin")
        def hello() -> None:
            '''Say hello from a plugin.'''
            print("hello from good_plugin")

        @cli.command("exit-with")
        def exit_with(code: int) -> None:
            '''Exit with CODE (checks that command exit codes reach the shell).'''
            import typer

            raise typer.Exit(code)
"""

BROKEN_IMPORT = """
    raise RuntimeError("this plugin is broken on purpose")
"""

ALPHA = """
    from trtkit import hookimpl
    from trtkit.stages import GraphPass

    @hookimpl
    def register_passes(register):
        register(GraphPass(name="shared-name", description="alpha's pass", apply=lambda artifact: artifact))
"""

BETA = """
    from trtkit import hookimpl
    from trtkit.stages import Builder, GraphPass

    @hookimpl
    def register_builders(register):
        register(Builder(name="beta-builder", description="never registered: beta is skipped whole"))

    @hookimpl
    def register_passes(register):
        register(GraphPass(name="shared-name", description="beta's pass, a clash", apply=lambda a: a))
"""

WRONG_TYPE = """
    from trtkit import hookimpl

    @hookimpl
    def register_calibrators(register):
        register({"name": "not-a-component"})
"""
