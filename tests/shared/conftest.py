"""Fixtures of the shared code's tests (data, recommender, privacy machinery)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_item_text(synth_dataset_dir: Path):
    """The MiniLM text embeddings (items, 384) of ``synth_dataset_dir``'s catalog, as a float32
    tensor. Encoded once per machine (~10 s on a slow CPU), then read from the fedrec cache."""
    import torch

    from shared.data.dataset import load_dataset
    from shared.recommender.text import embed_items

    items = load_dataset(synth_dataset_dir).items
    return torch.from_numpy(embed_items(items, show_progress=False))
