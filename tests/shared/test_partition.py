"""Splitting one dataset into node directories (shared/data/partition.py)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.data.dataset import Dataset, leave_one_out, load_dataset, validation_customer
from shared.data.errors import DataError
from shared.data.partition import (
    cold_item_indices,
    ensure_partitions,
    fragment_histories,
    holdout_rows,
    item_merchants,
    write_partitions,
)
from shared.federation.node_directory import node_catalog, node_name
from shared.runs.config import RunConfig

NODES = 3


@pytest.fixture(scope="module")
def dataset(synth_dataset_dir: Path) -> Dataset:
    return load_dataset(synth_dataset_dir)


def events(frame: pd.DataFrame) -> Counter:
    return Counter(
        zip(frame["user_id"], frame["item_id"], frame["timestamp"], frame["event"], strict=True)
    )


def load_nodes(directories: list[Path]) -> list[Dataset]:
    return [load_dataset(d) for d in directories]


def check_complete(dataset: Dataset, nodes: list[Dataset]) -> None:
    """Every event at exactly one node; every node the full catalog in the same order."""
    union = Counter()
    for node in nodes:
        union += events(node.interactions)
        pd.testing.assert_frame_equal(node.items, dataset.items)
    assert union == events(dataset.interactions)
    assert sum(len(n.interactions) for n in nodes) == len(dataset.interactions)


def category_mix(node: Dataset) -> pd.Series:
    top = node.items["categories"].str.split("|").str[0].to_numpy()
    return pd.Series(top[node.interactions["item_idx"].to_numpy()]).value_counts(normalize=True)


def largest_mix_difference(nodes: list[Dataset]) -> float:
    """The largest total-variation distance between two nodes' department mixes."""
    mixes = pd.concat([category_mix(n) for n in nodes], axis=1).fillna(0.0).to_numpy().T
    return max(0.5 * np.abs(a - b).sum() for i, a in enumerate(mixes) for b in mixes[i + 1 :])


def test_regional_iid_covers_every_customer_exactly_once(dataset: Dataset, tmp_path: Path) -> None:
    directories = write_partitions(dataset, tmp_path, NODES, "regional", 0.0, 0, by_region=False)
    assert directories == [tmp_path / f"node-{k}" for k in range(NODES)]
    nodes = load_nodes(directories)
    check_complete(dataset, nodes)
    customers = [set(n.interactions["user_id"]) for n in nodes]
    assert set().union(*customers) == set(dataset.interactions["user_id"])
    assert sum(len(c) for c in customers) == dataset.num_users  # disjoint
    sizes = np.array([len(c) for c in customers])
    assert sizes.min() >= dataset.num_users // NODES - 1  # IID: as balanced as can be
    for k, directory in enumerate(directories):
        assert node_name(directory) == f"regional-{k}"
        assert node_catalog(directory, dataset.items) is None  # sells the whole catalog
        info = json.loads((directory / "node.json").read_text())
        assert info["partition"] == "regional"
    # a node holds its customers' whole histories, in order
    node = nodes[1]
    for user, frame in list(node.interactions.groupby("user_id"))[:20]:
        full = dataset.interactions[dataset.interactions["user_id"] == user]
        assert frame["item_id"].tolist() == full["item_id"].tolist()


def test_regional_partition_is_deterministic(dataset: Dataset, tmp_path: Path) -> None:
    first = write_partitions(dataset, tmp_path / "a", 2, "regional", 0.0, 7, by_region=False)
    second = write_partitions(dataset, tmp_path / "b", 2, "regional", 0.0, 7, by_region=False)
    other = write_partitions(dataset, tmp_path / "c", 2, "regional", 0.0, 8, by_region=False)
    users = [set(load_dataset(d).interactions["user_id"]) for d in (first[0], second[0], other[0])]
    assert users[0] == users[1] != users[2]


def test_dirichlet_skew_makes_node_mixes_differ(dataset: Dataset, tmp_path: Path) -> None:
    iid = load_nodes(
        write_partitions(dataset, tmp_path / "iid", NODES, "regional", 0.0, 0, by_region=False)
    )
    skewed = load_nodes(
        write_partitions(dataset, tmp_path / "skew", NODES, "regional", 0.1, seed=0)
    )
    check_complete(dataset, skewed)
    customers = [set(n.interactions["user_id"]) for n in skewed]
    assert sum(len(c) for c in customers) == len(set().union(*customers)) == dataset.num_users
    iid_gap, skew_gap = largest_mix_difference(iid), largest_mix_difference(skewed)
    assert iid_gap < 0.15  # IID nodes all look like the whole
    assert skew_gap > 0.2 and skew_gap > 3 * iid_gap


def test_merchant_nodes_hold_only_their_own_products(dataset: Dataset, tmp_path: Path) -> None:
    directories = write_partitions(dataset, tmp_path, NODES, "merchant")
    nodes = load_nodes(directories)
    check_complete(dataset, nodes)
    catalogs = [node_catalog(d, dataset.items) for d in directories]
    assert all(c is not None and len(c) for c in catalogs)
    # the catalogs split the items: disjoint and together every item
    assert sorted(np.concatenate(catalogs).tolist()) == list(range(dataset.num_items))
    for k, (node, catalog) in enumerate(zip(nodes, catalogs, strict=True)):
        assert np.isin(node.interactions["item_idx"].to_numpy(), catalog).all()
        assert node_name(directories[k]) == f"merchant-{k}"
        # a merchant is never split: its items are all at one node
        merchants = set(dataset.items["merchant_id"].to_numpy()[catalog])
        others = set(
            dataset.items["merchant_id"].to_numpy()[
                np.setdiff1d(np.arange(dataset.num_items), catalog)
            ]
        )
        assert not merchants & others
    # every event on an item lands at the node whose catalog has the item
    owner = np.empty(dataset.num_items, dtype=int)
    for k, catalog in enumerate(catalogs):
        owner[catalog] = k
    per_node = np.bincount(owner[dataset.interactions["item_idx"].to_numpy()], minlength=NODES)
    assert per_node.tolist() == [len(n.interactions) for n in nodes]


def test_merchant_partition_without_merchant_ids_uses_categories(
    dataset: Dataset, tmp_path: Path
) -> None:
    items = dataset.items.drop(columns=["merchant_id"])
    events = dataset.interactions.drop(columns=["merchant_id"])  # known nowhere
    stripped = Dataset(events, items, dataset.report)
    directories = write_partitions(stripped, tmp_path, 2, "merchant")
    catalogs = [node_catalog(d, items) for d in directories]
    assert sorted(np.concatenate(catalogs).tolist()) == list(range(dataset.num_items))
    department = items["categories"].str.split("|").str[:2].str.join("|").to_numpy()
    assert not set(department[catalogs[0]]) & set(department[catalogs[1]])
    check_complete(stripped, load_nodes(directories))


def test_merchant_ids_missing_on_some_items_are_taken_from_their_events(
    dataset: Dataset,
) -> None:
    """merchant_id empty on some items, or only in the interactions: such an item goes with the
    merchant its events name, and only an item no merchant is known for goes by its category
    (any missing merchant_id sent every item by category, merchants split across nodes)."""
    truth = dataset.items["merchant_id"].to_numpy()
    touched = np.isin(np.arange(dataset.num_items), dataset.interactions["item_idx"])
    blanked = dataset.items.copy()
    blanked.loc[::3, "merchant_id"] = ""
    for items in (blanked, dataset.items.drop(columns="merchant_id")):
        owner = item_merchants(items, NODES, dataset.interactions)
        known = touched | (items.get("merchant_id", pd.Series("", index=items.index)) != "")
        for merchant in np.unique(truth):  # a merchant is never split
            assert len(set(owner[known & (truth == merchant)])) == 1
        department = items["categories"].str.split("|").str[:2].str.join("|").to_numpy()
        for group in np.unique(department[~known]):  # nor a department of unknown merchant
            assert len(set(owner[~known & (department == group)])) == 1


def test_more_nodes_than_merchants_is_refused_before_any_node_is_written(
    dataset: Dataset, tmp_path: Path
) -> None:
    """A merchant partition into more nodes than the data has merchants would leave nodes
    without an event, each failing at its first round (and a budget shared among nodes that do
    not exist): refused, saying how many nodes the data can fill."""
    merchants = dataset.items["merchant_id"].nunique()
    with pytest.raises(DataError, match=f"ask for at most {merchants} nodes") as refused:
        write_partitions(dataset, tmp_path / "parts", merchants + 2, "merchant")
    assert "items" in refused.value.path
    assert not any((tmp_path / "parts").glob("node-*/interactions.csv.gz"))
    assert len(write_partitions(dataset, tmp_path / "fits", merchants, "merchant")) == merchants


def test_unsold_products_never_take_a_merchant_node_of_their_own(
    dataset: Dataset, tmp_path: Path
) -> None:
    """A catalog's largest group may be products nobody bought (no merchant_id, no category:
    one group): balanced by products, it took a node alone, which held no event, and every
    merchant partition into 2 nodes or more was refused. The groups that hold events are placed
    first; unsold ones join them."""
    merchants = dataset.items["merchant_id"].nunique()
    unsold = pd.DataFrame({"item_id": [f"unsold-{k}" for k in range(3 * len(dataset.items))]})
    items = pd.concat([dataset.items, unsold], ignore_index=True).fillna("")
    catalog = Dataset(dataset.interactions, items, dataset.report)
    directories = write_partitions(catalog, tmp_path / "parts", merchants, "merchant")
    assert all(len(node.interactions) for node in load_nodes(directories))
    with pytest.raises(DataError, match=f"ask for at most {merchants} nodes"):
        write_partitions(catalog, tmp_path / "more", merchants + 1, "merchant")


@pytest.mark.parametrize("scheme", ["regional", "merchant"])
def test_an_absurd_node_count_is_refused_at_once(
    dataset: Dataset, tmp_path: Path, scheme: str
) -> None:
    """A billion nodes (a typo) spun for minutes, in the regional rule's per-node loop or the
    merchants' balancing, before the empty nodes were found: more nodes than customers (or
    products) is refused before any work."""
    started = time.perf_counter()
    with pytest.raises(DataError, match="ask for at most"):
        write_partitions(dataset, tmp_path / "parts", 10**9, scheme)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "parts").exists()


def test_bad_partition_arguments(dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="partition"):
        write_partitions(dataset, tmp_path, 2, "by-weather")
    with pytest.raises(ValueError, match="at least one node"):
        write_partitions(dataset, tmp_path, 0)


def test_validation_customers_are_chosen_by_id_alone(dataset: Dataset) -> None:
    """A node picks the same validation customers as the server from its own data: the choice
    depends on the customer's id and the fraction, not on who else is in the split."""
    split = leave_one_out(dataset)
    assert len(split.validation_users(0.0)) == 0
    assert np.array_equal(split.validation_users(1.0), split.test_users)
    some = split.validation_users(0.3)
    assert 0.2 < len(some) / len(split.test_users) < 0.4  # sha256 spreads ids evenly
    assert set(split.user_ids[split.validation_users(0.1)]) <= set(split.user_ids[some])
    half = split.subset(np.arange(len(split.user_ids) // 2))  # another party's customers
    chosen = set(half.user_ids[half.validation_users(0.3)])
    assert chosen == set(split.user_ids[some]) & set(half.user_ids)
    assert all(validation_customer(str(u), 0.3) for u in chosen)


def test_refit_keeps_the_validation_customers_validation_events_out(dataset: Dataset) -> None:
    split = leave_one_out(dataset)
    validating = set(split.validation_users(0.3).tolist())
    histories = split.training_histories(refit=True, valid_fraction=0.3)
    for u in split.test_users[:200]:
        expected = split.train[u] if u in validating else split.history(u, "test")
        assert np.array_equal(histories[u], expected), u
    # the simulation's server keeps the same events from the nodes' partitions
    held = set(holdout_rows(dataset, split, refit=True, valid_fraction=0.3).tolist())
    rows = dataset.interactions.groupby("user_id", sort=True)["row"].agg(list)
    for u in split.test_users[:200]:
        user_rows = rows[split.user_ids[u]]
        assert user_rows[-1] in held
        assert (user_rows[-2] in held) == (u in validating), u


def test_fragmented_histories_are_what_the_merchant_nodes_hold(
    dataset: Dataset, tmp_path: Path
) -> None:
    """The merchant oracle's training data: each customer's history cut by the owner of each
    item, in order, exactly the sequences the merchant partition's nodes hold."""
    split = leave_one_out(dataset)
    histories = split.sequences()
    owner = item_merchants(dataset.items, NODES)
    pieces = fragment_histories(histories, owner)
    assert sum(len(p) for p in pieces) == sum(len(h) for h in histories)
    assert all(len(np.unique(owner[p])) == 1 for p in pieces)
    nodes = load_nodes(write_partitions(dataset, tmp_path, NODES, "merchant"))
    held = Counter()
    for node in nodes:
        held += Counter(tuple(s) for s in leave_one_out(node).sequences())
    assert Counter(tuple(p.tolist()) for p in pieces) == held


def test_cold_items_are_at_no_node_and_only_they_are_missing(
    dataset: Dataset, tmp_path: Path
) -> None:
    """With cold-items, a simulated federation's nodes hold no event on the held-out products
    (the same ones the server's evaluation treats as new) and every other training event."""
    config = RunConfig(clients=NODES, cold_items=0.2, seed=3)
    split = leave_one_out(dataset)
    partitions = ensure_partitions(dataset, split, config, tmp_path)
    cold = cold_item_indices(dataset.num_items, 0.2, seed=3)
    assert len(cold) == int(0.2 * dataset.num_items)
    nodes = load_nodes(sorted(partitions.glob("node-*")))
    valid_fraction = config.valid_fraction(len(split.test_users))
    held = set(holdout_rows(dataset, split, config.refit, valid_fraction))
    kept = dataset.interactions[~dataset.interactions["row"].isin(held)]
    on_cold = np.isin(kept["item_idx"], cold)
    assert on_cold.any()
    union = Counter()
    for node in nodes:
        assert not np.isin(node.interactions["item_idx"], cold).any()
        union += events(node.interactions)
    assert union == events(kept[~on_cold])
    experiment_cold = cold_item_indices(dataset.num_items, config.cold_items, config.seed)
    assert np.array_equal(experiment_cold, cold)


def with_regions(dataset: Dataset, region_of: dict[str, str]) -> Dataset:
    """``dataset`` whose events name their customer's region from ``region_of`` (empty: none)."""
    events = dataset.interactions.assign(region=dataset.interactions["user_id"].map(region_of))
    return Dataset(interactions=events, items=dataset.items, report=dataset.report)


def node_customers(directories: list[Path]) -> list[set[str]]:
    return [set(load_dataset(d).interactions["user_id"]) for d in directories]


def test_a_regional_partition_keeps_each_region_at_one_node(
    dataset: Dataset, tmp_path: Path
) -> None:
    users = sorted(dataset.interactions["user_id"].unique())
    names = ["north", "south", "east", "west", "centre"]
    region_of = {u: names[k % 5] for k, u in enumerate(users)}
    regional = with_regions(dataset, region_of)
    directories = write_partitions(regional, tmp_path / "r", NODES, "regional", 0.0, seed=0)
    check_complete(regional, load_nodes(directories))
    customers = node_customers(directories)
    for name in names:  # every region whole at one node
        members = {u for u, r in region_of.items() if r == name}
        assert sum(bool(members & c) for c in customers) == 1
    assert all(customers)  # five regions over three nodes: none empty
    # ignoring the column, the customers are IID again: regions spread over every node
    ignored = node_customers(
        write_partitions(regional, tmp_path / "i", NODES, "regional", 0.0, 0, by_region=False)
    )
    unnamed = with_regions(dataset, dict.fromkeys(users, ""))
    assert ignored == node_customers(
        write_partitions(unnamed, tmp_path / "n", NODES, "regional", 0.0, seed=0)
    )


def test_fewer_regions_than_nodes_give_the_larger_region_more_nodes(
    dataset: Dataset, tmp_path: Path
) -> None:
    users = sorted(dataset.interactions["user_id"].unique())
    # three quarters in one region, a quarter in another, a few customers without one
    region_of = {u: "big" if k % 4 else "small" for k, u in enumerate(users)}
    for u in users[:9]:
        region_of[u] = ""
    directories = write_partitions(
        with_regions(dataset, region_of), tmp_path, 4, "regional", 0.0, seed=0
    )
    customers = node_customers(directories)
    big = {u for u, r in region_of.items() if r == "big"}
    small = {u for u, r in region_of.items() if r == "small"}
    holding_big = [k for k, c in enumerate(customers) if c & big]
    holding_small = [k for k, c in enumerate(customers) if c & small]
    assert len(holding_big) == 3 and len(holding_small) == 1
    assert not set(holding_big) & set(holding_small)  # a node holds one region
    sizes = [len(customers[k] & big) for k in holding_big]
    assert max(sizes) - min(sizes) <= 1  # a region's customers spread evenly
    unnamed = set(users[:9])
    assert set().union(*customers) >= unnamed  # customers without a region are kept too
    assert sum(len(c) for c in customers) == dataset.num_users


def test_the_regions_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="regions must be auto or off"):
        RunConfig(regions="yes")
    with pytest.raises(ValueError, match="dirichlet-alpha must be 0"):
        RunConfig(dirichlet_alpha=-1.0)  # was taken as 0 (off) without a word
    with pytest.raises(ValueError, match=r"dirichlet-alpha must be 0 .off. or in \(0, 1e\+06\]"):
        RunConfig(dirichlet_alpha=1e308)  # numpy's shares overflowed to 0: a traceback
