"""Choosing among trained epochs on validation when validation cannot tell them apart
(``epoch-tolerance``; docs/evaluation.md, "Epochs validation cannot tell apart").

Validation NDCG@10 is a mean over customers; two epochs whose means differ by less than the
noise of that difference are a tie, and a tie goes to the earlier epoch: the less-fitted model,
closer to the public start. On the 4,000-customer Beauty sample epochs 1 and 2 validate at
0.0597 and 0.0600 and the argmax kept epoch 2, which tests far below epoch 1."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def within_noise(best: np.ndarray, other: np.ndarray, tolerance: float) -> bool:
    """Whether ``other``'s mean is at most ``tolerance`` standard errors below ``best``'s, the
    standard error that of their difference, customer by customer (both arrays hold the same
    customers' values)."""
    gap = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    if len(gap) < 2:
        return gap.mean() <= 0 if len(gap) else True
    return gap.mean() <= tolerance * gap.std(ddof=1) / math.sqrt(len(gap))


@dataclass
class Candidate:
    """A trained epoch: its number, its customers' validation values and its weights."""

    epoch: int
    values: np.ndarray
    state: Any

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if len(self.values) else 0.0


class EpochChoice:
    """The trained epochs in the running: the best so far (by mean) and every other one
    within ``tolerance`` standard errors of it, whether it led when it ran or not.
    :attr:`kept` is the earliest of them. An epoch outside the noise of the best of its time,
    or of a later best, stays out even if a still later best would take it back (so few
    weights are held): the rule "the earliest epoch within noise of the final best" is met
    except for such an epoch."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.running: list[Candidate] = []

    @property
    def best(self) -> Candidate | None:
        return max(self.running, key=lambda c: c.mean) if self.running else None

    @property
    def kept(self) -> Candidate | None:
        return self.running[0] if self.running else None

    def offer(self, epoch: int, values: np.ndarray, snapshot: Callable[[], Any]) -> bool:
        """Consider an epoch (its customers' validation values; ``snapshot`` copies its weights,
        called only when it is kept in the running). True when it is the new best (the
        caller's patience restarts)."""
        values = np.asarray(values, dtype=np.float64)
        best = self.best
        if best is not None and values.mean() <= best.mean:
            if within_noise(best.values, values, self.tolerance):
                self.running.append(Candidate(epoch, values, snapshot()))
            return False
        self.running = [c for c in self.running if within_noise(values, c.values, self.tolerance)]
        self.running.append(Candidate(epoch, values, snapshot()))
        return True
