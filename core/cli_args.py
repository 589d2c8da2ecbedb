"""Flags shared by the commands, declared once (the style of Polygraphy's tools/args).

Command modules (built-in or third-party) import these at start-up, so nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Any

from .errors import OptionError


def parse_key_values(pairs: list[str] | None, flag: str = "--option") -> dict[str, Any]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"} (values stay strings; components parse them by schema)."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{flag} expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = value
    return result
