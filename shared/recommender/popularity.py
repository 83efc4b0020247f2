"""The popularity prior (``popularity-prior``; docs/evaluation.md, "A popularity prior chosen on
validation"): w x log(1 + n_i) added to each item's score, n_i how many training histories hold
item i, w chosen on validation. One copy for ``fedrec train`` and a federation's server."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from shared.recommender.model import FusionRecommender

# the weights validation tries after the model's (0)
POPULARITY_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0)
# where the grid's largest is kept, it doubles while validation strictly improves, up to this
# (the prior in the item biases stays within what a node accepts: shared/federation/wire.py)
POPULARITY_CAP = 64.0


def history_counts(histories: list[np.ndarray], num_items: int) -> np.ndarray:
    """(num_items,) int64: how many of ``histories`` hold each item (a repeat counts once)."""
    held = [np.unique(np.asarray(h, dtype=np.int64)) for h in histories]
    items = np.concatenate(held) if held else np.zeros(0, dtype=np.int64)
    return np.bincount(items, minlength=num_items)


def popularity_logits(counts: np.ndarray, model: FusionRecommender) -> torch.Tensor:
    """log(1 + n_i) of the item ``counts``: popularity as a logit, on the model's device
    (popularity's ranking; a weight w multiplies the model's odds by n_i^w)."""
    return torch.log1p(torch.as_tensor(counts, dtype=torch.float32)).to(model.text.device)


@torch.no_grad()
def add_popularity(model: FusionRecommender, logits: torch.Tensor, weight: float) -> None:
    """Add ``weight`` x ``logits`` to the model's item scores, through its item biases."""
    if weight:
        model.id_scores.bias += weight * logits / model.config.id_scale


def popularity_weight(
    model: FusionRecommender,
    logits: torch.Tensor,
    validate: Callable[[FusionRecommender], float],
    start: float,
) -> tuple[float, list[dict]]:
    """The weight of the prior ``logits`` that ``validate`` (the model's validation NDCG@10)
    chooses (:func:`choose_weight`; the model as it is scores ``start``). Leaves the model
    as it was; returns the weight and every candidate's score."""
    bias = model.id_scores.bias.detach().clone()

    def score(weight: float) -> float:
        add_popularity(model, logits, weight)
        valid = validate(model)
        model.id_scores.bias.data.copy_(bias)
        return valid

    return choose_weight(score, start)


def choose_weight(score: Callable[[float], float], start: float) -> tuple[float, list[dict]]:
    """The prior's weight among 0 (scoring ``start``) and :data:`POPULARITY_WEIGHTS` by
    ``score`` (validation NDCG@10): the highest, a larger weight only if strictly higher. Where
    that is the grid's largest, its edge is no answer: the weight doubles while the score
    strictly improves, up to :data:`POPULARITY_CAP`. Returns it and every candidate's score."""
    tried = [(0.0, start)] + [(weight, score(weight)) for weight in POPULARITY_WEIGHTS]
    weight = POPULARITY_WEIGHTS[-1]
    while _best(tried) == weight and weight < POPULARITY_CAP:
        weight *= 2
        tried.append((weight, score(weight)))
    return _best(tried), [{"weight": w, "valid_ndcg@10": s} for w, s in tried]


def _best(tried: list[tuple[float, float]]) -> float:
    """The weight of the highest score in ``tried`` (ascending weights): the first on ties."""
    return max(tried, key=lambda candidate: candidate[1])[0]
