"""Artefact bytes are pinned against tests/data/golden_artifacts.json (written by tests/golden.py)."""

from __future__ import annotations

from golden import pinned, produce


def test_artifacts_match_the_pinned_bytes(tmp_path):
    expected = pinned()
    got = produce(tmp_path / "run")
    assert set(got) == set(expected)
    changed = sorted(name for name in got if got[name] not in expected[name])
    assert not changed, f"artefact bytes changed: {changed}"
