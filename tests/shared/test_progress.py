"""Progress of long steps when stderr is a log file, not a terminal."""

from __future__ import annotations

import pytest

from shared.runs import progress


def ticking_clock(monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    """``time.monotonic`` advancing ``step_s`` seconds at each call."""
    now = iter(range(0, 10_000))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(now) * step_s)


def test_a_long_step_logs_lines_while_it_runs(monkeypatch, capsys) -> None:
    ticking_clock(monkeypatch, 20.0)  # each item takes 20 s: a line every second item
    assert list(progress.progress_bar(range(5), "encoding item text")) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "encoding item text: 2 of 5, 40 s"
    assert len(lines) == 3 and lines[-1].startswith("encoding item text: 5 of 5, ")
    assert lines[-1].endswith(", done")


def test_a_short_step_logs_one_line_at_its_end(capsys) -> None:
    assert sum(progress.progress_bar(iter([1, 2]), "training")) == 3
    assert capsys.readouterr().err.splitlines() == ["training: 2, 0 s, done"]


def test_disabled_prints_nothing(capsys) -> None:
    assert list(progress.progress_bar(range(3), "training", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
