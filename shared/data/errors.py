"""Bad input: the error every command reports as such (exit 2). A module of its own, light to
import, so that the command line catches it without loading pandas."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input: the message names the file, the row (1-based, header excluded) and the problem."""

    def __init__(self, path: Path | str, problem: str, row: int | None = None):
        where = f"{path}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.row, self.problem = str(path), row, problem
