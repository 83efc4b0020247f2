"""The customer-level budget each node of a run is asked to keep."""

from __future__ import annotations

from shared.runs.config import RunConfig


def node_budget(config: RunConfig) -> float:
    """The epsilon per customer each node is asked to keep (the server's side: the request a
    node receives carries this as its ``target_epsilon``): the whole budget when a customer is
    at one node only (regional), else an equal share, so that the composition over all nodes
    stays within ``target-epsilon`` (basic composition; the audit reports the tighter PLD
    composition). A node keeps less where its own policy caps it (client/policy.py)."""
    if config.partition == "regional":
        return config.target_epsilon
    return config.target_epsilon / max(config.clients, 1)
