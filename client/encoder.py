"""A node's part in tuning the text encoder: contrastive steps on its own customers' histories.

The server sends the encoder's top layers (server/federation/encoder_rounds.py); the node trains
them on the consecutive-product pairs of its training histories and returns them. Nothing else
leaves: the weights, the number of customers they were trained on and, without DP, the mean
loss.

Without DP a node takes its share of ``text-finetune-steps`` of the in-batch objective of
shared/recommender/finetune.py. Under DP (the request's ``dp``; a node whose policy requires DP
refuses a request without it) it takes one expected pass over its customers of DP-SGD with a
per-customer objective (shared/recommender/private_finetune.py), ``dp-encoder-batch`` customers
a step, at the noise multiplier it calibrated for its whole plan (client/node.py:
:func:`~client.node.noise_multiplier`), charged to its accountant before the layers leave, and
signed like any other release (purpose ``encoder``).

The encoder's lower layers are frozen, public and the same at every node, so their token states
are computed once per process for the products a node's batches touch and kept for the next
round and the next node the process hosts (:class:`shared.recommender.finetune.FrozenPrefix`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from client.accountant import NodePrivacy, RequestPosition
from client.node import (
    PRIVACY_UNIT,
    NodeData,
    encoder_plan,
    noise_multiplier,
    over_budget,
    privacy_plan,
    public_customers,
    scored_catalog,
    training_histories,
)
from client.policy import NodePolicy
from shared.recommender.finetune import (
    BATCH_PAIRS,
    FrozenPrefix,
    consecutive_pairs,
    load_top_layers,
    top_layers,
    train_top_layers,
)
from shared.recommender.private_finetune import train_top_layers_private
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
    position: RequestPosition | None = None,
) -> dict:
    """Train the top layers ``weights`` on this node's pairs; returns the trained weights
    (``state``), the customers they came from and the mean loss, or a refusal or decline
    (under DP also of a request that comes after a later round of its run, ``position``)."""
    policy = policy or NodePolicy()
    if config.node_dp:
        reason = "encoder rounds under node-level DP are not built: ask without node-dp"
        return {"node": node.name, "refused": True, "reason": reason}
    if config.text_finetune_rounds < 1 or config.clients < 1:  # node_steps divides by them
        reason = (
            f"the request's text-finetune-rounds ({config.text_finetune_rounds}) and clients "
            f"({config.clients}) must be at least 1 in an encoder round"
        )
        return {"node": node.name, "refused": True, "reason": reason}
    customers = public_customers(node, policy)
    if reason := policy.refusal(config, customers):
        return {"node": node.name, "refused": True, "reason": reason}
    steps = node_steps(config)  # a plain round's steps: the policy bounds them as DP-SGD's
    if not config.dp and policy.max_steps is not None and steps > policy.max_steps:
        reason = (
            f"the request asks for {steps} encoder steps a round at this node "
            "(text-finetune-steps over text-finetune-rounds x clients), above its "
            f"max-steps={policy.max_steps}"
        )
        return {"node": node.name, "refused": True, "reason": reason}
    prefix = node_prefix(node, config, resolve_device(config.device))
    try:  # before anything is charged: layers that are not the encoder's are refused
        load_top_layers(prefix.encoder, weights, config.text_finetune_layers)
    except ValueError as error:
        return {"node": node.name, "refused": True, "reason": f"the server's {error}"}
    histories = [np.asarray(h) for h in training_histories(node, config, valid_fraction)]
    if config.dp:
        return _tune_private(node, config, prefix, policy, customers, histories, position)
    pairs = consecutive_pairs(histories)
    if not len(pairs):
        reason = "no customer here has two distinct products in a row: nothing to tune on"
        return {"node": node.name, "declined": True, "reason": reason}
    # which pairs make a batch is not private output (the weights are): a plain generator
    rng = np.random.default_rng([config.seed, server_round, len(pairs)])
    batches = [pairs[rng.integers(0, len(pairs), BATCH_PAIRS)] for _ in range(steps)]
    prefix.add(np.concatenate(batches).ravel())
    losses = train_top_layers(prefix, batches)
    customers = sum(len(np.unique(h)) > 1 for h in histories)
    return {
        "node": node.name,
        "customers": int(customers),
        "state": top_layers(prefix.encoder, config.text_finetune_layers),
        "loss": float(np.mean(losses)),
    }


def _tune_private(
    node: NodeData,
    config: RunConfig,
    prefix: FrozenPrefix,
    policy: NodePolicy,
    customers: int,
    histories: list[np.ndarray],
    position: RequestPosition | None,
) -> dict:
    """One private encoder round at a node of ``customers`` (its public figure), its encoder
    (``prefix``) holding the server's layers: checked against the budget and charged (the
    accountant written to disk) under the accountant's lock, then trained; a crash during
    training over-counts, never forgets."""
    if reason := prefix.packing_refusal():  # before anything is charged
        return {"node": node.name, "refused": True, "reason": reason}
    privacy = NodePrivacy(node.directory, position)
    delta, _, _, budget = privacy_plan(config, policy, customers)
    sample_rate, steps = encoder_plan(config, customers)
    with privacy.locked():  # no other release of this node between the check and the charge
        if reason := privacy.order_refusal():
            return {"node": node.name, "refused": True, "reason": reason}
        sigma = noise_multiplier(privacy, config, policy, customers)
        event = (sigma, sample_rate, steps)
        if reason := over_budget(privacy, delta, budget, event):
            return {"node": node.name, **privacy.declined(delta, reason)}
        epsilon, index = privacy.charge(event, delta)  # spent from here, whatever happens next
    # every customer is sampled at the same rate; one without a pair adds nothing to a step
    customer_pairs = [p for p in (consecutive_pairs([h]) for h in histories) if len(p)]
    catalog = scored_catalog(node, config)
    catalog = np.arange(len(node.items)) if catalog is None else catalog
    losses = train_top_layers_private(
        prefix,
        customer_pairs,
        catalog,
        steps=steps,
        sample_rate=sample_rate,
        expected_batch=sample_rate * customers,
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
    )
    return {
        "node": node.name,
        "customers": customers,  # the public figure, never the exact count
        "state": top_layers(prefix.encoder, config.text_finetune_layers),
        "loss": float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": steps,
        "max_grad_norm": config.max_grad_norm,
        "contribution_index": index,
        "accountant": "prv",
        "mechanism": "poisson_subsampled_gaussian",
        "purpose": "encoder",
        "unit": PRIVACY_UNIT,
        "target_epsilon": budget,
    }
