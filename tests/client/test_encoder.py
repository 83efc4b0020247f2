"""A node's part in tuning the text encoder (client/encoder.py) and the checkpoint every party
builds from the averaged layers (shared/recommender/finetune.py:tuned_checkpoint)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TEST_DEVICE
from transformers import AutoModel

from client.encoder import node_steps, tune_encoder_at_node
from client.node import load_node
from client.policy import NodePolicy
from shared.data.dataset import load_dataset
from shared.data.partition import write_partitions
from shared.recommender.finetune import load_top_layers, top_layers, tuned_checkpoint
from shared.recommender.text import TextEncoder
from shared.runs.config import RunConfig


@pytest.fixture()
def node_and_config(tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path):
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    config = RunConfig(
        text_model=str(tiny_bert_dir),
        text_finetune_layers=1,
        text_finetune_steps=8,
        text_finetune_rounds=2,
        clients=2,
        device=TEST_DEVICE,
    )
    return load_node(str(directory), str(tiny_bert_dir)), config


def test_the_federation_takes_as_many_encoder_steps_as_fedrec_train() -> None:
    config = RunConfig(text_finetune_steps=2000, text_finetune_rounds=3, clients=10)
    assert node_steps(config) == 67  # 3 rounds x 10 nodes x 67 >= 2000
    assert node_steps(RunConfig(text_finetune_steps=1, clients=10)) == 1


def test_a_node_tunes_only_the_top_layers_it_was_sent(node_and_config) -> None:
    node, config = node_and_config
    sent = top_layers(TextEncoder(config.text_model), 1)
    result = tune_encoder_at_node(node, config, sent, server_round=1)
    assert sorted(result["state"]) == sorted(sent)
    assert all(k.startswith("encoder.layer.1.") for k in sent)  # the top of 2 layers
    assert any(not torch.equal(result["state"][k], sent[k]) for k in sent)
    assert result["customers"] > 0 and result["loss"] > 0


def test_a_node_refuses_malformed_encoder_weights(node_and_config) -> None:
    """Whatever the server sends as layers, the node loads exactly the top layers' names and
    shapes, finite, or refuses with what is wrong."""
    node, config = node_and_config
    sent = top_layers(TextEncoder(config.text_model), 1)
    name = next(iter(sent))
    hostile = [
        {k: v for k, v in sent.items() if k != name},  # one missing
        {**sent, "embeddings.word_embeddings.weight": torch.zeros(3)},  # a lower weight
        {**sent, name: torch.zeros(7)},  # wrong shape
        {**sent, name: torch.full_like(sent[name], float("nan"))},
    ]
    for weights in hostile:
        with pytest.raises(ValueError, match="encoder weights"):
            tune_encoder_at_node(node, config, weights, server_round=1)


def test_a_node_that_requires_dp_refuses_encoder_rounds_whatever_the_request_says(
    node_and_config,
) -> None:
    """Encoder rounds are never private: a node whose policy requires DP refuses them even
    when the server's request claims dp=true, and no node tunes for a request claiming DP."""
    node, config = node_and_config
    sent = top_layers(TextEncoder(config.text_model), 1)
    strict = NodePolicy(require_dp=True)
    for request in (config, replace(config, dp=True)):
        result = tune_encoder_at_node(node, request, sent, 1, strict)
        assert result["refused"] and "require-dp" in result["reason"]
        assert "state" not in result
    result = tune_encoder_at_node(node, replace(config, dp=True), sent, 1, NodePolicy())
    assert result["refused"] and "state" not in result


def test_every_party_builds_the_same_checkpoint_from_the_same_layers(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    encoder = TextEncoder(str(tiny_bert_dir))
    weights = {k: v + 0.01 for k, v in top_layers(encoder, 1).items()}
    first = tuned_checkpoint(str(tiny_bert_dir), weights, 1)
    assert tuned_checkpoint(str(tiny_bert_dir), weights, 1) == first  # built once
    other = tuned_checkpoint(str(tiny_bert_dir), {k: v + 0.02 for k, v in weights.items()}, 1)
    assert other != first
    base = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    tuned = AutoModel.from_pretrained(first).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == set(weights)
    load_top_layers(encoder, weights, 1)
    texts = ["a red lipstick", "shampoo for dry hair"]
    torch.testing.assert_close(
        torch.from_numpy(TextEncoder(str(first)).encode(texts, show_progress=False)),
        torch.from_numpy(encoder.encode(texts, show_progress=False)),
    )
