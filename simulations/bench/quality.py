"""``fedrec bench quality``: baselines, the model's ablations and the fusion model, side by side.

One split, the protocol and metrics of docs/data-and-evaluation.md for every method: popularity,
ALS, ItemKNN, text-only and late fusion (``simulations.baselines``), then the model with
``variant=id``, ``variant=text`` and ``variant=fusion``, each trained by ``train_centralized``
with the same settings. With ``--cold-items F``, a fraction F of the items is held out of all
training and every method is also reported on the customers whose test target is such a cold
item, and on the rest.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared.recommender.artifacts import write_json
from shared.recommender.catalog import fill_cold_items
from shared.recommender.experiment import Experiment
from shared.recommender.metrics import METRICS, ScoreFn, evaluate
from shared.runs.console import console as log_console
from simulations.baselines import BASELINES, baselines
from simulations.train import (
    add_run_config_arguments,
    run_config_from_args,
    train_centralized,
)

VARIANTS = ("id", "text", "fusion")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (docs/data-and-evaluation.md)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench_quality.json"),
        help="JSON file for the results (default ./bench_quality.json)",
    )
    parser.add_argument(
        "--cold-items",
        type=float,
        default=None,
        metavar="F",
        help="hold out this fraction of the items from all training and report "
        "cold-target and warm-target customers apart (the setting cold-items; default 0: none)",
    )
    parser.add_argument(
        "--new-item-boosts",
        default="",
        metavar="B,B,...",
        help="with --cold-items: also score the trained fusion model with these "
        "new-item boosts (no retraining), e.g. 0.5,1,1.5",
    )
    parser.add_argument(
        "--skip-model",
        action="store_true",
        help="baselines only: do not train the model and its ablations",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="model variants to train (default id,text,fusion)",
    )
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="baselines to run (default popularity,als,itemknn,text,late_fusion)",
    )
    add_run_config_arguments(parser)


def model_variants(
    experiment: Experiment,
    show_progress: bool,
    variants: tuple[str, ...] = VARIANTS,
    boosts: tuple[float, ...] = (),
) -> Iterator[tuple[str, ScoreFn, dict]]:
    """The model and its ablations, trained centrally on the same split with the same settings;
    items no customer trained on get text-predicted ID vectors, as every run's outputs do.
    Each of ``boosts`` adds the same trained model with that ``new_item_boost`` instead."""
    for variant in variants:
        config = dataclasses.replace(experiment.config, variant=variant)
        run = dataclasses.replace(experiment, config=config)
        result = train_centralized(run, show_progress)
        model = result["model"]
        trained = run.trained_items(run.train_histories(config.refit)).to(model.text.device)
        params = {"variant": variant, **result["timing"]}
        for boost in (None, *(boosts if model.config.use_id else ())):
            boosted = model if boost is None else copy.deepcopy(model)
            if boost is not None:
                boosted.config.new_item_boost = boost
            fill_cold_items(boosted, trained)
            name = f"model:{variant}" + ("" if boost is None else f" boost {boost:g}")
            yield (
                name,
                run.score_fn(boosted),
                {**params, "new_item_boost": boosted.config.new_item_boost},
            )


def benchmark(
    experiment: Experiment,
    skip_model: bool,
    console: Console | None,
    variants: tuple[str, ...] = VARIANTS,
    names: tuple[str, ...] = BASELINES,
    boosts: tuple[float, ...] = (),
) -> dict:
    """Every method's test metrics (with cold/warm views when items are held out) and wall time:
    fitting, choosing on validation, training and evaluating."""
    cold = experiment.cold_items if len(experiment.cold_items) else None
    methods = [baselines(experiment, names)]
    if not skip_model:
        methods.append(model_variants(experiment, console is not None, variants, boosts))
    boosted = sum(v != "text" for v in variants) * len(boosts)
    total = len(names) + (0 if skip_model else len(variants) + boosted)
    results, index = {}, 0
    for group in methods:
        started = time.time()
        for name, score_fn, params in group:
            test, _ = evaluate(score_fn, experiment.split, "test", cold_items=cold)
            index += 1
            results[name] = {
                "test": test,
                "params": params,
                "wall_s": round(time.time() - started, 2),
            }
            if console is not None:
                console.print(
                    f"[{index}/{total}] {name}: test ndcg@10 {test['ndcg@10']:.4f} "
                    f"({results[name]['wall_s']} s)"
                )
            started = time.time()
    return results


def tables(results: dict) -> list[Table]:
    """All test customers, then (with held-out items) cold-target and warm-target ones."""
    first = next(iter(results.values()))["test"]
    views = [("test", None)] + [(v, v) for v in ("cold", "warm") if v in first]
    out = []
    for title, view in views:
        users = first[view]["users"] if view else first["users"]
        table = Table(title=f"{title}: {users} customers (full catalog, history excluded)")
        for column in ("method", *METRICS, *(("wall s",) if view is None else ())):
            table.add_column(column, justify="left" if column == "method" else "right")
        for name, result in results.items():
            metrics = result["test"][view] if view else result["test"]
            wall = (f"{result['wall_s']:.1f}",) if view is None else ()
            table.add_row(name, *(f"{metrics[m]:.4f}" for m in METRICS), *wall)
        out.append(table)
    return out


def run(args: argparse.Namespace) -> int:
    config = run_config_from_args(args)
    if args.cold_items is not None:
        try:
            config = dataclasses.replace(config, cold_items=args.cold_items)
        except ValueError as error:
            raise SystemExit(f"fedrec: --{error}") from None
    console = log_console()
    experiment = Experiment.prepare(args.data, config, show_progress=not args.quiet)
    variants = tuple(v for v in args.variants.split(",") if v)
    names = tuple(b for b in args.baselines.split(",") if b)
    unknown = set(variants) - set(VARIANTS) | set(names) - set(BASELINES)
    if unknown:
        raise SystemExit(f"fedrec: unknown variants or baselines {sorted(unknown)}")
    try:
        boosts = tuple(float(b) for b in args.new_item_boosts.split(",") if b.strip())
    except ValueError:
        raise SystemExit(
            f"fedrec: --new-item-boosts expects numbers like 0.5,1, got {args.new_item_boosts!r}"
        ) from None
    if boosts and not len(experiment.cold_items):
        raise SystemExit("fedrec: --new-item-boosts needs --cold-items (no held-out items)")
    results = benchmark(
        experiment, args.skip_model, None if args.quiet else console, variants, names, boosts
    )
    for table in tables(results):
        console.print(table)
    report = {
        "data": str(args.data),
        "cold_fraction": config.cold_items,
        "cold_items": len(experiment.cold_items),
        "config": config.to_dict(),
        "protocol": "leave-one-out, full catalog, history excluded, test split; "
        "settings chosen on the validation targets only",
        "methods": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    console.print(f"wrote {args.out}")
    return 0
