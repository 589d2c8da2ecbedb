"""Artefact bytes are pinned against tests/data/golden_artifacts.json (written by tests/golden.py)."""

from __future__ import annotations

import json

from golden import GOLDEN, produce


def test_artifacts_match_the_pinned_bytes(tmp_path):
    expected = json.loads(GOLDEN.read_text())
    got = produce(tmp_path / "run")
    assert set(got) == set(expected)
    changed = sorted(name for name in got if got[name] != expected[name])
    assert not changed, f"artefact bytes changed: {changed}"
