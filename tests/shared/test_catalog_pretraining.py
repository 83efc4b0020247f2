"""The public start's catalog pretraining (shared/recommender/catalog_pretraining.py): which
products pair up, that training on those pairs pulls a brand together, and what it leaves alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from shared.recommender.catalog_pretraining import brand_groups, pretrain_on_catalog
from shared.recommender.experiment import Catalog
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.runs.config import RunConfig

BRANDS = 8
PER_BRAND = 6


def branded_catalog() -> tuple[pd.DataFrame, torch.Tensor]:
    """48 products in 8 brands whose text embeddings are random: nothing in the text says which
    products share a brand, so only the pretraining can put them together."""
    items = pd.DataFrame(
        {
            "item_id": [f"p{k}" for k in range(BRANDS * PER_BRAND)],
            "title": [f"product {k}" for k in range(BRANDS * PER_BRAND)],
            "brand": [f"Brand {k % BRANDS}" for k in range(BRANDS * PER_BRAND)],
        }
    )
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(len(items), 32, generator=generator), dim=1)
    return items, text


def new_model(text: torch.Tensor) -> FusionRecommender:
    torch.manual_seed(0)
    return FusionRecommender(ModelConfig(num_items=len(text), text_dim=32, dim=16), text)


def mean_partner_rank(model: FusionRecommender, items: pd.DataFrame) -> float:
    """Mean rank (0 = top) of a product's same-brand partners when it alone is the history."""
    with torch.no_grad():
        scores = model.scores(model.user_states([np.array([k]) for k in range(len(items))]))
    scores.fill_diagonal_(float("-inf"))
    ranks = scores.argsort(1, descending=True).argsort(1)
    brand = items["brand"].to_numpy()
    same = torch.as_tensor(brand[:, None] == brand[None, :]).fill_diagonal_(False)
    return float(ranks[same].float().mean())


def test_brand_groups_ignore_case_spacing_missing_brands_and_singletons():
    items = pd.DataFrame(
        {
            "item_id": list("abcdefg"),
            "brand": ["OPI", " opi", "Unknown", "", None, "Dove", "NYX"],
        }
    )
    assert [g.tolist() for g in brand_groups(items)] == [[0, 1]]
    assert brand_groups(items.drop(columns="brand")) == []


def test_pretraining_pulls_each_brand_together():
    items, text = branded_catalog()
    model = new_model(text)
    before = mean_partner_rank(model, items)
    done = pretrain_on_catalog(model, items, epochs=1000, seed=0)
    after = mean_partner_rank(model, items)
    assert done["pairs"] == len(items) and done["epochs"] == 1000
    # 5 partners among 47 others: their mean rank is about 23 by chance, 2 when they lead
    assert before > 20
    assert after < before / 2


def test_pretraining_moves_only_the_history_side_projection_and_repeats_for_a_seed():
    items, text = branded_catalog()
    start = new_model(text).state_dict()
    runs = []
    for _ in range(2):
        model = new_model(text)
        pretrain_on_catalog(model, items, epochs=2, seed=7)
        runs.append(model.state_dict())
    moved = {k for k in start if not torch.equal(start[k], runs[0][k])}
    assert moved == {"text_in.weight"}
    # what the projection does to the catalog's mean text stays: DP's step keeps its scale
    mean_text = text.mean(0)
    kept = start["text_in.weight"] @ mean_text
    assert torch.allclose(runs[0]["text_in.weight"] @ mean_text, kept, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # nothing left for a later step
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in start)


def test_a_catalog_without_brands_or_epochs_keeps_the_text_model():
    items, text = branded_catalog()
    start = new_model(text).state_dict()
    for catalog, epochs in ((items.drop(columns="brand"), 3), (items, 0)):
        model = new_model(text)
        assert pretrain_on_catalog(model, catalog, epochs=epochs, seed=0)["pairs"] == 0
        assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_the_catalogs_new_model_is_pretrained_unless_switched_off():
    items, text = branded_catalog()
    models = [
        Catalog(items, text, RunConfig(dim=16, device="cpu", catalog_epochs=epochs), "r", "t")
        for epochs in (1000, 0)
    ]
    pretrained, plain = (catalog.new_model() for catalog in models)
    assert mean_partner_rank(pretrained, items) < mean_partner_rank(plain, items)
