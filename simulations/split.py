"""``fedrec data split``: a pilot's data, laid out as each party of a federation holds it.

``OUT/catalog/`` is the public catalog alone (``items.csv.gz``, no events): what the operator's
server is given. ``OUT/node-1`` ... ``OUT/node-N`` are each a dataset directory of its own, the
node's events plus the same catalog, with its ``node.json`` (name, catalog it sells, declared
customer figure): what each merchant or region keeps on its own machine. Nothing is held out:
in a pilot the nodes evaluate the global model on their own customers (federated evaluation).
Written aside and renamed into place, so a failed split leaves nothing behind.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from shared.data.dataset import load_dataset
from shared.data.partition import SCHEMES, write_partitions
from shared.runs.config import MAX_DIRICHLET_ALPHA

CATALOG = "catalog"


def split_dataset(
    data: Path,
    out: Path,
    nodes: int,
    partition: str,
    seed: int = 0,
    alpha: float = 0.0,
    by_region: bool = True,
) -> tuple[Path, list[Path]]:
    """Write ``out/catalog`` and ``out/node-1..N``; returns the catalog and the node
    directories."""
    if out.exists():
        raise FileExistsError(f"{out} exists: fedrec data split writes a new directory")
    dataset = load_dataset(data)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        directories = write_partitions(
            dataset, staging, nodes, partition, alpha, seed, first=1, by_region=by_region
        )
        (staging / CATALOG).mkdir()
        dataset.items.to_csv(staging / CATALOG / "items.csv.gz", index=False)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / CATALOG, [out / d.name for d in directories]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="the dataset directory to split")
    parser.add_argument("--nodes", type=int, required=True, help="how many nodes")
    parser.add_argument(
        "--partition",
        choices=SCHEMES,
        default="regional",
        help="regional: customers split across nodes; merchant: each node holds the events "
        "on its own products",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write (new)")
    parser.add_argument("--seed", type=int, default=0, help="which random split")
    parser.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=0.0,
        help="regional only: 0 = customers by region, else IID across nodes; > 0 skews the "
        "nodes by category",
    )
    parser.add_argument(
        "--regions",
        choices=("auto", "off"),
        default="auto",
        help="regional only: auto = each customer goes with the region their events name (the "
        "data's region column, when it has one); off = ignore it",
    )


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise SystemExit("fedrec: --nodes must be at least 1")
    if not 0 <= args.dirichlet_alpha <= MAX_DIRICHLET_ALPHA:  # NaN fails too
        raise SystemExit(
            f"fedrec: --dirichlet-alpha must be 0 or a positive number up to "
            f"{MAX_DIRICHLET_ALPHA:g}, got {args.dirichlet_alpha}"
        )
    try:
        catalog, nodes = split_dataset(
            args.data,
            args.out,
            args.nodes,
            args.partition,
            args.seed,
            args.dirichlet_alpha,
            by_region=args.regions == "auto",
        )
    except FileExistsError as error:
        raise SystemExit(f"fedrec: {error}") from None
    print(f"wrote {catalog} (the public catalog, for the server)")
    for directory in nodes:
        print(f"wrote {directory} (a node's own data)")
    return 0
