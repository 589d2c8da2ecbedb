"""Progress bars: on a terminal `track` draws a rich bar (rate column included); elsewhere it stays silent."""

from __future__ import annotations

import io
import sys

from trtkit import ui


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_track_on_a_terminal_yields_everything(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(ui.track(range(50), total=50, description="calibrating")) == list(range(50))
    assert list(ui.track(iter(range(3)), description="unknown total")) == [0, 1, 2]


def test_track_is_silent_off_a_terminal(capsys):
    assert list(ui.track(range(3), total=3)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
