"""``fedrec data sample``: a random sample of a dataset's customers, as a dataset of its own.

For planning: a federation, a privacy budget or a benchmark can be tried on a few thousand
customers in minutes before it is run on all of them. Every event of a sampled customer is kept
(their whole histories, all columns), and the products they touched; the sample is written
atomically like every other dataset (``shared.data.convert.write_dataset``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.convert import write_dataset
from shared.data.dataset import DataError, find_table, load_dataset, read_table


def sample_customers(
    interactions: pd.DataFrame, items: pd.DataFrame, customers: int, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The events of ``customers`` customers drawn uniformly (seeded), and their products."""
    users = interactions["user_id"].astype(str).unique()
    if not 0 < customers <= len(users):
        raise ValueError(f"--customers must be in 1..{len(users)}, got {customers}")
    chosen = np.random.default_rng(seed).choice(users, customers, replace=False)
    kept = interactions[interactions["user_id"].astype(str).isin(set(chosen))]
    touched = set(kept["item_id"].astype(str))
    return kept, items[items["item_id"].astype(str).isin(touched)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (docs/data-and-evaluation.md)"
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    parser.add_argument("--customers", required=True, type=int, help="how many customers to keep")
    parser.add_argument("--seed", type=int, default=0, help="which sample (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    load_dataset(args.data)  # validates the whole dataset first, with its clear errors
    interactions = read_table(find_table(args.data, "interactions"))
    items = read_table(find_table(args.data, "items"))
    try:
        kept, kept_items = sample_customers(interactions, items, args.customers, args.seed)
    except ValueError as error:
        raise DataError(args.data, str(error)) from None
    write_dataset(args.out, kept, kept_items, force=args.force)
    print(
        f"sampled {args.customers:,} customers of {args.data} -> {args.out}: "
        f"{len(kept_items):,} products, {len(kept):,} events"
    )
    return 0
