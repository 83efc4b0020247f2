"""Split one dataset into per-node dataset directories, as a federation would hold them.

- ``regional``: customers are split across nodes by the region their events name (the data's
  ``region`` column; ``regions=off`` ignores it), else IID, or (``alpha`` > 0) skewed by a
  Dirichlet over each customer's dominant category (its path's first two levels: Amazon's
  first is the store itself); a node holds its customers' whole histories.
- ``merchant``: products belong to merchants (an item's ``merchant_id``, else the one its events
  name, else its category path's first levels); node k holds every event on merchant k's
  products.

Every node directory is a complete dataset directory (docs/data-and-evaluation.md) with the full,
public catalog
plus ``node.json`` naming the node and its own catalog (all items, or its merchant's). A node
reads only its own directory, in simulation exactly as in deployment.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.dataset import Dataset, Split
from shared.data.errors import DataError
from shared.federation.node_directory import NodeInfo, round_down_2sf
from shared.runs.config import RunConfig
from shared.runs.durable import make_private, private_dir

SCHEMES = ("regional", "merchant")


def item_merchants(
    items: pd.DataFrame, num_nodes: int, interactions: pd.DataFrame | None = None
) -> np.ndarray:
    """Node index of each item, by its merchant: the item's ``merchant_id``, else the one its
    events name most often (``interactions``), else (no merchant known) its category path's
    first two levels (deeper, up to five, until there is a group with events per node).
    Groups without an event (known from ``interactions``) are placed after the others: a
    node of unsold products alone would hold nothing to train on."""
    merchant = _column(items, "merchant_id")
    sold = np.ones(len(items), dtype=bool)
    if interactions is not None:
        sold = np.isin(np.arange(len(items)), interactions["item_idx"].to_numpy())
    if interactions is not None and "merchant_id" in interactions:
        named = interactions.assign(merchant_id=_column(interactions, "merchant_id"))
        named = named[named["merchant_id"] != ""]
        sold_by = named.groupby("item_idx")["merchant_id"].agg(lambda s: s.value_counts().index[0])
        unknown = (merchant == "").to_numpy()
        merchant[unknown] = sold_by.reindex(np.flatnonzero(unknown)).fillna("").to_numpy()
    path = _column(items, "categories").str.split("|")
    for depth in range(2, 6):
        category = "category:" + path.str[:depth].str.join("|")
        keys = ("merchant:" + merchant).where(merchant != "", category)
        if keys[sold].nunique() >= num_nodes or (merchant != "").all():
            break
    sizes = keys.value_counts()
    selling = sizes.index.isin(keys[sold].unique())
    owner = balanced_owner(pd.concat([sizes[selling], sizes[~selling]]), num_nodes)
    return keys.map(owner).to_numpy()


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]`` as stripped text, empty where missing or absent."""
    if name not in frame:
        return pd.Series("", index=frame.index)
    return frame[name].fillna("").astype(str).str.strip()


def fragment_histories(histories: list[np.ndarray], owner: np.ndarray) -> list[np.ndarray]:
    """Each history cut into the pieces its items' owners (``owner[item]``: a node) each hold,
    in order: what a merchant federation's nodes see of every customer."""
    pieces = []
    for history in histories:
        history = np.asarray(history, dtype=np.int64)
        nodes = owner[history]
        pieces.extend(history[nodes == node] for node in np.unique(nodes))
    return pieces


def balanced_owner(sizes: pd.Series, num_nodes: int) -> dict:
    """Node of each group (``sizes``: its size by key, in the order they are placed: largest
    first, as ``value_counts`` gives them): each group to the currently smallest node;
    balanced and deterministic."""
    load, owner = np.zeros(num_nodes), {}
    for key, size in sizes.items():
        node = int(np.argmin(load))
        owner[key], load[node] = node, load[node] + size
    return owner


def customer_regions(dataset: Dataset) -> pd.Series:
    """Each customer's region: the one most of their events name (``region``), empty where
    none does; an empty series where the data have no ``region`` column."""
    events = dataset.interactions
    if "region" not in events:
        return pd.Series(dtype=str)
    named = events.assign(region=_column(events, "region"))
    named = named[named["region"] != ""]
    regions = named.groupby("user_id")["region"].agg(lambda s: s.value_counts().index[0])
    return regions.reindex(events["user_id"].unique()).fillna("")


def region_nodes(regions: pd.Series, num_nodes: int, rng: np.random.Generator) -> dict[str, int]:
    """Node of each customer by region (``regions``: customer -> region, empty: none). With at
    least as many regions as nodes each region goes whole to one node (:func:`balanced_owner`);
    with fewer, each region gets nodes in proportion to its customers (at least one: the
    D'Hondt rule) and its customers are spread over them at random. Customers without a region
    are spread over all nodes at random."""
    named = regions[regions != ""]
    sizes = named.value_counts()
    assignment: dict[str, int] = {}
    if len(sizes) >= num_nodes:
        owner = balanced_owner(sizes, num_nodes)
        assignment.update(zip(named.index, named.map(owner), strict=True))
    else:
        shares = np.ones(len(sizes), dtype=int)
        for _ in range(num_nodes - len(sizes)):
            shares[int(np.argmax(sizes.to_numpy() / (shares + 1)))] += 1
        first = np.concatenate([[0], np.cumsum(shares)[:-1]])
        for (region, _), start, count in zip(sizes.items(), first, shares, strict=True):
            customers = named.index[named == region]
            nodes = start + rng.permutation(len(customers)) % count
            assignment.update(zip(customers, nodes, strict=True))
    unnamed = regions.index[regions == ""]
    assignment.update(zip(unnamed, rng.permutation(len(unnamed)) % num_nodes, strict=True))
    return {user: int(node) for user, node in assignment.items()}


def user_nodes(
    dataset: Dataset, num_nodes: int, alpha: float, seed: int, by_region: bool = True
) -> dict[str, int]:
    """Node of each customer: Dirichlet(``alpha``)-skewed by dominant category (two levels) when
    ``alpha`` > 0, else by region when the data name one (``by_region``: :func:`region_nodes`),
    else IID."""
    rng = np.random.default_rng(seed)
    users = dataset.interactions["user_id"].unique()
    if alpha <= 0:
        regions = customer_regions(dataset) if by_region else pd.Series(dtype=str)
        if (regions != "").any():
            return region_nodes(regions, num_nodes, rng)
        return dict(zip(users, rng.permutation(len(users)) % num_nodes, strict=True))
    top = dataset.items["categories"].astype(str).str.split("|").str[:2].str.join("|").to_numpy()
    events = dataset.interactions.assign(top=top[dataset.interactions["item_idx"].to_numpy()])
    dominant = events.groupby("user_id")["top"].agg(lambda s: s.value_counts().index[0])
    assignment = {}
    for _, group in dominant.groupby(dominant):
        shares = rng.dirichlet(np.full(num_nodes, alpha))
        nodes = rng.choice(num_nodes, size=len(group), p=shares)
        assignment.update(zip(group.index, nodes, strict=True))
    return assignment


def holdout_rows(
    dataset: Dataset, split: Split, refit: bool, valid_fraction: float = 0.0
) -> np.ndarray:
    """File rows of the events the simulation's server keeps for evaluation: every customer's
    test event, and the validation event unless the run refits on it (then still that of the
    validation customers, ``valid_fraction``, which choose the rounds). Nodes never see them."""
    rows = dataset.interactions.groupby("user_id", sort=True)["row"].agg(list)
    validating = np.zeros(len(split.user_ids), dtype=bool)
    validating[split.validation_users(valid_fraction)] = True
    held = []
    for u, user_rows in enumerate(rows.reindex(split.user_ids)):
        if split.test_target[u] >= 0:
            held.extend(user_rows[-1:] if refit and not validating[u] else user_rows[-2:])
    return np.asarray(held, dtype=np.int64)


def cold_item_indices(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """The products held out of all training (``cold-items``): a seeded random ``fraction``
    of the catalog, sorted; the same for the server's evaluation and the nodes' partitions."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_items, int(fraction * num_items), replace=False))


def write_partitions(
    dataset: Dataset,
    out: Path,
    num_nodes: int,
    scheme: str = "regional",
    alpha: float = 0.0,
    seed: int = 0,
    holdout: np.ndarray | None = None,
    first: int = 0,
    by_region: bool = True,
) -> list[Path]:
    """Write ``out/node-<k>/`` for k in first..first+num_nodes-1 (Flower's simulation numbers
    nodes from 0, a pilot's ``fedrec data split`` from 1), without the ``holdout`` file rows
    (the server's evaluation events); a regional partition follows the data's regions unless
    ``by_region`` is false (:func:`user_nodes`). Returns the directories."""
    if scheme not in SCHEMES:
        raise ValueError(f"partition must be one of {SCHEMES}, got {scheme!r}")
    if num_nodes < 1:
        raise ValueError("a federation needs at least one node")
    holders = dataset.num_users if scheme == "regional" else dataset.num_items
    if num_nodes > holders:  # some would hold nothing; refused before any work for them
        what = "customers" if scheme == "regional" else "products"
        raise DataError(
            dataset.report.interactions_file if scheme == "regional" else dataset.report.items_file,
            f"a {scheme} partition into {num_nodes:,} nodes: only {holders:,} {what} to share; "
            f"ask for at most {holders:,} nodes",
        )
    events = dataset.interactions.sort_values("row", kind="stable")
    if holdout is not None:
        events = events[~events["row"].isin(holdout)]
    items = dataset.items
    if scheme == "regional":
        node_of_user = user_nodes(dataset, num_nodes, alpha, seed, by_region)
        node_of_event = events["user_id"].map(node_of_user).to_numpy()
        catalogs = [None] * num_nodes
    else:
        owner = item_merchants(items, num_nodes, dataset.interactions)
        node_of_event = owner[events["item_idx"].to_numpy()]
        catalogs = [items["item_id"].to_numpy()[owner == k].tolist() for k in range(num_nodes)]
    empty = sorted(set(range(num_nodes)) - set(np.unique(node_of_event).tolist()))
    holding = num_nodes - len(empty)  # the nodes an event reaches
    if empty:
        raise DataError(
            dataset.report.items_file if scheme == "merchant" else dataset.report.interactions_file,
            f"a {scheme} partition into {num_nodes} nodes leaves {len(empty)} of them without "
            f"an event (node{'s' * (len(empty) > 1)} {', '.join(map(str, empty[:5]))}"
            f"{', ...' if len(empty) > 5 else ''}): "
            + (
                "the products' merchants (merchant_id, of the item or its events, else its "
                "category) hold events at "
                f"only {holding} node{'s' * (holding != 1)}"
                if scheme == "merchant"
                else f"{dataset.num_users} customer{'s' * (dataset.num_users != 1)}"
            )
            + f"; ask for at most {holding} node{'s' * (holding != 1)}",
        )
    columns = [
        c
        for c in ("user_id", "item_id", "timestamp", "event", "merchant_id", "region")
        if c in events
    ]
    directories = []
    private_dir(Path(out))
    for node in range(num_nodes):
        directory = Path(out) / f"node-{first + node}"
        private_dir(directory)
        mine = events[node_of_event == node]
        mine[columns].to_csv(directory / "interactions.csv.gz", index=False)
        items.to_csv(directory / "items.csv.gz", index=False)
        NodeInfo(
            node=f"{scheme}-{first + node}",
            partition=scheme,
            catalog=catalogs[node],
            customers=round_down_2sf(int(mine["user_id"].nunique())),
        ).write(directory)
        make_private(directory)
        directories.append(directory)
    return directories


def ensure_partitions(
    dataset: Dataset,
    split: Split,
    config: RunConfig,
    out: Path,
    prepare: Callable[[Path, list[Path]], None] | None = None,
) -> Path:
    """``out/partitions/node-<k>/``: a simulated federation's node directories, without the
    events its server side keeps for evaluation; written once, kept as they are by a resumed
    run. ``prepare(staging, directories)`` may add to them before they are in place (the
    simulation's canaries).

    With ``federated-eval`` the nodes get every event, like a deployment's nodes, and each
    holds out its own customers' last events itself (client/node.py:training_histories): a
    customer's last event overall is also the last at whichever node holds it, and the one
    before it the last or the one before there, so the server's held-out events stay out of
    training all the same."""
    partitions = out / "partitions"
    if not partitions.exists():  # built aside, then renamed: never left half-written
        staging = out / "partitions.partial"
        shutil.rmtree(staging, ignore_errors=True)
        valid_fraction = config.valid_fraction(len(split.test_users))
        held = (
            None
            if config.federated_eval
            else holdout_rows(dataset, split, config.refit, valid_fraction)
        )
        cold = cold_item_indices(dataset.num_items, config.cold_items, config.seed)
        if len(cold):  # products new to everyone: no node holds an event on them
            events = dataset.interactions
            on_cold = events["row"].to_numpy()[np.isin(events["item_idx"].to_numpy(), cold)]
            held = on_cold if held is None else np.union1d(held, on_cold)
        directories = write_partitions(
            dataset,
            staging,
            config.clients,
            config.partition,
            config.dirichlet_alpha,
            config.seed,
            held,
            by_region=config.regions == "auto",
        )
        if prepare is not None:
            prepare(staging, directories)
        make_private(staging)  # node data: the owner's only
        staging.rename(partitions)
    return partitions
