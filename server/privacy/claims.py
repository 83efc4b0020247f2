"""What refused privacy reports claim spent, and how a federation's statement counts it.

A report the server refused (malformed, outside the run's plan, another node's, or not
verifying: an ``unverified`` ledger entry) is never recomputed, but its node may have spent what
it claims: its accountant charged before the reply left. Where the worst node's guarantee
applies (a regional run, every node vouching), no statement is below the largest claim, nor its
delta below a claim's. Where every node's spending composes (a customer may have data at every
node), a claim is spending on top of the composed releases: the claiming node's largest claim is
added by basic composition, epsilons and deltas adding (a claim whose release states no delta
counts at the largest delta a node states, or at the largest a node takes where none states
one), since the claim is a figure, not a release the PLD could compose. Taking only the largest
claim there stated a merchant federation in which one node's every release was refused at what
the other nodes composed to, below what they spent together. A node that claims spending but
signed no verified release vouched for nothing: its customers may be anyone's (``silent`` in
server/privacy/accounting.py, ``unvouched_nodes``). The run's statement
(server/federation/budget.py) and the audit (server/privacy/audit_federation.py) both count
claims here.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.privacy.ledger import is_number
from shared.runs.config import RunConfig

Claim = tuple[float, float | None]  # (largest epsilon claimed, largest delta stated or None)
# the largest delta a node takes (1 / (10 x its declared customers), at least one customer): a
# claim's where neither it nor any release of the run states one
LARGEST_NODE_DELTA = RunConfig().customer_delta(1)


def refused_claims(entries: Iterable[dict]) -> dict[str, Claim]:
    """Per node, what its refused reports claim: the largest epsilon that is a number >= 0,
    and the largest delta in (0, 1) they state (a ``delta`` field, or their ``release`` as
    sent; None: none states one). ``entries``: ``unverified`` ledger entries, or the audit's
    list of them; an entry claiming no epsilon is left out."""
    claims: dict[str, Claim] = {}
    for entry in entries:
        epsilon = entry.get("epsilon")
        if not is_number(epsilon) or epsilon < 0:
            continue
        release = entry.get("release")
        delta = entry.get("delta", release.get("delta") if isinstance(release, dict) else None)
        delta = float(delta) if is_number(delta) and 0 < delta < 1 else None
        node = str(entry.get("node"))
        before, stated = claims.get(node, (0.0, None))
        deltas = [d for d in (stated, delta) if d is not None]
        claims[node] = (max(before, float(epsilon)), max(deltas) if deltas else None)
    return claims


def with_claims(statement: dict, claims: dict[str, Claim]) -> dict:
    """``statement`` (``accounting.guarantee_statement``'s keys) counting ``claims``: the
    worst node's guarantee (``one_node``) never below the largest claim, nor its delta below
    a claim's; every node's
    composed (``all_nodes``, and its ``basic_composition``) plus each claim, its delta added
    (the largest delta a node states where the claim states none, :data:`LARGEST_NODE_DELTA`
    where none does: a claim alone was stated as pure DP, delta 0); ``epsilon`` is the one
    that applies. A new dict; ``statement`` is left as it was."""
    if not claims:
        return statement
    largest = max(epsilon for epsilon, _ in claims.values())
    added = sum(epsilon for epsilon, _ in claims.values())
    stated = [statement["one_node"]["delta"], *(d for _, d in claims.values() if d)]
    fallback = max(stated) or LARGEST_NODE_DELTA
    deltas = sum(fallback if delta is None else delta for _, delta in claims.values())
    one, every = dict(statement["one_node"]), dict(statement["all_nodes"])
    one["epsilon"] = max(one["epsilon"], largest)
    one["delta"] = max([one["delta"], *(fallback if d is None else d for _, d in claims.values())])
    basic = every["basic_composition"]
    every |= {
        "epsilon": every["epsilon"] + added,
        "delta": every["delta"] + deltas,
        "how": every["how"] + f", plus {len(claims)} refused report(s)' claims added",
        "basic_composition": {
            "epsilon": basic["epsilon"] + added,
            "delta": basic["delta"] + deltas,
        },
    }
    counted = {**statement, "one_node": one, "all_nodes": every}
    counted["epsilon"] = counted[counted["applies"]]["epsilon"]
    return counted


def planned_floor(target: float, nodes: int, claims: dict[str, Claim]) -> float:
    """The least a run states while a node's spending is bounded by none of its releases: the
    ``target`` at ``nodes`` (what their plans keep, if they followed them) plus every refused
    report's claim, which is all that is known of a node that may have left its plan (the
    larger of the two alone was below both spent together)."""
    return target * nodes + sum(epsilon for epsilon, _ in claims.values())
