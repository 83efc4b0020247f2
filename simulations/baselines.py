"""Reference recommenders for ``fedrec bench quality``, each a ``score_fn``
(shared.recommender.metrics).

A scorer is fitted on training histories only (held-out cold items are already removed from
them) and scores a batch of customers from the history it is given at evaluation time, which
for the test stage includes the validation target (docs/data-and-evaluation.md). Every
setting that is chosen is chosen on the validation targets, never on the test targets.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from shared.data.dataset import Split
from shared.recommender.experiment import Experiment
from shared.recommender.metrics import ScoreFn, evaluate
from shared.recommender.popularity import history_counts

ALS_FACTORS = 128
ALS_GRID = tuple((reg, alpha) for reg in (0.01, 0.1, 1.0) for alpha in (1.0, 10.0, 40.0))
RECENCY_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # text-only: weight (1 - recency)^age
FUSION_GRID = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)  # late fusion: z(ALS) + weight * z(text)


def interaction_matrix(
    histories: list[np.ndarray], num_items: int, recency: float | None = None
) -> sp.csr_matrix:
    """(len(histories), num_items) matrix: 1 where the history holds the item or, with
    ``recency``, the summed weights ``(1 - recency)^age`` of its occurrences (age 0 = latest)."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    columns = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    if recency is None:
        values = np.ones(len(rows))
    else:
        values = np.concatenate([np.arange(len(h) - 1, -1, -1) for h in histories] or [[]])
        values = (1.0 - recency) ** values
    matrix = sp.csr_matrix(
        (values.astype(np.float32), (rows, columns)), shape=(len(histories), num_items)
    )
    if recency is None:
        matrix.data[:] = 1.0  # repeated items count once
    return matrix


def item_counts(histories: list[np.ndarray], num_items: int) -> torch.Tensor:
    """(1, num_items): how many of ``histories`` hold each item (popularity's scores)."""
    return torch.from_numpy(history_counts(histories, num_items)).float().unsqueeze(0)


def popularity(histories: list[np.ndarray], num_items: int) -> ScoreFn:
    """Every customer gets the same ranking: items by how many training histories hold them."""
    counts = item_counts(histories, num_items)

    def score(users: np.ndarray, batch: list[np.ndarray]) -> torch.Tensor:
        return counts.expand(len(batch), -1)

    return score


def als(
    histories: list[np.ndarray],
    num_items: int,
    seed: int = 0,
    params: tuple[float, float] = (0.01, 1.0),
) -> ScoreFn:
    """implicit's ALS (128 factors; ``params`` = regularization, alpha) on the binary matrix; a
    customer's vector is the exact least-squares fold-in of the history given at scoring time."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    regularization, alpha = params
    model = AlternatingLeastSquares(
        factors=ALS_FACTORS, regularization=regularization, alpha=alpha, random_state=seed
    )
    with threadpool_limits(1, "blas"):  # implicit's advice: BLAS threads fight its own
        model.fit(interaction_matrix(histories, num_items), show_progress=False)
    items = torch.from_numpy(np.asarray(model.item_factors))  # an untrained item's vector is 0

    def score(users: np.ndarray, batch: list[np.ndarray]) -> torch.Tensor:
        rows = interaction_matrix(batch, num_items)
        return torch.from_numpy(model.recalculate_user(np.arange(len(batch)), rows)) @ items.T

    return score


def item_knn(histories: list[np.ndarray], num_items: int) -> ScoreFn:
    """Cosine item-item similarity of the customer columns; score = sum over the history."""
    matrix = interaction_matrix(histories, num_items).tocsc()
    norms = np.sqrt(np.asarray(matrix.sum(0)).ravel())
    scaled = matrix @ sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
    similarity = (scaled.T @ scaled).tocsr()
    similarity.setdiag(0.0)

    def score(users: np.ndarray, batch: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy((interaction_matrix(batch, num_items) @ similarity).toarray())

    return score


def text_only(text: torch.Tensor, recency: float) -> ScoreFn:
    """Cosine between each item's text embedding and the history's recency-weighted mean,
    weight ``(1 - recency)^age`` (age 0 = the latest item). Nothing is trained."""
    items = torch.nn.functional.normalize(text.float(), dim=1)

    def score(users: np.ndarray, batch: list[np.ndarray]) -> torch.Tensor:
        weights = interaction_matrix(batch, len(items), recency)
        profiles = torch.from_numpy(weights @ items.numpy())
        return torch.nn.functional.normalize(profiles, dim=1) @ items.T

    return score


def late_fusion(first: ScoreFn, second: ScoreFn, weight: float) -> ScoreFn:
    """``z(first) + weight * z(second)``, each z-scored per customer over the catalog."""

    def zscore(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.double()
        spread = scores.std(1, keepdim=True).clamp(min=1e-12)
        return (scores - scores.mean(1, keepdim=True)) / spread

    def score(users: np.ndarray, batch: list[np.ndarray]) -> torch.Tensor:
        return zscore(first(users, batch)) + weight * zscore(second(users, batch))

    return score


def choose(candidates: dict, split: Split, users: np.ndarray):
    """The setting whose scorer has the best validation NDCG@10 on ``users`` (first on ties)."""
    quality = {
        key: evaluate(fn, split, "valid", users)[0]["ndcg@10"] for key, fn in candidates.items()
    }
    return max(quality, key=quality.get)


def tuning_users(experiment: Experiment) -> np.ndarray:
    """Validation users whose validation target is a training item: a held-out (cold) item has
    no interactions to tune on, so choices never see one."""
    users = experiment.split.test_users
    return users[~np.isin(experiment.split.valid_target[users], experiment.cold_items)]


BASELINES = ("popularity", "als", "itemknn", "text", "late_fusion")


def baselines(
    experiment: Experiment, names: tuple[str, ...] = BASELINES
) -> Iterator[tuple[str, ScoreFn, dict]]:
    """Each named baseline's test-stage scorer and the settings validation chose, fitted as
    iterated.

    Test-stage scorers are fitted on ``train_histories(config.refit)`` as the model is: with
    ``refit``, the validation targets join the training data once validation has chosen.
    """
    config, split, text = experiment.config, experiment.split, experiment.text
    num_items = experiment.dataset.num_items
    train = experiment.train_histories()
    final = experiment.train_histories(config.refit)
    users = tuning_users(experiment)
    if "popularity" in names:
        yield "popularity", popularity(final, num_items), {}
    if {"als", "late_fusion"} & set(names):
        params = choose({p: als(train, num_items, config.seed, p) for p in ALS_GRID}, split, users)
        als_final = als(final, num_items, config.seed, params)
    if "als" in names:
        yield (
            "als",
            als_final,
            {"factors": ALS_FACTORS, "regularization": params[0], "alpha": params[1]},
        )
    if "itemknn" in names:
        yield "itemknn", item_knn(final, num_items), {}
    if {"text", "late_fusion"} & set(names):
        recency = choose({r: text_only(text, r) for r in RECENCY_GRID}, split, users)
    if "text" in names:
        yield "text", text_only(text, recency), {"recency": recency}
    if "late_fusion" in names:
        als_train = als(train, num_items, config.seed, params) if config.refit else als_final
        weight = choose(
            {w: late_fusion(als_train, text_only(text, recency), w) for w in FUSION_GRID},
            split,
            users,
        )
        yield (
            "late_fusion",
            late_fusion(als_final, text_only(text, recency), weight),
            {"weight": weight, "recency": recency},
        )
