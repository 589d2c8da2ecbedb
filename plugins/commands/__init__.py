"""trtkit's built-in commands, one module per command. Each module implements the `register_commands` hook and
is named by its own entry point in the `trtkit` group, exactly like a third-party command.

A module's optional `HELP_ORDER` (an int) places its commands in `trtkit --help`; built-ins use pipeline order
(export 10 ... init 90); modules without one come after them, in loading order.

Command modules are loaded at start-up: they import typer and typing only; everything heavy (the stage code,
onnx, torch, rich tables) is imported inside the command functions.
"""
