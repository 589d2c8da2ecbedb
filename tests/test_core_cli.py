"""The command line: one-line errors with exit code 2, --debug tracebacks, fast start."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli

HEAVY = ("torch", "onnxruntime", "onnx", "tensorrt", "tensorrt_rtx", "matplotlib", "onnx_graphsurgeon", "ray")


def test_help_lists_every_stage_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("plugins", "export", "optimize", "calibrate", "quantize", "build", "eval", "run"):
        assert f"  {command} " in result.stdout or f"  {command}\n" in result.stdout, command


def test_user_errors_are_one_line_with_exit_code_2():
    for args in (("no-such-command",), ("plugins", "--hook", "register_nothing"), ("plugins", "--bogus")):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "plugins", "--hook", "register_nothing")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UnknownNameError" in result.stderr


def test_start_up_imports_no_heavy_module():
    """`trtkit --help` and `trtkit plugins` load every plugin but none of the heavy libraries."""
    for args in (["--help"], ["plugins"]):
        code = (
            "import sys\n"
            "from trtkit.cli import main\n"
            f"sys.argv = ['trtkit', *{args!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "HEAVY []" in result.stderr, (args, result.stderr[-500:])


def test_help_lists_the_built_in_commands_in_pipeline_order():
    """Every command is a plugin; the built-ins' HELP_ORDER keeps `trtkit --help` in pipeline order."""
    result = run_cli("--help")
    listed = [line.split()[0] for line in result.stdout.split("Commands:", 1)[1].splitlines() if line.strip()]
    pipeline = ["plugins", "export", "optimize", "calibrate", "quantize", "build", "inspect", "eval", "run", "init"]
    assert [name for name in listed if name in pipeline] == pipeline, listed


def test_a_broken_command_plugin_is_reported_and_skipped(capsys):
    import typer

    from trtkit.cli import build_app
    from trtkit.hookspecs import hookimpl
    from trtkit.registry import load_plugins

    class BrokenCommands:
        @staticmethod
        def register_commands(cli):
            @cli.command("half-added")
            def half_added() -> None:
                """Registered before the failure."""

            raise RuntimeError("cannot add my second command")

    BrokenCommands.register_commands = hookimpl(BrokenCommands.register_commands)
    command = typer.main.get_command(build_app(load_plugins(extra_modules=[BrokenCommands])))
    stderr = capsys.readouterr().err
    assert "warning: plugin 'BrokenCommands' commands skipped: cannot add my second command" in stderr
    listed = set(command.commands)  # type: ignore[attr-defined]
    assert {"plugins", "export", "calibrate", "build", "eval", "run"} <= listed and "half-added" not in listed
