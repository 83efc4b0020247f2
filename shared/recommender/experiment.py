"""One run's inputs and outputs.

:class:`Catalog` is the public part, all a federation's server holds in a deployment: the
products, their text embeddings, the model built on them and the outputs written for it.
:class:`Experiment` adds a dataset and its split, for what holds customer data: ``fedrec
train``, the server side of a simulation and the benchmarks, so that every run is evaluated
and written the same way.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shared.data.dataset import (
    Dataset,
    Split,
    find_table,
    leave_one_out,
    load_dataset,
    load_items,
    require_test_users,
)
from shared.data.partition import cold_item_indices, fragment_histories, item_merchants
from shared.recommender.artifacts import model_card, save_model, write_json
from shared.recommender.catalog import fill_cold_items
from shared.recommender.catalog_pretraining import pretrain_on_catalog
from shared.recommender.metrics import evaluate, write_recs
from shared.recommender.model import FusionRecommender, init_seed
from shared.recommender.text import embed_items, item_texts
from shared.runs.config import RunConfig, resolve_device
from shared.runs.durable import make_private, private_dir

EMBEDDED_NAME = "synthetic marketplace (embedded default)"


@dataclass
class Catalog:
    """The public catalog: products, their text embeddings, and the encoder that made them."""

    items: pd.DataFrame
    text: torch.Tensor
    config: RunConfig
    text_model: str
    name: str

    @classmethod
    def load(cls, directory: str | Path, config: RunConfig, show_progress: bool = True) -> Catalog:
        """The ``items`` table in ``directory`` (no events needed), embedded (cached)."""
        items = load_items(find_table(Path(directory), "items"))
        if show_progress:
            print(f"embedding the catalog: {len(items):,} products with {config.text_model}")
        device = resolve_device(config.device)
        text = embed_items(items, config.text_model, device=device, show_progress=show_progress)
        return cls(items, torch.from_numpy(text), config, config.text_model, Path(directory).name)

    def embedded_with(self, text_model: str, show_progress: bool = False) -> Catalog:
        """This catalog embedded by another encoder (a federation's tuned one; cached)."""
        if show_progress:
            print(f"embedding the catalog: {self.num_items:,} products with {text_model}")
        device = resolve_device(self.config.device)
        text = embed_items(self.items, text_model, device=device, show_progress=show_progress)
        return replace(self, text=torch.from_numpy(text), text_model=text_model)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def item_ids(self) -> np.ndarray:
        return self.items["item_id"].to_numpy()

    @property
    def digest(self) -> str:
        """sha256 of the item ids and text fields, in order: every party checks it holds the
        same catalog (the global model's item tables are indexed by it)."""
        return catalog_digest(self.items)

    def new_model(self) -> FusionRecommender:
        """The public start: the text model, sharpened on the catalog's brands
        (``catalog-epochs``; public data only, :mod:`shared.recommender.catalog_pretraining`)."""
        init_seed(self.config.seed)
        model_config = self.config.model_config(self.num_items, self.text.shape[1])
        model = FusionRecommender(model_config, self.text).to(resolve_device(self.config.device))
        pretrain_on_catalog(model, self.items, self.config.catalog_epochs, self.config.seed)
        return model

    def fill_untrained(self, model: FusionRecommender, trained: torch.Tensor) -> int:
        """Give the items no training touched ID vectors from their text; returns how many."""
        return fill_cold_items(model, trained.to(model.text.device))

    def write(
        self,
        out: Path,
        model: FusionRecommender,
        metrics: dict,
        privacy: dict | None = None,
        data: dict | None = None,
        title: str = "fedrec global recommender",
    ) -> dict:
        """Write metrics.json (``metrics``, the settings and ``privacy``) and model/ with its
        card (``data``: what the card says of the data; default: this catalog)."""
        out = Path(out)
        private_dir(out)
        metrics = {**metrics, "config": self.config.to_dict()}
        if privacy:
            metrics["privacy"] = privacy
        write_json(out / "metrics.json", metrics)
        data = data or {"catalog": self.name, "products": self.num_items}
        card = model_card(
            title=title, data=data, metrics=metrics, config=self.config.to_dict(), privacy=privacy
        )
        save_model(out / "model", model, self.item_ids, self.text_model, card)
        return metrics


def catalog_digest(items: pd.DataFrame) -> str:
    """sha256 hex of the catalog as the model sees it: each item's id and embedded text
    (:func:`shared.recommender.text.item_texts`), in order, as ``id<TAB>text<LF>`` in UTF-8."""
    digest = hashlib.sha256()
    for item_id, text in zip(items["item_id"].astype(str), item_texts(items), strict=True):
        digest.update(f"{item_id}\t{text}\n".encode())
    return digest.hexdigest()


@dataclass
class Experiment:
    """A dataset prepared for training and evaluation."""

    dataset: Dataset
    split: Split
    text: torch.Tensor
    config: RunConfig
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    text_model: str = ""  # the encoder that embedded the catalog (a tuned one, if fine-tuned)

    @classmethod
    def prepare(
        cls,
        data_dir: str | Path,
        config: RunConfig,
        show_progress: bool = True,
        tune_text: bool = True,
    ) -> Experiment:
        """Load and split the data, hold out ``cold-items``, fine-tune the encoder on the
        pooled histories if asked (``text-finetune-layers``; ``tune_text`` False: a federation's
        server, whose nodes tune it), and embed the item text (cached)."""
        if show_progress:
            print(f"loading the dataset {data_dir} ...", flush=True)
        dataset = load_dataset(data_dir)
        split = leave_one_out(dataset)
        require_test_users(dataset, split)
        device = resolve_device(config.device)
        cold = cold_item_indices(dataset.num_items, config.cold_items, config.seed)
        text_model = config.text_model
        if config.text_finetune_layers and tune_text:
            from shared.recommender.finetune import finetune_encoder

            histories = [h[~np.isin(h, cold)] for h in split.training_histories()]
            text_model = str(
                finetune_encoder(
                    dataset.items,
                    histories,
                    config.text_model,
                    config.text_finetune_layers,
                    config.text_finetune_steps,
                    config.seed,
                    device,
                    show_progress,
                )
            )
        if show_progress:
            print(
                f"embedding the catalog: {dataset.num_items:,} products with {text_model} "
                "(cached for the next run)",
                flush=True,
            )
        text = torch.from_numpy(
            embed_items(dataset.items, text_model, device=device, show_progress=show_progress)
        )
        return cls(dataset, split, text, config, cold, text_model)

    @property
    def device(self) -> str:
        return resolve_device(self.config.device)

    @property
    def dataset_name(self) -> str:
        """The dataset's directory name, or what the embedded default is (it lives in OUT/data)."""
        directory = Path(self.dataset.report.interactions_file).resolve().parent
        if not self.config.data and directory == (Path(self.config.out) / "data").resolve():
            return EMBEDDED_NAME
        return directory.name

    @property
    def item_ids(self) -> np.ndarray:
        return self.dataset.items["item_id"].to_numpy()

    def train_histories(self, refit: bool = False) -> list[np.ndarray]:
        """Training histories (``refit``: with validation targets), cold items removed; with
        ``fragment-nodes``, cut into the pieces that many merchant nodes would each hold."""
        histories = self.split.training_histories(refit)
        if len(self.cold_items):
            histories = [h[~np.isin(h, self.cold_items)] for h in histories]
        if self.config.fragment_nodes:
            owner = item_merchants(
                self.dataset.items, self.config.fragment_nodes, self.dataset.interactions
            )
            histories = fragment_histories(histories, owner)
        return histories

    def trained_items(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Which items occur in ``histories`` (the rest have untrained ID vectors)."""
        mask = torch.zeros(self.dataset.num_items, dtype=torch.bool)
        if histories:
            mask[torch.from_numpy(np.concatenate(histories))] = True
        return mask

    def catalog(self) -> Catalog:
        """The public part of this experiment: what a federation's server may hold."""
        return Catalog(
            self.dataset.items, self.text, self.config, self.text_model, self.dataset_name
        )

    def new_model(self) -> FusionRecommender:
        return self.catalog().new_model()

    def score_fn(self, model: FusionRecommender):
        def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
            model.eval()
            return model.scores(model.user_states(histories))

        return score

    def evaluate(
        self, model: FusionRecommender, stage: str, users: np.ndarray | None = None
    ) -> tuple[dict, np.ndarray]:
        """The protocol's metrics at ``stage`` over ``users`` (default: every test user)."""
        return evaluate(
            self.score_fn(model),
            self.split,
            stage,
            users=users,
            cold_items=self.cold_items if len(self.cold_items) else None,
        )

    def finish(
        self,
        out: Path,
        model: FusionRecommender,
        *,
        trained: torch.Tensor,
        timing: dict,
        privacy: dict | None = None,
        extra: dict | None = None,
        valid: dict | None = None,
        title: str = "fedrec global recommender",
    ) -> dict:
        """Fill untrained items from text, evaluate, and write metrics.json, recs.csv, model/.

        ``valid``: validation metrics measured before a refit on the validation targets (the
        refit model's own would be optimistic).
        """
        catalog = self.catalog()
        filled = catalog.fill_untrained(model, trained)
        start = time.time()
        if valid is None:
            valid, _ = self.evaluate(model, "valid")
        test, top = self.evaluate(model, "test")
        timing = {**timing, "evaluate_s": round(time.time() - start, 2)}
        private_dir(Path(out))
        write_recs(Path(out) / "recs.csv", self.split, self.item_ids, top)
        make_private(Path(out) / "recs.csv")
        metrics = {
            "test": test,
            "valid": valid,
            "timing": timing,
            "cold_filled_items": filled,
            **(extra or {}),
        }
        data = {
            "dataset": self.dataset_name,
            "customers": self.dataset.num_users,
            "products": self.dataset.num_items,
            "events": self.dataset.report.num_rows,
        }
        return catalog.write(out, model, metrics, privacy, data, title)
