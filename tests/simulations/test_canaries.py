"""Canary customers for the one-run audit (simulations/canaries.py): reproducible, balanced,
inserted exactly where they belong, and scored so that memorised ones stand out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import rankdata

from server.privacy.canary_audit import read_canaries
from shared.data.dataset import Dataset, leave_one_out, load_dataset
from shared.data.partition import write_partitions
from shared.federation.node_directory import node_catalog
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.recommender.training import train_epoch, training_tensors
from simulations.canaries import (
    Canaries,
    audit_canaries,
    canary_scores,
    insert_canaries,
    load_canaries,
    make_canaries,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from shared.data.convert import write_dataset
    from shared.data.synth import SynthConfig, generate

    interactions, items = generate(SynthConfig(users=400, items=200, seed=0))
    return load_dataset(
        write_dataset(tmp_path_factory.mktemp("canary") / "data", interactions, items)
    )


def auc(scores: np.ndarray, included: np.ndarray) -> float:
    """P(an included canary outscores an excluded one), ties counting half (Mann-Whitney)."""
    ranks = rankdata(scores)
    n_in, n_out = int(included.sum()), int((1 - included).sum())
    return float((ranks[included == 1].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def test_canaries_are_reproducible_balanced_and_new(dataset: Dataset) -> None:
    one = make_canaries(dataset.items, 400, 12, seed=3, catalogs=[None] * 4)
    again = make_canaries(dataset.items, 400, 12, seed=3, catalogs=[None] * 4)
    other = make_canaries(dataset.items, 400, 12, seed=4, catalogs=[None] * 4)
    assert one.user_ids == again.user_ids
    assert np.array_equal(one.included, again.included) and np.array_equal(one.node, again.node)
    assert all(np.array_equal(a, b) for a, b in zip(one.histories, again.histories, strict=True))
    assert not np.array_equal(one.included, other.included)
    assert 0.4 < one.included.mean() < 0.6  # fair coins: 4 standard deviations either side
    assert set(one.node) == {0, 1, 2, 3}
    assert len(set(one.user_ids)) == 400
    assert not set(one.user_ids) & set(dataset.interactions["user_id"])
    for history in one.histories:
        assert len(history) == 12 and len(set(history)) == 12
        assert history.min() >= 0 and history.max() < dataset.num_items


def test_merchant_canaries_buy_from_their_node(dataset: Dataset, tmp_path: Path) -> None:
    directories = write_partitions(dataset, tmp_path, 3, "merchant")
    catalogs = [node_catalog(d, dataset.items) for d in directories]
    canaries = make_canaries(dataset.items, 60, 12, seed=0, catalogs=catalogs)
    for history, node in zip(canaries.histories, canaries.node, strict=True):
        assert set(history) <= set(catalogs[node])


def test_insertion_appends_exactly_the_included_canaries(dataset: Dataset, tmp_path: Path) -> None:
    directories = write_partitions(dataset, tmp_path, 3, "regional", seed=1)
    before = [load_dataset(d).interactions for d in directories]
    canaries = make_canaries(dataset.items, 40, 12, seed=0, catalogs=[None] * 3)
    insert_canaries(tmp_path, canaries, dataset.items)
    item_ids = dataset.items["item_id"].to_numpy()
    for node, directory in enumerate(directories):
        after = load_dataset(directory).interactions
        added = after[after["user_id"].str.startswith("canary-")]
        mine = [c for c in range(40) if canaries.included[c] and canaries.node[c] == node]
        assert sorted(added["user_id"].unique()) == [canaries.user_ids[c] for c in mine]
        assert len(after) == len(before[node]) + 12 * len(mine)
        assert (added["event"] == "purchase").all() and (added["region"] == "").all()
        for c in mine:  # in the canary's order, once loading has sorted by time
            bought = added.loc[added["user_id"] == canaries.user_ids[c], "item_id"].to_numpy()
            assert np.array_equal(bought, item_ids[canaries.histories[c]])
        real = after[~after["user_id"].str.startswith("canary-")]
        pd.testing.assert_frame_equal(
            real[["user_id", "item_id", "timestamp"]].reset_index(drop=True),
            before[node][["user_id", "item_id", "timestamp"]].reset_index(drop=True),
        )
    loaded = load_canaries(tmp_path)
    assert loaded.user_ids == canaries.user_ids
    assert np.array_equal(loaded.included, canaries.included)
    assert np.array_equal(loaded.node, canaries.node)
    assert all(
        np.array_equal(a, b) for a, b in zip(loaded.histories, canaries.histories, strict=True)
    )
    with pytest.raises(ValueError, match="inserted twice"):
        insert_canaries(tmp_path, canaries, dataset.items)
    with pytest.raises(FileNotFoundError, match="no canaries"):
        load_canaries(tmp_path / "node-0")


def tiny_model(num_items: int) -> FusionRecommender:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(num_items, 24), dim=1)
    config = ModelConfig(
        num_items=num_items, text_dim=24, dim=32, max_len=16, layers=1, heads=2, dropout=0.0
    )
    return FusionRecommender(config, text)


@pytest.fixture(scope="module")
def trained(dataset: Dataset) -> tuple[FusionRecommender, FusionRecommender, Canaries]:
    """A tiny model trained without privacy on the included canaries and 200 real customers,
    the same model untrained, and the canaries."""
    canaries = make_canaries(dataset.items, 200, 12, seed=0, catalogs=[None])
    real = leave_one_out(dataset).train[:200]
    chosen = [h for h, i in zip(canaries.histories, canaries.included, strict=True) if i]
    untrained, model = tiny_model(dataset.num_items), tiny_model(dataset.num_items)
    inputs, targets = training_tensors(real + chosen, model.config.max_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest for a model this small, and kind to a busy machine
    try:
        for _ in range(10):
            train_epoch(model, optimizer, inputs, targets, 32, "cpu")
    finally:
        torch.set_num_threads(threads)
    return model, untrained, canaries


def test_scores_separate_trained_canaries(trained) -> None:
    model, untrained, canaries = trained
    assert auc(canary_scores(model, canaries), canaries.included) > 0.8
    assert auc(canary_scores(model, canaries, reference=untrained), canaries.included) > 0.8
    assert abs(auc(canary_scores(untrained, canaries), canaries.included) - 0.5) < 0.2


def test_audit_writes_canaries_and_bounds_memorisation(trained, tmp_path: Path) -> None:
    model, untrained, canaries = trained
    bound = audit_canaries(model, canaries, tmp_path, reference=untrained, delta=1e-5)
    data = read_canaries(tmp_path / "canaries.json")
    assert data["num_canaries"] == 200 and data["included"] == canaries.included.tolist()
    assert "untrained" in data["score"]
    assert bound["delta"] == 1e-5 and bound["epsilon_lower_bound"] > 0
