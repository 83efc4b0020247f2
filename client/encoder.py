"""A node's part in tuning the text encoder: contrastive steps on its own customers' histories.

The server sends the encoder's top layers (server/federation/encoder_rounds.py); the node trains
them for its share of ``text-finetune-steps`` on the consecutive-product pairs of its training
histories (the objective of shared/recommender/finetune.py) and returns them. Nothing else
leaves: the weights, the number of customers they were trained on and the mean loss. Not
under DP: a node whose policy requires DP refuses these rounds like any other non-private one.

The encoder's lower layers are frozen, public and the same at every node, so their token states
are computed once per process for the products a node's batches touch and kept for the next
round and the next node the process hosts (:class:`shared.recommender.finetune.FrozenPrefix`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from client.node import NodeData, training_histories
from client.policy import NodePolicy
from shared.recommender.finetune import (
    BATCH_PAIRS,
    FrozenPrefix,
    consecutive_pairs,
    load_top_layers,
    top_layers,
    train_top_layers,
)
from shared.recommender.text import TextEncoder, item_texts
from shared.runs.config import RunConfig, resolve_device


def node_steps(config: RunConfig) -> int:
    """Steps each node trains a round: ``text-finetune-steps`` (what ``fedrec train`` takes
    over pooled data) spread over the rounds and the nodes, so the federation does as much."""
    share = config.text_finetune_steps / (config.text_finetune_rounds * config.clients)
    return max(1, math.ceil(share))


_prefixes: dict[tuple, FrozenPrefix] = {}


def node_prefix(node: NodeData, config: RunConfig, device: str) -> FrozenPrefix:
    """The encoder and its stored frozen-layer states, one per process and catalog: the nodes a
    process hosts in turn share them, round after round."""
    key = (config.text_model, config.text_finetune_layers, device, node.catalog_digest)
    if key not in _prefixes:
        _prefixes.clear()  # a process seldom sees another catalog or encoder
        encoder = TextEncoder(config.text_model, device=device)
        texts = item_texts(node.items)
        _prefixes[key] = FrozenPrefix(encoder, texts, np.zeros(0, dtype=int), key[1])
    return _prefixes[key]


def tune_encoder_at_node(
    node: NodeData,
    config: RunConfig,
    weights: dict[str, torch.Tensor],
    server_round: int,
    policy: NodePolicy | None = None,
    valid_fraction: float = 0.0,
) -> dict:
    """Train the top layers ``weights`` on this node's pairs; returns the trained weights
    (``state``), the customers they came from and the mean loss, or a refusal or decline."""
    policy = policy or NodePolicy()
    # these steps are never private, whatever the request says: a node that requires DP
    # refuses them even when the request claims dp (a curious server's way around its policy)
    if policy.require_dp or config.dp or config.node_dp:
        reason = (
            "encoder rounds train without DP: this node's policy requires DP (require-dp=true)"
            if policy.require_dp
            else "an encoder round asking for DP: encoder rounds are not private"
        )
        return {"node": node.name, "refused": True, "reason": reason}
    histories = [np.asarray(h) for h in training_histories(node, config, valid_fraction)]
    pairs = consecutive_pairs(histories)
    if not len(pairs):
        reason = "no customer here has two distinct products in a row: nothing to tune on"
        return {"node": node.name, "declined": True, "reason": reason}
    device = resolve_device(config.device)
    prefix = node_prefix(node, config, device)
    load_top_layers(prefix.encoder, weights, config.text_finetune_layers)
    # which pairs make a batch is not private output (the weights are): a plain generator
    rng = np.random.default_rng([config.seed, server_round, len(pairs)])
    batches = [pairs[rng.integers(0, len(pairs), BATCH_PAIRS)] for _ in range(node_steps(config))]
    prefix.add(np.concatenate(batches).ravel())
    losses = train_top_layers(prefix, batches)
    customers = sum(len(np.unique(h)) > 1 for h in histories)
    return {
        "node": node.name,
        "customers": int(customers),
        "state": top_layers(prefix.encoder, config.text_finetune_layers),
        "loss": float(np.mean(losses)),
    }
