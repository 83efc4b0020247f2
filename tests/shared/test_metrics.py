"""Full-catalog leave-one-out metrics and recs.csv (shared/recommender/metrics.py,
docs/data-and-evaluation.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shared.data.dataset import Split, leave_one_out, load_dataset
from shared.recommender.metrics import (
    METRICS,
    TOP_K,
    evaluate,
    metrics_from_ranks,
    metrics_from_recs,
    rank_users,
    write_recs,
)


def test_metrics_of_single_ranks() -> None:
    assert metrics_from_ranks(np.array([1])) == {
        "hr@10": 1.0,
        "ndcg@10": 1.0,
        "hr@20": 1.0,
        "ndcg@20": 1.0,
        "mrr@20": 1.0,
    }
    three = metrics_from_ranks(np.array([3]))
    assert three["ndcg@10"] == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert three["mrr@20"] == pytest.approx(1 / 3)
    fifteen = metrics_from_ranks(np.array([15]))
    assert fifteen["hr@10"] == 0.0 and fifteen["ndcg@10"] == 0.0
    assert fifteen["hr@20"] == 1.0
    assert fifteen["ndcg@20"] == pytest.approx(1 / math.log2(16))
    assert fifteen["mrr@20"] == pytest.approx(1 / 15)
    assert metrics_from_ranks(np.array([0])) == dict.fromkeys(METRICS, 0.0)
    assert list(metrics_from_ranks(np.array([2]))) == list(METRICS)


def test_metrics_average_over_users() -> None:
    ranks = np.array([1, 3, 10, 11, 20, 0, 0, 2])
    got = metrics_from_ranks(ranks)

    def gain(r: int, k: int) -> float:
        return 1 / math.log2(r + 1) if 0 < r <= k else 0.0

    n = len(ranks)
    assert got["hr@10"] == pytest.approx(4 / n)
    assert got["hr@20"] == pytest.approx(6 / n)
    assert got["ndcg@10"] == pytest.approx(sum(gain(r, 10) for r in ranks) / n)
    assert got["ndcg@20"] == pytest.approx(sum(gain(r, 20) for r in ranks) / n)
    assert got["mrr@20"] == pytest.approx(sum(1 / r for r in ranks if r) / n)
    assert metrics_from_ranks(np.array([], dtype=int)) == dict.fromkeys(METRICS, 0.0)


def toy_split() -> Split:
    """Four users over eight items; user 3 has too few events and only trains."""
    return Split(
        user_ids=np.array(["a", "b", "c", "d"]),
        train=[np.array([0, 1]), np.array([2]), np.array([5, 6, 7]), np.array([4])],
        valid_target=np.array([2, 3, 0, -1]),
        test_target=np.array([3, 0, 1, -1]),
        num_items=8,
    )


def test_history_items_are_excluded_from_the_ranking() -> None:
    split = toy_split()

    def favour_history(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        scores = -torch.arange(8, dtype=torch.float32).repeat(len(users), 1)  # item 0 first
        for row, history in enumerate(histories):
            scores[row, torch.as_tensor(history)] = 100.0  # history items would come first
        return scores

    top, ranks = rank_users(favour_history, split, "test", k=4)
    assert top.shape == (3, 4)
    for row, user in enumerate(split.test_users):
        history = split.history(user, "test")
        assert not set(top[row]) & set(history)
        # the rest in score order, i.e. by item index
        assert top[row].tolist() == [i for i in range(8) if i not in history][:4]
    # a: history {0,1,2}, target 3 -> rank 1; b: history {2,3}, target 0 -> rank 1;
    # c: history {5,6,7,0}, target 1 -> rank 1
    assert ranks.tolist() == [1, 1, 1]
    # validation ranks from the training history only: a {0,1} -> 2 first; b {2} -> 0, 1, then
    # its target 3; c {5,6,7} -> 0 first
    _, valid_ranks = rank_users(favour_history, split, "valid", k=4)
    assert valid_ranks.tolist() == [1, 3, 1]


def test_rank_of_the_target_and_misses() -> None:
    split = toy_split()

    def reverse(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return torch.arange(8, dtype=torch.float32).repeat(len(users), 1)  # item 7 first

    top, ranks = rank_users(reverse, split, "test", k=3)
    # a: 7,6,5 -> target 3 missed; b: 7,6,5 -> target 0 missed; c: 4,3,2 -> target 1 missed
    assert top.tolist() == [[7, 6, 5], [7, 6, 5], [4, 3, 2]]
    assert ranks.tolist() == [0, 0, 0]
    _, ranks = rank_users(reverse, split, "test", k=5)
    assert ranks.tolist() == [5, 0, 4]  # a: 7 6 5 4 3; b: 7 6 5 4 1 -> 0 is 6th; c: 4 3 2 1


def test_a_catalog_smaller_than_the_top_k_ranks_what_is_left(tmp_path: Path) -> None:
    """Three products (fewer than the top 20); customer a has had all but one of them, and
    its test target (product 0) again: what is in the history is never recommended, a place
    with no product left holds -1 and a repeated target is no hit (it crashed: topk beyond
    the catalog; the history's products filled the places, the target counted among them)."""
    split = Split(
        user_ids=np.array(["a", "b"]),
        train=[np.array([0]), np.array([2])],
        valid_target=np.array([1, 1]),
        test_target=np.array([0, 0]),
        num_items=3,
    )

    def by_index(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return -torch.arange(3, dtype=torch.float32).repeat(len(users), 1)  # item 0 first

    result, top = evaluate(by_index, split, "test")
    assert top.tolist() == [[2, -1, -1], [0, -1, -1]]
    assert result["hr@20"] == 0.5 and result["users"] == 2  # b hits 0 at rank 1; a cannot
    assert result["coverage@20"] == pytest.approx(2 / 3)  # products 0 and 2
    write_recs(tmp_path / "recs.csv", split, np.array(["p0", "p1", "p2"]), top)
    recs = pd.read_csv(tmp_path / "recs.csv", dtype=str)
    assert recs.values.tolist() == [["a", "1", "p2"], ["b", "1", "p0"]]
    assert metrics_from_recs(tmp_path / "recs.csv", split, np.array(["p0", "p1", "p2"])) == {
        name: value for name, value in result.items() if name in METRICS
    }


@pytest.fixture(scope="module")
def synth_split(synth_dataset_dir: Path) -> tuple[Split, np.ndarray]:
    dataset = load_dataset(synth_dataset_dir)
    return leave_one_out(dataset), dataset.items["item_id"].to_numpy()


def test_recs_csv_reproduces_the_metrics(synth_split, tmp_path: Path) -> None:
    split, item_ids = synth_split
    generator = torch.Generator().manual_seed(0)
    popular = torch.from_numpy(
        np.bincount(np.concatenate(split.train), minlength=split.num_items)
    ).float()

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        # popularity plus noise: some hits at every rank, some misses
        noise = torch.rand(len(users), split.num_items, generator=generator)
        return popular + 10 * noise

    metrics, top = evaluate(score, split, "test")
    assert top.shape == (len(split.test_users), TOP_K)
    assert 0 < metrics["hr@20"] < 1  # hits and misses both occur
    assert metrics["users"] == len(split.test_users)
    write_recs(tmp_path / "recs.csv", split, item_ids, top)

    recs = pd.read_csv(tmp_path / "recs.csv", dtype={"user_id": str, "item_id": str})
    assert list(recs.columns) == ["user_id", "rank", "item_id"]
    assert len(recs) == TOP_K * len(split.test_users)
    assert all(
        ranks == list(range(1, TOP_K + 1)) for ranks in recs.groupby("user_id")["rank"].apply(list)
    )
    assert set(recs["user_id"]) == set(split.user_ids[split.test_users])
    recomputed = metrics_from_recs(tmp_path / "recs.csv", split, item_ids)
    assert recomputed == {k: metrics[k] for k in METRICS}  # exactly, not approximately
    # and no history item is ever recommended
    history_of = {
        split.user_ids[u]: set(item_ids[split.history(u, "test")]) for u in split.test_users
    }
    assert not any(
        item in history_of[user]
        for user, item in zip(recs["user_id"], recs["item_id"], strict=True)
    )


def test_recs_metrics_detect_a_changed_recommendation(synth_split, tmp_path: Path) -> None:
    """metrics_from_recs really reads the file: moving a hit changes the metrics."""
    split, item_ids = synth_split
    target = split.test_target
    users = split.test_users[:5]

    def oracle(batch: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        scores = torch.zeros(len(batch), split.num_items)
        scores[torch.arange(len(batch)), torch.as_tensor(target[batch])] = 1.0
        return scores

    metrics, top = evaluate(oracle, split, "test", users=users)
    assert metrics["ndcg@10"] == 1.0
    write_recs(
        tmp_path / "recs.csv", split.subset(users), item_ids, top, users=np.arange(len(users))
    )
    assert metrics_from_recs(tmp_path / "recs.csv", split.subset(users), item_ids)["ndcg@10"] == 1
    recs = pd.read_csv(tmp_path / "recs.csv", dtype={"user_id": str, "item_id": str})
    recs.loc[recs["rank"] == 1, "rank"] = 3
    recs.loc[recs.index[2::TOP_K], "rank"] = 1  # the old third becomes first
    recs.to_csv(tmp_path / "recs.csv", index=False)
    moved = metrics_from_recs(tmp_path / "recs.csv", split.subset(users), item_ids)
    assert moved["ndcg@10"] == pytest.approx(0.5)
    assert moved["mrr@20"] == pytest.approx(1 / 3)


def test_recs_csv_keeps_ids_that_read_like_missing_values(tmp_path: Path) -> None:
    """Ids such as "NA", "null" or "nan" are ids (the loader reads them as text): recomputing
    from recs.csv counts their hits too, instead of reading them as missing values."""
    split = Split(
        user_ids=np.array(["NA", "null"]),
        train=[np.array([2]), np.array([2])],
        valid_target=np.array([1, 1]),
        test_target=np.array([0, 0]),
        num_items=3,
    )
    item_ids = np.array(["nan", "None", "p2"])

    def first_item(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return -torch.arange(3, dtype=torch.float32).repeat(len(users), 1)

    result, top = evaluate(first_item, split, "test")
    assert result["ndcg@10"] == 1.0
    write_recs(tmp_path / "recs.csv", split, item_ids, top)
    assert metrics_from_recs(tmp_path / "recs.csv", split, item_ids)["ndcg@10"] == 1.0
