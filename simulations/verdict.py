"""The end of every training command: the model beside two reference points on the same split,
said plainly, and where its privacy guarantee is written down.

The reference points are the popularity baseline and the public text model (the untrained
encoder: an item is its text embedding, a customer the recency-weighted mean of their
history), both from :mod:`simulations.baselines`, and, where the catalog has brands, the
public start (the model before any customer's data: the text model sharpened on the catalog's
same-brand pairs, :mod:`shared.recommender.catalog_pretraining`), what a private run must beat
to say its customers' data taught it anything. They are cheap (a few evaluations, seconds of
training on public data) and are stored in ``metrics.json`` under ``context``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from shared.recommender.catalog_pretraining import brand_groups
from shared.recommender.experiment import Experiment
from shared.recommender.metrics import evaluate
from shared.recommender.text import embed_items
from shared.runs.rounding import up, up_significant
from simulations.baselines import popularity, text_only

REFERENCES = {
    "popularity": "popularity",
    "text_only": "public text model",
    "public_start": "public start",
}


def run_context(experiment: Experiment) -> dict:
    """Test metrics of the popularity baseline, of the public text model (recency: the run's
    ``recency`` setting), fitted on what the model trained on, and of the public start where
    the catalog pretraining has pairs to learn from."""
    config, split = experiment.config, experiment.split
    text = experiment.text
    if experiment.text_model != config.text_model:  # the run fine-tuned it: use the public one
        text = torch.from_numpy(
            embed_items(experiment.dataset.items, config.text_model, show_progress=False)
        )
    cold = experiment.cold_items if len(experiment.cold_items) else None
    histories = experiment.train_histories(config.refit)
    scorers = {
        "popularity": (popularity(histories, experiment.dataset.num_items), {}),
        "text_only": (
            text_only(text, config.recency),
            {"text_model": config.text_model, "recency": config.recency},
        ),
    }
    if config.catalog_epochs and brand_groups(experiment.dataset.items):
        catalog = replace(experiment.catalog(), text=text, text_model=config.text_model)
        scorers["public_start"] = (
            experiment.score_fn(catalog.new_model().eval()),
            {"catalog_epochs": config.catalog_epochs},
        )
    return {
        name: evaluate(score, split, "test", cold_items=cold)[0] | settings
        for name, (score, settings) in scorers.items()
    }


def add_context(out: Path, context: dict) -> dict:
    """Store ``context`` in ``out/metrics.json``; returns the updated metrics."""
    from shared.recommender.artifacts import write_json

    path = Path(out) / "metrics.json"
    metrics = json.loads(path.read_text()) | {"context": context}
    write_json(path, metrics)
    return metrics


def verdict(metrics: dict, out: Path) -> list[str]:
    """A few lines: test NDCG@10 / HR@10 of the model and of each reference, a plain sentence
    when the model is below one or level with it (to the 4 decimals shown: it learned nothing
    that ranks better, e.g. every node refused), the start guard's verdict when the run was
    guarded, and the privacy guarantee when the run has one."""
    test = metrics["test"]
    figures = [f"model {test['ndcg@10']:.4f} / {test['hr@10']:.4f}"]
    short = []
    for key, label in REFERENCES.items():
        reference = metrics.get("context", {}).get(key)
        if reference is None:
            continue
        figures.append(f"{label} {reference['ndcg@10']:.4f} / {reference['hr@10']:.4f}")
        gap = test["ndcg@10"] - reference["ndcg@10"]
        if gap < -5e-5:
            short.append(
                f"below {label}: the model's test NDCG@10 {test['ndcg@10']:.4f} is under "
                f"{label}'s {reference['ndcg@10']:.4f} on the same split"
            )
        elif gap < 5e-5:
            short.append(
                f"level with {label}: the model's test NDCG@10 {test['ndcg@10']:.4f} is "
                f"{label}'s on the same split; it learned nothing that ranks better"
            )
    lines = ["test NDCG@10 / HR@10: " + ", ".join(figures), *short]
    if not short and len(figures) > 1:
        lines.append("above every reference point")
    if guard := metrics.get("start_guard"):
        shipped = "the public start" if guard["shipped"] == "start" else "the rounds' model"
        lines.append(f"start guard: shipped {shipped} ({guard['why']})")
    if privacy := metrics.get("privacy"):
        lines.append(privacy_line(privacy, Path(out)))
    return lines


def privacy_line(privacy: dict, out: Path) -> str:
    """The guarantee (epsilon, delta, unit) and where to check it, and on a line of its own
    the statement's warning where its delta protects no one for certain
    (server/privacy/deltas.py)."""
    guarantee = privacy if "epsilon" in privacy else privacy.get("node_level", {})
    line = "privacy: "
    if "delta" in guarantee:
        line += (
            f"({up(guarantee['epsilon'], 3)}, {up_significant(guarantee['delta'], 2)})-"
            f"differential privacy for {guarantee['unit']}"
        )
    elif "epsilon" in guarantee:  # no node contributed: claims or unanswered requests only
        line += f"no node contributed; epsilon stated {up(guarantee['epsilon'], 3)} (metrics.json)"
    if (out / "ledger.jsonl").exists():
        line += f"; ledger {out / 'ledger.jsonl'}; check it with: fedrec audit {out}"
    if privacy.get("warning"):
        line += f"\n{privacy['warning']}"
    return line


def print_verdict(metrics: dict, out: Path) -> None:
    """Print :func:`verdict` under a rule."""
    print("-" * 60)
    for line in verdict(metrics, out):
        print(line)
