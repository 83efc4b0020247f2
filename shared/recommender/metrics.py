"""Full-catalog leave-one-out evaluation (docs/data-and-evaluation.md) and ``recs.csv``.

Every test user is ranked against the whole catalog, minus the items already in their
history; the metrics are recomputable from ``recs.csv`` alone with :func:`metrics_from_recs`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shared.data.dataset import Split

TOP_K = 20
METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr@20")
RANK_BATCH = 512  # customers rank_users scores at once
EVALUATED = ("hr@10", "ndcg@10")  # what federated evaluation reports (noisy sums under DP)

# Scores a batch of users from their histories: (user indices, histories) -> (batch, items).
ScoreFn = Callable[[np.ndarray, list[np.ndarray]], torch.Tensor]


def per_customer_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Each customer's value of every metric in :data:`METRICS` (in [0, 1]), from 1-based
    ranks of the target (0 = not in the top 20)."""
    ranks = np.asarray(ranks)
    hit = ranks > 0
    out = {}
    for k in (10, 20):
        within = hit & (ranks <= k)
        out[f"hr@{k}"] = within.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(within, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    out["mrr@20"] = np.where(hit, 1.0 / np.maximum(ranks, 1), 0.0)
    return {name: out[name] for name in METRICS}


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """Metrics from 1-based ranks of the target (0 = not in the top 20)."""
    return {
        name: float(values.mean()) if len(values) else 0.0
        for name, values in per_customer_metrics(ranks).items()
    }


def rank_users(
    score_fn: ScoreFn,
    split: Split,
    stage: str,
    users: np.ndarray | None = None,
    batch_size: int = RANK_BATCH,
    k: int = TOP_K,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items per user (history excluded) and the 1-based rank of each target. A
    catalog of fewer than ``k`` items gives as many columns as items; a place beyond the items
    outside the history (a customer who has had nearly all of them) holds -1: no item."""
    users = split.test_users if users is None else np.asarray(users)
    targets = split.target(stage)
    k = min(k, split.num_items)
    top = np.zeros((len(users), k), dtype=np.int64)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        histories = [split.history(u, stage) for u in batch]
        with torch.no_grad():
            scores = score_fn(batch, histories).float().clone()
        rows = np.repeat(np.arange(len(batch)), [len(h) for h in histories])
        if len(rows):
            scores[torch.as_tensor(rows), torch.as_tensor(np.concatenate(histories))] = -torch.inf
        best = torch.topk(scores, k, dim=1)
        top[start : start + len(batch)] = (
            best.indices.masked_fill(best.values == -torch.inf, -1).cpu().numpy()
        )
    return top, target_ranks(top, targets[users])


def target_ranks(top: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The 1-based rank of each row's target in its ``top`` (0 = not there)."""
    hits = top == np.asarray(targets)[:, None]
    return np.where(hits.any(1), hits.argmax(1) + 1, 0)


def evaluate(
    score_fn: ScoreFn,
    split: Split,
    stage: str,
    users: np.ndarray | None = None,
    cold_items: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """The protocol's metrics at ``stage`` plus coverage and, if given, the cold-item view."""
    users = split.test_users if users is None else np.asarray(users)
    top, ranks = rank_users(score_fn, split, stage, users)
    result = metrics_from_ranks(ranks)
    result["coverage@20"] = float(len(np.unique(top[top >= 0])) / split.num_items)
    result["users"] = len(users)
    if cold_items is not None and len(cold_items):
        cold = np.isin(split.target(stage)[users], cold_items)
        result["cold"] = {**metrics_from_ranks(ranks[cold]), "users": int(cold.sum())}
        result["warm"] = {**metrics_from_ranks(ranks[~cold]), "users": int((~cold).sum())}
    return result, top


def write_recs(
    path: Path, split: Split, item_ids: np.ndarray, top: np.ndarray, users: np.ndarray | None = None
) -> None:
    """``user_id,rank,item_id`` for the top-20 of each test user (the places of ``top`` that
    hold an item: fewer for a customer who has had nearly the whole catalog)."""
    users = split.test_users if users is None else users
    k = top.shape[1]
    recommended = top.reshape(-1) >= 0
    pd.DataFrame(
        {
            "user_id": np.repeat(split.user_ids[users], k)[recommended],
            "rank": np.tile(np.arange(1, k + 1), len(users))[recommended],
            "item_id": np.asarray(item_ids)[top.reshape(-1)[recommended]],
        }
    ).to_csv(path, index=False)


def metrics_from_recs(recs_path: Path, split: Split, item_ids: np.ndarray) -> dict[str, float]:
    """Recompute the test metrics from ``recs.csv`` and the dataset alone (an independent check)."""
    # ids are text, as the loader reads them: "NA" or "null" is an id, not a missing value
    recs = pd.read_csv(recs_path, dtype={"user_id": str, "item_id": str}, keep_default_na=False)
    target_of = dict(
        zip(
            split.user_ids[split.test_users],
            np.asarray(item_ids)[split.test_target[split.test_users]],
            strict=True,
        )
    )
    recs = recs[recs["rank"] <= TOP_K]
    recs = recs.assign(hit=recs["item_id"].to_numpy() == recs["user_id"].map(target_of).to_numpy())
    first_hit = recs[recs["hit"]].groupby("user_id")["rank"].min()
    ranks = np.array([first_hit.get(u, 0) for u in target_of])
    return metrics_from_ranks(ranks)
