"""What several test files build the same way: the tiny model the end-to-end tests train
(seconds per round on 2 CPU cores), a node's reply to a training round, the tiny model and
customers the private-step tests train one customer at a time, and data where popularity is
all there is."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from shared.data.convert import write_dataset
from shared.data.synth import SynthConfig, generate
from shared.federation.reports import PRIVACY_UNIT
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.recommender.training import training_tensors, trim

# the device the training tests run on: cpu here and in CI; FEDREC_TEST_DEVICE=cuda on a GPU
# machine runs the same tests on the GPU (every path a node trains, scores and replies through)
TEST_DEVICE = os.environ.get("FEDREC_TEST_DEVICE", "cpu")

TINY_SETTINGS = {
    "dim": 16,
    "layers": 1,
    "max_len": 10,
    "dp_dim": 16,
    "dp_max_len": 10,
    "dp_batch_size": 40,
    # a tiny node's epoch is a few steps: one epoch a round keeps the end-to-end tests quick
    # (the local-steps rule has its own test, tests/client/test_node.py)
    "local_steps": 0,
    # likewise a tiny dataset's centralized epoch is one pass, not the default's 50 steps (the
    # epoch-steps rule has its own test, tests/shared/test_model.py)
    "epoch_steps": 0,
}


def cli_settings(settings: dict) -> list[str]:
    """``--set key=value`` for each setting."""
    return [token for key, value in settings.items() for token in ("--set", f"{key}={value}")]


TINY = [*cli_settings(TINY_SETTINGS), "--device", TEST_DEVICE, "--quiet"]


def node_reply(
    node: str,
    arrays: dict[str, np.ndarray] | None,
    customers: float = 10,
    declined: bool = False,
    node_id: int | None = None,
    privacy: dict | None = None,
    metrics: dict | None = None,
) -> Message:
    """A node's reply to a training round, as the server receives it: its privacy report, its
    number of customers and, unless None, the ``arrays`` it sends (``node_id``: Flower's id of
    the sender; ``privacy``, ``metrics``: records sent instead of the honest ones)."""
    content = RecordDict(
        {
            "privacy": ConfigRecord(privacy or {"node": node, "declined": declined}),
            "metrics": MetricRecord({"num-examples": customers} if metrics is None else metrics),
        }
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    return Message(content=content, metadata=metadata(len(node) if node_id is None else node_id, 0))


def metadata(src_node_id: int, dst_node_id: int, reply_to: str = "m") -> Metadata:
    """A training message's metadata, from ``src_node_id`` to ``dst_node_id``."""
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )


def release(**changes) -> dict:
    """A node's privacy report with a signed training release, as its record carries it
    (``changes``: fields replaced)."""
    fields = {
        "node": "n1",
        "run_id": "r",
        "round": 1,
        "purpose": "training",
        "contribution_index": 0,
        "mechanism": "poisson_subsampled_gaussian",
        "noise_multiplier": 1.0,
        "sample_rate": 0.5,
        "steps": 2,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "epsilon": 1.0,
        "accountant": "prv",
        "unit": PRIVACY_UNIT,
        "target_epsilon": 8.0,
        "num_customers": 100,
        "update_digest": "d",
        "signature": "s",
        "key_id": "k",
        "public_key": "p",
        "refused": False,
        "declined": False,
    }
    return {**fields, **changes}


def tiny_model(
    fusion: str = "gated",
    variant: str = "fusion",
    dropout: float = 0.0,
    layers: int = 1,
    id_scale: float = 1.0,
) -> FusionRecommender:
    """A float64 model over a 40-item catalog, every weight moved off its initialisation."""
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    config = ModelConfig(
        num_items=40,
        text_dim=16,
        dim=8,
        max_len=6,
        layers=layers,
        heads=2,
        dropout=dropout,
        fusion=fusion,
        variant=variant,
        id_scale=id_scale,
    )
    model = FusionRecommender(config, text)
    with torch.no_grad():  # move off the zero initialisation so every path carries gradient
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.double()


def customers() -> tuple[torch.Tensor, torch.Tensor]:
    """Seven customers of ``tiny_model``'s catalog, histories of 2 to 9 events, trimmed."""
    rng = np.random.default_rng(1)
    histories = [rng.integers(0, 40, size=n) for n in (2, 3, 5, 7, 9, 4)]
    histories.append(np.array([3, 3, 3]))  # repeated items: the same table rows twice
    return trim(*training_tensors(histories, max_len=6))


def popularity_only_dataset(directory: Path) -> Path:
    """200 customers who draw 12 products each by popularity alone (60 products, Zipf-skewed, in
    no relation to their text), in random order: neither the text nor the order says anything
    (issue 16). Written to ``directory``, returned."""
    _, items = generate(SynthConfig(users=160, items=300, seed=0))  # the cached catalog
    rng = np.random.default_rng(0)
    odds = 1.0 / np.arange(1, 61)
    chosen = rng.permutation(items["item_id"].to_numpy())[:60]
    events = pd.DataFrame(
        {
            "user_id": np.repeat([f"u{n:03d}" for n in range(200)], 12),
            "item_id": rng.choice(chosen, size=2400, p=odds / odds.sum()),
            "timestamp": rng.permutation(2400) + 1_700_000_000,
        }
    )
    return write_dataset(directory, events, items)
