"""Built-in stage subcommands. Each module defines `register(app)`; core/cli.py calls them in order.

Helpers shared by the stage commands live here; nothing heavy is imported at module level.
"""

from __future__ import annotations

from typing import Any

from ..errors import OptionError

STAGE_COMMAND_MODULES = ("export", "quantize", "build", "eval", "run")


def parse_key_values(pairs: list[str] | None, flag: str = "--option") -> dict[str, Any]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"} (values stay strings; components parse them by schema)."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{flag} expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = value
    return result
