"""The federation's checkpoint: the global weights, the server's state between rounds (its
optimiser's moments, the denoiser's sums) and the per-round history, in
``checkpoint.safetensors``, with the one before it kept as ``checkpoint.prev.safetensors``.

Each save is durable (temp file, fsync, rename, fsync of the directory) and refused when the
state holds a NaN or an infinity, so a diverged round is never persisted. Loading falls back to
the previous checkpoint when the latest cannot be read (torn by a crash, or missing between the
two renames of a save).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from shared.runs.durable import atomic_write

log = logging.getLogger("fedrec.server")
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be written, or none that can be read."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [
        name
        for name, value in tensors.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


class Checkpoint:
    """The global weights, server-optimiser state and per-round history, saved durably with the
    previous checkpoint kept as a fallback."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.previous = self.path.with_name(self.path.name.replace(".", ".prev.", 1))
        self._latest_torn = False  # then it is overwritten, never kept as the previous one

    def save(self, state: dict, optimizer_state: dict, progress: dict) -> None:
        """Persist a round; CheckpointError (nothing written) if any value is not finite."""
        from safetensors.torch import save

        tensors = {f"model/{k}": v.contiguous() for k, v in state.items()}
        tensors |= {f"optimizer/{k}": v.contiguous() for k, v in optimizer_state.items()}
        if bad := non_finite(tensors):
            raise CheckpointError(
                f"round {progress.get('round')}: not saved, the state has non-finite values "
                f"(NaN or infinity) in {', '.join(bad[:5])}: the model diverged; resume from "
                "the last checkpoint with a lower learning rate or tighter clipping"
            )
        data = save(tensors, metadata={"progress": json.dumps(progress)})
        if self.path.exists() and not self._latest_torn:
            os.replace(self.path, self.previous)
        atomic_write(self.path, data)  # fsyncs the directory: both renames are durable
        self._latest_torn = False

    def load(self) -> tuple[dict, dict, dict] | None:
        """(state, optimizer state, progress) of the latest readable checkpoint, or None when
        there is none; CheckpointError naming both files when neither can be read."""
        return self._first_readable(_read)

    def progress(self) -> dict | None:
        """The progress (round, history, settings) of the latest readable checkpoint, without
        its tensors; None when there is none."""
        return self._first_readable(_read_progress)

    def _first_readable(self, read: Callable[[Path], T]) -> T | None:
        candidates = [p for p in (self.path, self.previous) if p.exists()]
        if not candidates:
            return None
        problems = []
        for path in candidates:
            try:
                loaded = read(path)
            except Exception as error:  # torn: safetensors, JSON or a missing key
                problems.append(f"{path}: {error}")
                self._latest_torn |= path == self.path
                log.warning("checkpoint %s cannot be read (%s)", path, error)
                continue
            if path != self.path:
                log.warning("falling back to the previous checkpoint %s", path)
            return loaded
        raise CheckpointError(
            "no readable checkpoint: " + "; ".join(problems) + " (move them aside to start over)"
        )


def _read_progress(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["progress"])


def _read(path: Path) -> tuple[dict, dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        progress = json.loads(handle.metadata()["progress"])
        tensors = {name: handle.get_tensor(name) for name in list(handle.keys())}
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    optimizer = {k[10:]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    return state, optimizer, progress
