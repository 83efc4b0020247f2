"""Choosing a federation's rounds by validation (``rounds``, ``round-patience``,
``valid-customers``; docs/evaluation.md).

Each round the global model is scored on the validation events of the validation customers,
events no node trains on; the best round's model is kept (``best.safetensors`` beside the
checkpoint) and the run stops once ``round-patience`` rounds have passed without a better one,
or at ``rounds``. The starting model ("round 0": the public start) is a candidate too, scored
by the server in a simulation and by the nodes in a deployment: a federation whose rounds all
validate below it ships the start, never a model its nodes made worse. It does not count for
the patience, so the rounds run as they would without it. Under DP the rounds are fixed
(``dp-rounds``): a choice made on private data would be a release nobody accounted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.federation.validation import Answers, robust_validation
from shared.recommender.experiment import Experiment
from shared.runs.checkpoint import Checkpoint

MONITOR = "ndcg@10"


@dataclass
class RoundSelection:
    """The best round so far by validation NDCG@10, and whether it is time to stop."""

    path: Path
    patience: int
    best_round: int = 0  # 0: the starting model, when it was observed and no round beat it
    best_score: float = float("-inf")
    best_valid: dict | None = None
    last_gain: int = 0  # the latest round better than every trained round before it
    trained_best: float = float("-inf")

    def __post_init__(self) -> None:
        self.best = Checkpoint(self.path)

    def resume(self, done: int, history: list[dict]) -> None:
        """Take up the best round saved by an earlier start of the run (it is saved after
        the round's checkpoint, so a crash between the two keeps the earlier best) and the
        patience's count from the rounds' ``history``."""
        progress = self.best.progress()
        if progress is not None and progress["round"] <= done:
            self.best_round, self.best_score = progress["round"], progress["score"]
            self.best_valid = progress["valid"]
        for entry in history:
            if entry.get("selection"):
                self._count(entry["round"], float(entry["selection"][MONITOR]))

    def _count(self, server_round: int, score: float) -> None:
        if server_round > 0 and score > self.trained_best:
            self.trained_best, self.last_gain = score, server_round

    def observe(
        self,
        server_round: int,
        valid: dict,
        state: dict[str, torch.Tensor],
        trained_rows: list[int],
    ) -> bool:
        """Record the round's (0: the starting model's) validation metrics; a new best is
        saved (with the item rows trained by then) and True returned."""
        score = float(valid[MONITOR])
        self._count(server_round, score)
        if score <= self.best_score:
            return False
        self.best_round, self.best_score, self.best_valid = server_round, score, valid
        progress = {
            "round": server_round,
            "score": score,
            "valid": valid,
            "trained_rows": trained_rows,
        }
        self.best.save(state, {}, progress)
        return True

    def stale(self, server_round: int) -> bool:
        """Whether ``patience`` rounds have passed since the best trained one (0: never)."""
        return self.patience > 0 and server_round - self.last_gain >= self.patience

    def best_state(self) -> tuple[dict[str, torch.Tensor], list[int]] | None:
        """The best round's global weights and the item rows trained by then (None before
        any round or start was observed)."""
        saved = self.best.load()
        return None if saved is None else (saved[0], saved[2]["trained_rows"])


def round_validation(
    evaluation: Experiment | None,
    model: torch.nn.Module,
    validating: np.ndarray | None,
    answers: Answers | None = None,
    start: Answers | None = None,
) -> dict | None:
    """The round's validation metrics that choose the rounds: the server's, on the validation
    customers' held-out validation events, in a simulation; in a deployment, from the nodes'
    ``answers`` (node -> its answer) and theirs for the start (``start``; none: this is the
    start's), robust to a liar (:func:`robust_validation`). None when there are none."""
    if evaluation is not None and validating is not None and len(validating):
        valid, _ = evaluation.evaluate(model, "valid", users=validating)
        return {k: v for k, v in valid.items() if "@" in k or k == "users"}
    return robust_validation(answers or {}, start or {})
