"""The rich console that commands print their tables and reports with."""

from __future__ import annotations

from rich.console import Console

LOG_WIDTH = 1000  # off a terminal: wide enough that no table cell or line is cut or wrapped


def console(stderr: bool = False) -> Console:
    """A console on stdout (``stderr``: on stderr). On a terminal it fits the window; in a file
    or a pipe (a log, an audit kept as a record) nothing is cut to 80 columns: tables keep
    every cell whole and lines are not wrapped."""
    screen = Console(stderr=stderr)
    if screen.is_terminal:
        return screen
    return Console(stderr=stderr, width=LOG_WIDTH)
