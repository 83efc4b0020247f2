"""A node's part in tuning the text encoder (client/encoder.py) and the checkpoint every party
builds from the averaged layers (shared/recommender/finetune.py:tuned_checkpoint)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import TEST_DEVICE
from transformers import AutoModel

from client.accountant import NodePrivacy
from client.encoder import node_steps, tune_encoder_at_node
from client.node import (
    encoder_plan,
    load_node,
    privacy_plan,
    public_customers,
)
from client.policy import NodePolicy
from shared.data.dataset import load_dataset
from shared.data.partition import write_partitions
from shared.recommender.finetune import load_top_layers, top_layers, tuned_checkpoint
from shared.recommender.text import TextEncoder
from shared.recommender.training import calibrate_noise, planned_epsilon
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
    shapes, finite, or refuses with what is wrong (a refusal, before anything is charged)."""
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
        result = tune_encoder_at_node(node, config, weights, server_round=1)
        assert result["refused"] and "the server's encoder weights" in result["reason"]
        assert "state" not in result


def test_a_node_that_requires_dp_refuses_encoder_rounds_without_dp(node_and_config) -> None:
    """A node whose policy requires DP refuses a non-private encoder round, and no node tunes
    for a request asking node-level DP (not built for encoder rounds)."""
    node, config = node_and_config
    sent = top_layers(TextEncoder(config.text_model), 1)
    result = tune_encoder_at_node(node, config, sent, 1, NodePolicy(require_dp=True))
    assert result["refused"] and "require-dp" in result["reason"]
    assert "state" not in result
    result = tune_encoder_at_node(node, replace(config, node_dp=True), sent, 1, NodePolicy())
    assert result["refused"] and "node-level" in result["reason"] and "state" not in result


def test_a_plain_encoder_round_of_more_steps_than_the_node_allows_is_refused(
    node_and_config, monkeypatch
) -> None:
    """Without DP the server's text-finetune-steps set a round's encoder steps (built up front),
    which the node's max-steps bounds as it bounds DP-SGD's: refused before any is built."""
    node, config = node_and_config
    sent = top_layers(TextEncoder(config.text_model), 1)
    many = replace(config, text_finetune_steps=10**9)  # 250 M steps a node a round
    monkeypatch.setattr("client.encoder.train_top_layers", lambda *_: pytest.fail("trained"))
    result = tune_encoder_at_node(node, many, sent, 1, NodePolicy(max_steps=10_000))
    assert result["refused"] and "max-steps=10000" in result["reason"]
    assert "250000000 encoder steps" in result["reason"] and "state" not in result
    monkeypatch.undo()
    within = tune_encoder_at_node(node, config, sent, 1, NodePolicy(max_steps=2))
    assert "state" in within  # 8 steps over 2 rounds x 2 nodes: 2 a round


def test_a_private_encoder_round_is_charged_to_the_nodes_accountant_before_it_returns(
    node_and_config,
) -> None:
    node, config = node_and_config
    private = replace(config, dp=True, dp_encoder_batch=16, target_epsilon=8.0)
    policy = NodePolicy(require_dp=True)
    sent = top_layers(TextEncoder(config.text_model), 1)
    result = tune_encoder_at_node(node, private, sent, 1, policy)
    customers = public_customers(node, policy)
    sample_rate, steps = encoder_plan(private, customers)
    assert sample_rate == pytest.approx(16 / customers) and steps == math.ceil(customers / 16)
    assert result["purpose"] == "encoder" and result["customers"] == customers
    assert (result["sample_rate"], result["steps"]) == (sample_rate, steps)
    assert any(not torch.equal(result["state"][k], sent[k]) for k in sent)
    saved = NodePrivacy(node.directory)
    assert saved.state["contributions"] == 1 and result["contribution_index"] == 0
    assert result["epsilon"] == pytest.approx(saved.epsilon_after(result["delta"]))
    assert 0 < result["epsilon"] < result["target_epsilon"] == 8.0
    # the node's one noise multiplier covers the encoder rounds as well as its training
    delta, q, round_steps, budget = privacy_plan(private, policy, customers)
    without = calibrate_noise(budget, delta, q, round_steps * private.dp_rounds)
    assert result["noise_multiplier"] > without
    whole = planned_epsilon(
        result["noise_multiplier"],
        delta,
        q,
        round_steps * private.dp_rounds,
        more_steps=((sample_rate, steps * private.text_finetune_rounds),),
    )
    assert whole <= budget * 1.001


def test_an_encoder_that_cannot_pack_texts_is_refused_before_anything_is_charged(
    node_and_config, monkeypatch
) -> None:
    node, config = node_and_config
    private = replace(config, dp=True, dp_encoder_batch=16)
    sent = top_layers(TextEncoder(config.text_model), 1)
    monkeypatch.setattr("shared.recommender.finetune.PACKABLE", ("roberta",))  # not this bert
    result = tune_encoder_at_node(node, private, sent, 1, NodePolicy())
    assert result["refused"] and "exact only for roberta encoders" in result["reason"]
    assert "state" not in result
    assert NodePrivacy(node.directory).state.get("contributions", 0) == 0


def test_a_node_declines_a_private_encoder_round_past_its_budget(node_and_config) -> None:
    node, config = node_and_config
    private = replace(config, dp=True, target_epsilon=2.0)
    sent = top_layers(TextEncoder(config.text_model), 1)
    privacy = NodePrivacy(node.directory)
    privacy.charge((0.8, 1.0, 4), 1e-4)  # an earlier federation spent most of it
    result = tune_encoder_at_node(node, private, sent, 1, NodePolicy())
    assert result["declined"] and "over the budget" in result["reason"]
    assert "state" not in result
    assert result["epsilon"] == pytest.approx(privacy.epsilon_after(result["delta"]))
    assert NodePrivacy(node.directory).state["contributions"] == 1  # nothing more charged


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
