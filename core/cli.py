"""The `trtkit` command line.

Start-up must stay fast: this module imports typer, rich and the plugin registry only. Plugins are loaded
before the command line is parsed, so `--no-plugin NAME` and `--debug` are read from argv first. Every
command but `plugins` comes from a plugin's `register_commands` hook, the built-in ones (trtkit.plugins.commands)
exactly like a third party's; `plugins` stays here so that a broken command plugin can still be diagnosed.

Exit codes, one scheme for every command (trtkit.errors, docs/index.md#exit-codes): 0 ok; 1 a check or gate
failed (CheckFailed) or an internal error; 2 bad input or usage (TrtkitError, click usage errors), one line;
130 interrupted (Ctrl-C, SIGTERM), one line. A traceback only with --debug.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer on top of click
    from click import ClickException  # type: ignore[no-redef,assignment]  # click is there when e.g. ray is

from . import __version__
from .cli_args import JsonFlag
from .cpus import configure as configure_threads
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, CheckFailed, TrtkitError
from .fileio import raise_on_sigterm
from .registry import Registry, load_plugins, set_registry
from .stages import STAGES

HELP = """From a trained network to a fast, accurate edge deployment through ONNX and TensorRT.

Pipeline: export -> optimize -> calibrate -> quantize -> build -> eval, or all of it with `trtkit run`."""

# Where the commands of a plugin module without a HELP_ORDER go in `trtkit --help`: after the built-ins.
DEFAULT_HELP_ORDER = 100


def _version_callback(value: bool) -> None:
    if value:
        from .registry import get_registry

        lines = [f"trtkit {__version__}"]
        for info in get_registry().plugins.values():
            if not info.builtin:
                lines.append(f"  plugin {info.name} {info.version or '?'} ({info.distribution or info.module})")
        typer.echo("\n".join(lines))
        raise typer.Exit()


def build_app(registry: Registry) -> typer.Typer:
    app = typer.Typer(
        help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def root(
        version: Annotated[
            bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show versions.")
        ] = False,
        debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
        no_plugin: Annotated[
            list[str] | None, typer.Option("--no-plugin", help="Do not load this plugin (repeatable).")
        ] = None,
    ) -> None:
        """trtkit"""

    @app.command("plugins")
    def plugins_command(
        as_json: JsonFlag = False,
        hook: Annotated[str | None, typer.Option("--hook", help="Only plugins implementing this hook.")] = None,
    ) -> None:
        """List installed plugins and what each registers per stage."""
        show_plugins(registry, as_json, hook)

    # Commands are listed in `trtkit --help` in the order they are added: by their module's HELP_ORDER
    # (the built-ins set pipeline order), then in loading order.
    impls = registry.pm.hook.register_commands.get_hookimpls()
    for impl in sorted(impls, key=lambda impl: getattr(impl.plugin, "HELP_ORDER", DEFAULT_HELP_ORDER)):
        added = len(app.registered_commands), len(app.registered_groups)
        try:
            impl.function(cli=app)
        except Exception as exc:  # a broken plugin's command must not take the CLI down; none of it is kept
            del app.registered_commands[added[0]:]
            del app.registered_groups[added[1]:]
            print(f"warning: plugin '{impl.plugin_name}' commands skipped: {exc}", file=sys.stderr)
    return app


def show_plugins(registry: Registry, as_json: bool, hook: str | None) -> None:
    hooks = {f"register_{stage}" for stage in STAGES} | {"register_commands"}
    if hook is not None and hook not in hooks:
        from .errors import unknown_name

        raise unknown_name("hook", hook, hooks)
    infos = [i for i in registry.plugins.values() if hook is None or hook in i.hooks]
    rows: list[dict[str, Any]] = [
        {
            "name": info.name,
            "version": info.version,
            "distribution": info.distribution,
            "source": "builtin" if info.builtin else "third-party",
            "module": info.module,
            "hooks": info.hooks,
            "registers": {stage: sorted(names) for stage, names in sorted(info.components.items())},
        }
        for info in infos
    ]
    if as_json:
        typer.echo(json.dumps({"plugins": rows, "problems": registry.problems}, indent=2))
        return
    from rich.table import Table

    from .ui import stdout

    table = Table(title="trtkit plugins")
    for column in ("name", "version", "distribution", "source", "registers"):
        table.add_column(column)
    for row in rows:
        registers = "\n".join(f"{stage}: {', '.join(names)}" for stage, names in row["registers"].items())
        if "register_commands" in row["hooks"]:
            registers = (registers + "\n" if registers else "") + "commands"
        table.add_row(row["name"], row["version"] or "", row["distribution"] or "", row["source"], registers)
    stdout.print(table)
    for problem in registry.problems:
        stdout.print(f"[yellow]skipped:[/yellow] {problem}")


def _flag_values(argv: list[str], flag: str) -> list[str]:
    values = []
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trtkit` script. Returns (and exits with) the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    raise_on_sigterm()
    configure_threads()  # before numpy/torch/onnxruntime load: their pools use the CPUs this process may use
    code = 0
    try:
        registry = load_plugins(block=_flag_values(argv, "--no-plugin"))
        set_registry(registry)
        command = typer.main.get_command(build_app(registry))
        # Without standalone mode, click returns the code of `typer.Exit(code)` instead of raising it.
        returned = command.main(args=argv, prog_name="trtkit", standalone_mode=False)
        if isinstance(returned, int):
            code = returned
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a silent Exit(130), returned here
            print(interrupted_line(argv), file=sys.stderr)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print(interrupted_line(argv), file=sys.stderr)
        code = EXIT_INTERRUPTED
    except ClickException as exc:
        if debug:
            raise
        print(f"error: {exc.format_message()}", file=sys.stderr)
        code = EXIT_USAGE
    except CheckFailed as exc:
        if debug:
            raise
        print(f"FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        code = EXIT_FAILED
    except TrtkitError as exc:
        if debug:
            raise
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        code = EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)",
              file=sys.stderr)
        code = EXIT_FAILED
    sys.exit(code)


def interrupted_line(argv: list[str]) -> str:
    """The one line printed on Ctrl-C / SIGTERM: which command stopped, and that nothing earlier was touched."""
    values_of = {"--no-plugin"}  # root options that take a value: skip it
    words = [arg for index, arg in enumerate(argv)
             if not arg.startswith("-") and (index == 0 or argv[index - 1] not in values_of)]
    command = words[0] if words else "command"
    return (f"interrupted: trtkit {command} stopped; no partial file was written and earlier artefacts are "
            f"intact (exit code {EXIT_INTERRUPTED})")


if __name__ == "__main__":
    main()
