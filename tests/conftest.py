"""Shared test fixtures. Keep each one small and fast; name it after what it provides."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic marketplace dataset (600 users, 300 items, seed 0), written once."""
    from shared.data.convert import write_dataset
    from shared.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "dataset"
    interactions, items = generate(SynthConfig(users=600, items=300, seed=0))
    return write_dataset(out, interactions, items)


@pytest.fixture(scope="session")
def tiny_synth_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset for end-to-end runs: 160 users on the same 300-item catalog as
    ``synth_dataset_dir`` (seed 0), so its item text is already in the embedding cache."""
    from shared.data.convert import write_dataset
    from shared.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("tiny-synth") / "dataset"
    interactions, items = generate(SynthConfig(users=160, items=300, seed=0))
    return write_dataset(out, interactions, items)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT checkpoint (hidden size 32) with MiniLM's tokenizer,
    built from a ``BertConfig``: a fast stand-in for any local BERT checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from shared.recommender.text import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model_path(), local_files_only=True).save_pretrained(out)
    return out
