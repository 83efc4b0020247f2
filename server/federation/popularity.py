"""The popularity prior in a federation without DP (``popularity-prior``; docs/evaluation.md,
"A popularity prior chosen on validation"): each node's training reply carries how many of its
training histories hold each item (checked by shared/federation/wire.py:load_counts), the
server keeps each node's latest, and the validation that chooses the rounds chooses the prior's
weight on their sum for the kept model (shared/recommender/popularity.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from server.federation.aggregation import NodeUpdate
from server.federation.selection import MONITOR
from shared.recommender.model import FusionRecommender
from shared.recommender.popularity import add_popularity, popularity_logits, popularity_weight

log = logging.getLogger("fedrec.server")


class NodeCounts:
    """Per node, the item counts its latest accepted training reply carried."""

    def __init__(self, num_items: int, stored: dict[str, list[list[int]]] | None = None):
        self.num_items = num_items
        self.by_node: dict[str, np.ndarray] = {}
        for node, (items, counts) in (stored or {}).items():
            self.by_node[node] = np.zeros(num_items, dtype=np.int64)
            self.by_node[node][items] = counts

    def record(self, updates: list[NodeUpdate]) -> None:
        """Keep the counts the round's accepted ``updates`` carried."""
        for update in updates:
            if update.counts is not None:
                self.by_node[update.node] = update.counts

    def stored(self) -> dict[str, list[list[int]]]:
        """What a checkpoint keeps of them: per node, the items it counts and their counts."""
        held = {node: np.flatnonzero(counts) for node, counts in self.by_node.items()}
        return {node: [i.tolist(), self.by_node[node][i].tolist()] for node, i in held.items()}

    def total(self) -> np.ndarray:
        """The federation's counts: the sum of every node's."""
        return sum(self.by_node.values(), np.zeros(self.num_items, dtype=np.int64))


def add_prior(
    model: FusionRecommender,
    counts: NodeCounts,
    validate: Callable[[FusionRecommender], dict | None],
    valid: dict | None,
) -> tuple[dict | None, dict]:
    """Add to ``model`` (the kept one, whose validation metrics are ``valid``) the prior on the
    nodes' summed ``counts`` at the weight ``validate`` (the server's validation that chose
    the rounds) keeps. Returns the model's validation metrics then and what was chosen."""
    if valid is None or not counts.by_node:
        return valid, {"weight": 0.0, "tried": [], "nodes": len(counts.by_node)}
    logits = popularity_logits(counts.total(), model)

    def score(candidate: FusionRecommender) -> float:
        return float((validate(candidate) or {}).get(MONITOR, float("-inf")))

    weight, tried = popularity_weight(model, logits, score, float(valid[MONITOR]))
    if weight:
        add_popularity(model, logits, weight)
        valid = validate(model)
        log.info("validation keeps the popularity prior at weight %g", weight)
    return valid, {"weight": weight, "tried": tried, "nodes": len(counts.by_node)}
