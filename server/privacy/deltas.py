"""The delta a federation's statement is at, and whether that delta means anything.

Each node takes the smaller of the run's delta and its own ``1 / (10 x its declared
customers)`` (client/policy.py). A statement over every node (a customer at every node) is at
the sum of the nodes' deltas where each used its own: a hundred merchants of a hundred
customers state delta 0.1. At delta ``d`` the mechanism that publishes each customer's whole
history with probability ``d`` meets (0, d)-DP (Dwork and Roth 2014, section 2.3: delta "on the
order of 1/n" is "very dangerous"); at ``d >= 1 / customers`` it publishes at least one
customer's history outright in expectation, so the statement protects no one for certain.
:func:`delta_warning` says so where such a statement is made (the server's metrics.json, the
model card and the command's summary print it; the audit reports it as a warning, not a
failure: the figures are right, their meaning is weak). docs/privacy.md, "When δ means
nothing".
"""

from __future__ import annotations

from collections.abc import Iterable

from server.privacy.ledger import is_number

# the nodes' own rule for their delta, 1 / (DELTA_SHARE x customers): what a warning advises
DELTA_SHARE = 10


def used_delta(delta: float | None, deltas: Iterable[float]) -> float | None:
    """The run's ``delta`` for the federation's statements and budget split where a node used
    it (each takes the smaller of it and its own), else None: the nodes' own ``deltas``. At a
    delta no node used (0.5, say) a merchant run was split and stated far looser than at the
    nodes' own (docs/privacy.md, "δ is each node's own"); ``delta`` when no node states one."""
    deltas = list(deltas)
    if delta is None or not deltas or delta <= max(deltas):
        return delta
    return None


def node_deltas(contributions: list[dict]) -> dict[str, float]:
    """Each node's delta: the largest its contributions state."""
    deltas: dict[str, float] = {}
    for c in contributions:
        deltas[str(c["node"])] = max(deltas.get(str(c["node"]), 0.0), float(c["delta"]))
    return deltas


def declared_customers(contributions: list[dict]) -> int:
    """The customers a federation's statement covers at most: the sum over nodes of the most
    each declared (``num_customers``; one a customer shopping at several nodes counts at
    each, so the distinct customers may be fewer). A figure that is not a number >= 1 (a
    tampered entry, which other checks fail) counts for nothing."""
    declared: dict[str, float] = {}
    for c in contributions:
        n = c.get("num_customers")
        if is_number(n) and n >= 1:
            declared[str(c["node"])] = max(declared.get(str(c["node"]), 0.0), float(n))
    return int(sum(declared.values()))


def delta_warning(delta: float, customers: int) -> str | None:
    """A warning, in plain words, when a statement at ``delta`` covering up to ``customers``
    customers protects no one for certain (``delta >= 1 / customers``); None otherwise, or
    when no customers are known."""
    if customers < 1 or delta * customers < 1:
        return None
    advised = 1.0 / (DELTA_SHARE * customers)
    return (
        f"WARNING: delta {delta:.3g} is not below 1/{customers} (the {customers} customers "
        "the nodes declared, which this statement covers at most): publishing each customer's "
        f"whole history with probability {delta:.3g}, about {delta * customers:.3g} customers' "
        "in all, meets this guarantee, so it protects no customer for certain (delta must be "
        "well below 1/customers: docs/privacy.md, 'When δ means nothing'). Where each node "
        "used its own delta, the statement over all nodes is at their sum; a run delta at or "
        f"below {advised:.3g} (--delta, or --set delta=...), which every node then uses, "
        "states it at that delta."
    )
