"""``fedrec bench search``: product-search quality of BM25, dense text and personalised fusion.

Protocol (after Ai et al., SIGIR 2017, "Learning a hierarchical embedding model for personalized
product search"): a customer's held-out purchase is the product they were looking for, and the
query is built from that product's category path: its words, lower-cased, split on non-
alphanumerics, English stopwords and one-letter words removed, deduplicated in order
("Beauty|Makeup|Nails|Nail Polish" -> "beauty makeup nails nail polish"). A second query set
adds the first ``--title-words`` title words not already in the query (alphabetic words only), a
closer stand-in for what people type. The split is the leave-one-out of
docs/data-and-evaluation.md: the validation target with the training history tunes the fusion
weights, the test target with the training + validation history measures them; ranking is over
the full catalog minus the history items.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
from rich.table import Table

from server.serving.lexical import tokenize
from server.serving.search import (
    SIGNALS,
    WEIGHTS_FILE,
    FusionWeights,
    Pool,
    SearchEngine,
    load_engine,
    zscore,
)
from shared.data.dataset import Split, leave_one_out, load_dataset
from shared.recommender.artifacts import write_json
from shared.recommender.experiment import Experiment
from shared.recommender.metrics import metrics_from_ranks
from shared.recommender.text import TextEncoder
from shared.runs.config import RunConfig
from shared.runs.console import console
from shared.runs.progress import progress_bar

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
QUERY_SETS = ("category", "category+title")
METHODS = {  # fixed weights (lexical, dense, preference); "tuned" rows are chosen on validation
    "bm25": (1.0, 0.0, 0.0),
    "dense": (0.0, 1.0, 0.0),
    "recommender (no query)": (0.0, 0.0, 1.0),
}


def category_query(categories: str) -> str:
    """The words of a category path, stopwords removed, deduplicated in order."""
    return " ".join(dict.fromkeys(tokenize(categories.replace("|", " "))))


def title_query(categories: str, title: str, words: int) -> str:
    """The category query plus the first ``words`` new alphabetic title words."""
    query = category_query(categories).split()
    extra = [w for w in dict.fromkeys(tokenize(title)) if w.isalpha() and w not in query]
    return " ".join(query + extra[:words])


def build_engine(args: argparse.Namespace) -> tuple[SearchEngine, str]:
    """The trained model's engine, or the untrained text baseline's (nothing is trained)."""
    if args.model:
        return load_engine(args.model, args.data), str(args.model)
    experiment = Experiment.prepare(args.data, RunConfig(), show_progress=not args.quiet)
    encode = partial(TextEncoder(experiment.config.text_model).encode, show_progress=False)
    engine = SearchEngine(experiment.new_model(), experiment.dataset.items, encode)
    return engine, "untrained text baseline (Experiment.new_model)"


def make_pools(
    engine: SearchEngine,
    split: Split,
    rows_of: np.ndarray,
    users: np.ndarray,
    stage: str,
    queries: list[str],
    quiet: bool,
) -> tuple[list[Pool], np.ndarray]:
    """Each query's candidate pool and the target's position in it (-1: not in the pool)."""
    histories = [rows_of[split.history(u, stage)] for u in users]
    targets = rows_of[split.target(stage)[users]]
    unique = sorted(set(queries))
    vectors = dict(zip(unique, engine.encode(unique), strict=True))
    states = engine.states(histories)
    pools, positions = [], np.full(len(users), -1)
    for i in progress_bar(range(len(users)), f"{stage} candidate pools", disable=quiet):
        pool = engine.candidates(queries[i], vectors[queries[i]], histories[i], states[i])
        pools.append(pool)
        found = np.flatnonzero(pool.rows == targets[i])
        positions[i] = found[0] if len(found) else -1
    return pools, positions


def ranks(pools: list[Pool], positions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """1-based rank of each target under each weight row (0 = not in the top 20)."""
    out = np.zeros((len(weights), len(pools)), dtype=np.int64)
    for i, (pool, position) in enumerate(zip(pools, positions, strict=True)):
        if position < 0:
            continue
        fused = weights @ zscore(pool.signals)
        target = fused[:, position : position + 1]
        rank = 1 + (fused > target).sum(1) + (fused[:, :position] == target).sum(1)
        out[:, i] = np.where(rank <= 20, rank, 0)
    return out


def summary(rank: np.ndarray) -> dict[str, float]:
    metrics = metrics_from_ranks(rank)
    return {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a run's model/ directory (default: the untrained text baseline); "
        f"the tuned weights are written there as {WEIGHTS_FILE}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench-search.json"),
        help="JSON results file (default runs/bench-search.json)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=1000,
        help="customers sampled for validation and for test (default 1000)",
    )
    parser.add_argument(
        "--title-words",
        type=int,
        default=2,
        help="title words added in the second query set (default 2)",
    )
    parser.add_argument(
        "--pool", type=int, default=FusionWeights.pool, help="candidates per signal (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    started = time.time()
    dataset = load_dataset(args.data)
    split = leave_one_out(dataset)
    engine, model_name = build_engine(args)
    engine.weights = replace(engine.weights, pool=args.pool)
    rows_of = engine.rows(dataset.items["item_id"].tolist())
    rng = np.random.default_rng(args.seed)
    users = np.sort(
        rng.choice(split.test_users, min(args.users, len(split.test_users)), replace=False)
    )
    items = dataset.items
    grid = np.array([w for w in itertools.product(GRID, repeat=3) if any(w)])
    result: dict = {
        "data": str(args.data),
        "model": model_name,
        "users": len(users),
        "protocol": __doc__.split("Protocol ", 1)[1].strip(),
        "examples": {},
    }
    scores: dict[str, dict[str, np.ndarray]] = {}
    for stage in ("valid", "test"):
        targets = split.target(stage)[users]
        for name in QUERY_SETS:
            queries = [
                category_query(items.at[t, "categories"])
                if name == "category"
                else title_query(items.at[t, "categories"], items.at[t, "title"], args.title_words)
                for t in targets
            ]
            result["examples"][name] = queries[:3]
            pools, positions = make_pools(engine, split, rows_of, users, stage, queries, args.quiet)
            scores.setdefault(stage, {})[name] = ranks(pools, positions, grid)
            result.setdefault("target_in_pool", {})[f"{stage}/{name}"] = float(
                (positions >= 0).mean()
            )
    valid = np.mean([[summary(r)["ndcg@10"] for r in scores["valid"][n]] for n in QUERY_SETS], 0)
    personal = int(np.argmax(valid))
    text_only = int(np.flatnonzero(grid[:, 2] == 0)[np.argmax(valid[grid[:, 2] == 0])])
    chosen = {
        **{m: grid.tolist().index(list(w)) for m, w in METHODS.items()},
        "bm25 + dense (tuned)": text_only,
        "personalised fusion (tuned)": personal,
    }
    weights = FusionWeights(*grid[personal].tolist(), pool=args.pool)
    result["weights"] = asdict(weights)
    result["methods"] = {
        m: dict(zip(SIGNALS, grid[i].tolist(), strict=True)) for m, i in chosen.items()
    }
    for stage in ("valid", "test"):
        result[stage] = {
            n: {m: summary(scores[stage][n][i]) for m, i in chosen.items()} for n in QUERY_SETS
        }
    result["timing_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    if args.model:
        weights.save(args.model / WEIGHTS_FILE)
    print_table(result)
    print(
        f"tuned weights {json.dumps(result['weights'])}; results in {args.out}"
        + (f"; weights saved to {args.model / WEIGHTS_FILE}" if args.model else "")
    )
    return 0


def print_table(result: dict) -> None:
    table = Table(
        title=f"product search, test split, {result['users']} customers, model: {result['model']}"
    )
    table.add_column("method")
    for name in QUERY_SETS:
        table.add_column(f"{name}\nNDCG@10", justify="right")
        table.add_column(f"{name}\nHR@10", justify="right")
    for method in result["methods"]:
        cells = [
            f"{result['test'][n][method][m]:.4f}" for n in QUERY_SETS for m in ("ndcg@10", "hr@10")
        ]
        table.add_row(method, *cells)
    console().print(table)
