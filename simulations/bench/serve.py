"""``fedrec bench serve``: latency of /recommend and /search, in-process and over HTTP.

Two catalogs: the dataset's own (exact scoring) and a synthetic one of ``--items`` products
(default 1,000,000) served through the ANN indexes. The synthetic products are variants of the
real ones: text embedding = the real product's, plus Gaussian noise of norm ``--noise``, then
re-normalised (cosine about 0.7 to the original at the default 1.0); ID parameters = the real
product's, moved as the model's text -> ID map predicts for that change of text (see
:func:`grow_synthetic`); title = the real title plus a colour and a size word. Isotropic random
vectors would have no neighbourhood structure for any index to exploit; real catalogs are full
of near-duplicates and variants. Requests replay real customers'
histories (mapped to random variants at the large scale) and the category + title queries of
``fedrec bench search``. Query encoding by the text tower is inside the /search timings (the
engine's cache of recent query embeddings is emptied before each timed pass: only a query
repeated within a pass is a hit). HTTP runs uvicorn in a thread of this process (httpx client,
one request at a time); ANN recall@10 is measured against exact scoring on both indexes.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.table import Table

from server.serving.index import ANN_THRESHOLD, NPROBE, TEXT_NPROBE, recall_at_k
from server.serving.schemas import RecommendRequest, SearchRequest
from server.serving.search import SearchEngine
from server.serving.service import (
    Limits,
    build_app,
    recommend,
    search,
    set_threads,
)
from shared.data.dataset import leave_one_out, load_dataset
from shared.recommender.artifacts import write_json
from shared.recommender.catalog import grow, set_items
from shared.runs.console import console
from simulations.bench.search import build_engine, title_query

COLOURS = ("red", "black", "white", "pink", "blue", "nude", "coral", "gold", "silver", "green")
NPROBES = (32, 64, 128, 256, 512)  # recall@10 is reported for each
SIZES = ("mini", "travel size", "1 oz", "2 oz", "4 oz", "8 oz", "value pack", "refill")


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(ms),
    }


def workload(engine: SearchEngine, args: argparse.Namespace) -> list[tuple[list[str], str]]:
    """(history item ids, query) pairs from real customers' test-time histories and targets."""
    dataset = load_dataset(args.data)
    split = leave_one_out(dataset)
    rng = np.random.default_rng(args.seed)
    users = rng.choice(
        split.test_users, args.requests, replace=len(split.test_users) < args.requests
    )
    ids, items = dataset.items["item_id"].to_numpy(), dataset.items
    out = []
    for user in users:
        target = split.test_target[user]
        history = ids[split.history(user, "test")][-args.max_history :].tolist()
        out.append(
            (history, title_query(items.at[target, "categories"], items.at[target, "title"], 2))
        )
    return out


def time_in_process(
    engine: SearchEngine, requests: list[tuple[list[str], str]], limits: Limits
) -> dict:
    """The service functions the HTTP handlers call, without HTTP."""
    for history, query in requests[:5]:  # warm-up
        recommend(engine, limits, RecommendRequest(history=history, k=10))
        search(engine, limits, SearchRequest(query=query, history=history, k=10))
    engine.query_vector.cache_clear()  # a query is encoded the first time it is timed
    times: dict[str, list[float]] = {"recommend": [], "search": [], "encode": []}
    for history, query in requests:
        start = time.perf_counter()
        recommend(engine, limits, RecommendRequest(history=history, k=10))
        times["recommend"].append(time.perf_counter() - start)
        start = time.perf_counter()
        search(engine, limits, SearchRequest(query=query, history=history, k=10))
        times["search"].append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.encode([query])
        times["encode"].append(time.perf_counter() - start)
    return {name: percentiles(values) for name, values in times.items()}


def time_http(
    engine: SearchEngine, requests: list[tuple[list[str], str]], limits: Limits, port: int
) -> dict:
    """The same requests through uvicorn on 127.0.0.1 and an httpx client."""
    import httpx
    import uvicorn

    app = build_app(engine, limits, admin_token=secrets.token_urlsafe(32))  # no writes here
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    times: dict[str, list[float]] = {"recommend": [], "search": []}
    engine.query_vector.cache_clear()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for i, (history, query) in enumerate(requests):
                for name, body in (
                    ("recommend", {"history": history, "k": 10}),
                    ("search", {"query": query, "history": history, "k": 10}),
                ):
                    start = time.perf_counter()
                    client.post(f"/{name}", json=body).raise_for_status()
                    if i >= 5:  # the first few warm up the connection
                        times[name].append(time.perf_counter() - start)
    finally:
        server.should_exit = True
        thread.join()
    return {name: percentiles(values) for name, values in times.items()}


def grow_synthetic(
    engine: SearchEngine, total: int, noise: float, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Grow the engine's model to ``total`` products with variants of its own. Returns the full
    product table and each product's original row (the caller rebuilds the engine).

    A variant's text embedding is its original's plus noise, re-normalised; its ID parameters
    are the original's, shifted by what the ridge text -> ID map (the one that gives a new
    product its ID parameters) predicts for that change of text. Independent ID noise would
    undo what training learned: in a trained model the ID vectors largely cancel the scaled
    text term, and a variant would land nowhere near its original. Noise vectors come from a
    pool of 65,536 Gaussian vectors (fast, and as good here).
    """
    model, base_count = engine.catalog.model, len(engine)
    count = total - base_count
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(rng.integers(0, base_count, count))
    text_dim = model.text.shape[1]
    text_noise = noise * torch.randn(65_536, text_dim, generator=generator) / text_dim**0.5
    solution = engine.text_to_id.solution
    with torch.no_grad():
        learned = (
            torch.cat(
                [model.id_in.weight[1:], model.id_scores.weight, model.id_scores.bias[:, None]],
                dim=1,
            ).clone()
            if solution is not None
            else None
        )
    grow(model, count)
    for start in range(0, count, 100_000):
        rows = base[start : start + 100_000]
        pick = torch.randint(0, 65_536, (len(rows),), generator=generator)
        text = torch.nn.functional.normalize(model.text[rows] + text_noise[pick], dim=1)
        ids = (
            learned[rows] + (text - model.text[rows]) @ solution[:-1].float()
            if solution is not None
            else None
        )
        set_items(model, np.arange(base_count + start, base_count + start + len(rows)), text, ids)
    base = np.concatenate([np.arange(base_count), base.numpy()])
    catalog = pd.DataFrame({f: values[base] for f, values in engine.catalog.fields.items()})
    catalog.loc[base_count:, "item_id"] = [f"synthetic-{i:07d}" for i in range(count)]
    colours = np.asarray(COLOURS, dtype=object)[rng.integers(0, len(COLOURS), count)]
    sizes = np.asarray(SIZES, dtype=object)[rng.integers(0, len(SIZES), count)]
    catalog.loc[base_count:, "title"] = catalog["title"][base_count:] + " " + colours + " " + sizes
    return catalog, base


def variant_requests(
    requests: list[tuple[list[str], str]],
    base_of: np.ndarray,
    engine: SearchEngine,
    base_rows: dict[str, int],
    seed: int,
) -> list[tuple[list[str], str]]:
    """Replace each history product by a random variant of it (or itself)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(base_of, kind="stable")
    starts = np.searchsorted(base_of[order], np.arange(base_of.max() + 2))
    ids = engine.catalog.fields["item_id"]

    def variant(item_id: str) -> str:
        row = base_rows[item_id]
        return ids[order[rng.integers(starts[row], starts[row + 1])]]

    return [([variant(i) for i in history], query) for history, query in requests]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a run's model/ directory (default: the untrained text baseline)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench-serve.json"),
        help="JSON results file (default runs/bench-serve.json)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=200,
        help="timed requests per endpoint and setting (default 200)",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=1_000_000,
        help="size of the synthetic catalog (0 skips it; default 1,000,000)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="norm of the noise that makes a variant (default 1.0)",
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        default=NPROBE,
        help="IVF lists probed per recommendation, as fedrec serve (default 512)",
    )
    parser.add_argument(
        "--text-nprobe",
        type=int,
        default=TEXT_NPROBE,
        help="IVF lists probed per dense text search (default 128)",
    )
    parser.add_argument(
        "--max-history",
        type=int,
        default=50,
        help="most recent history items sent per request (default 50)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/faiss threads per request, as fedrec serve (default 1)",
    )
    parser.add_argument("--port", type=int, default=8765, help="port for the HTTP timings")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    limits = Limits(max_history=max(Limits().max_history, args.max_history))
    engine, model_name = build_engine(args)
    requests = workload(engine, args)
    result: dict = {
        "data": str(args.data),
        "model": model_name,
        "k": 10,
        "threads": args.threads,
        "settings": {},
    }
    print(
        f"{len(engine)} products ({engine.retrieval}): timing {args.requests} requests ...",
        flush=True,
    )
    set_threads(args.threads)
    result["settings"]["dataset"] = {
        "products": len(engine),
        "retrieval": engine.retrieval,
        "in_process": time_in_process(engine, requests, limits),
        "http": time_http(engine, requests, limits, args.port),
    }
    if args.items > len(engine):
        started = time.time()
        print(f"growing to {args.items:,} synthetic products ...", flush=True)
        set_threads(os.cpu_count() or 1)  # building is batch work
        catalog, base_of = grow_synthetic(engine, args.items, args.noise, args.seed)
        rows = dict(engine.catalog.row_of)
        model, encode, weights = engine.catalog.model, engine.encode, engine.weights
        del engine
        gc.collect()
        engine = SearchEngine(
            model,
            catalog,
            encode,
            weights,
            ann_threshold=min(ANN_THRESHOLD, args.items),
            nprobe=args.nprobe,
            text_nprobe=args.text_nprobe,
        )
        del catalog
        build_s = round(time.time() - started, 1)
        set_threads(args.threads)
        large = variant_requests(requests, base_of, engine, rows, args.seed)
        print(f"built in {build_s} s; measuring recall and timing ...", flush=True)
        history_rows = [engine.rows(h) for h, _ in large[:100]]
        states = engine.states(history_rows)
        queries = engine.encode([q for _, q in large[:100]])
        result["settings"]["synthetic"] = {
            "products": len(engine),
            "retrieval": engine.retrieval,
            "build_s": build_s,
            "nprobe": {"preference": args.nprobe, "text": args.text_nprobe},
            "noise": args.noise,
            "recall@10": {
                "preference": recall_at_k(engine.catalog.preference_index, states, 10, NPROBES),
                "text": recall_at_k(engine.catalog.text_index, queries, 10, NPROBES),
            },
            "in_process": time_in_process(engine, large, limits),
            "http": time_http(engine, large, limits, args.port + 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print_table(result)
    print(f"results in {args.out}")
    return 0


def print_table(result: dict) -> None:
    table = Table(title=f"serving latency, k = 10, model: {result['model']}")
    for column in (
        "catalog",
        "retrieval",
        "endpoint",
        "in-process p50 / p99 ms",
        "HTTP p50 / p99 ms",
        "ANN recall@10",
    ):
        table.add_column(column, justify="right" if "ms" in column else "left")
    for setting in result["settings"].values():
        recall = (
            {
                endpoint: setting["recall@10"][index][setting["nprobe"][index]]
                for endpoint, index in (("recommend", "preference"), ("search", "text"))
            }
            if "recall@10" in setting
            else {}
        )
        for endpoint in ("recommend", "search", "encode"):
            inner, http = setting["in_process"][endpoint], setting["http"].get(endpoint)
            table.add_row(
                f"{setting['products']:,}",
                setting["retrieval"],
                "query encoding" if endpoint == "encode" else f"/{endpoint}",
                f"{inner['p50_ms']:.1f} / {inner['p99_ms']:.1f}",
                f"{http['p50_ms']:.1f} / {http['p99_ms']:.1f}" if http else "",
                f"{recall[endpoint]:.3f}" if endpoint in recall else "",
            )
    console().print(table)
