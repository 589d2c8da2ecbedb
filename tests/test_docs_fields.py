"""docs/plugins.md's field table lists every component field of trtkit.stages with its exact declared type."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from trtkit import stages

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| `(.+?)` \| (.+?) \| (.+) \|$")


def documented() -> dict[tuple[str, str], str]:
    """(class, field) -> type, from the table rows of the "Every field and its exact type" section."""
    text = DOC.read_text().split("### Every field and its exact type", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows[(match[1], match[2])] = match[3].replace("\\|", "|")
    return rows


def declared() -> dict[tuple[str, str], str]:
    """(class, field) -> type as annotated in core/stages.py; Component's own fields only under Component."""
    shared = {field.name for field in dataclasses.fields(stages.Component)}
    fields = {("Component", field.name): str(field.type) for field in dataclasses.fields(stages.Component)}
    for cls in stages.STAGES.values():
        for field in dataclasses.fields(cls):
            if field.name not in shared:
                fields[(cls.__name__, field.name)] = str(field.type)
    return fields


def test_every_component_field_documented_with_its_type():
    docs, code = documented(), declared()
    assert len(code) > 20  # the dataclasses were read
    missing = sorted(set(code) - set(docs))
    extra = sorted(set(docs) - set(code))
    wrong = sorted(f"{key}: docs {docs[key]!r}, code {code[key]!r}" for key in set(docs) & set(code)
                   if docs[key] != code[key])
    assert not missing and not extra and not wrong, f"missing {missing}; not in code {extra}; wrong types {wrong}"
