"""Spending whose reply never reached the ledger: recorded when the node next contributes.

A node writes its accountant to disk before its update leaves it, so a server stopped mid-round
can lose a reply whose privacy was already spent. The node's next contribution then shows a gap
in its ``contribution_index``. Each missing contribution is appended before that next one, with
its parameters (fixed for a node within a run: its noise multiplier is calibrated once, its
sample rate and steps follow from its data and the run's settings, which a resumed run may not
change) and the cumulative epsilon they compose to, marked ``recovered``. The ledger then never
holds less spending than the nodes' accountants, and the audit's index check still holds.
"""

from __future__ import annotations

import logging
import math

from server.privacy.accounting import epsilon_curve, recompute_epsilon
from server.privacy.ledger import PrivacyLedger

log = logging.getLogger("fedrec.server")
DP_SGD = ("training", "encoder")  # the purposes of DP-SGD releases (the others: one answer)

RECOVERED = (
    "spent by the node but never recorded here (its reply lost when the server stopped "
    "mid-round, or an earlier federation on the same data); parameters from its next contribution"
)


def record_lost_contributions(
    ledger: PrivacyLedger, server_round: int, node: str, release: dict
) -> list[dict]:
    """Append the contributions ``node`` made before ``release`` (its report) that the ledger
    lacks (at most two per round run so far: a forged index must not fill the ledger);
    returns them. None when their epsilon cannot be computed or is not finite: the audit
    then reports the gap. Each takes the parameters of the node's costliest known release (the
    largest epsilon alone, among its training and encoder releases when it has any), and no
    signature: it is the server's record, which the node's receipt log can confirm."""
    mine = [e for e in ledger.entries if e["kind"] == "contribution" and e["node"] == node]
    expected = mine[-1]["contribution_index"] + 1 if mine else 0
    missing = int(release["contribution_index"]) - expected
    if missing <= 0:
        return []
    # a training and an evaluation release per model round, and encoder rounds numbered from 1
    if missing > 3 * server_round:
        log.warning(
            "node %s: contribution_index jumps by %d in round %d, more than this run's rounds "
            "could lose; not recovered (the audit reports the gap)",
            node,
            missing,
            server_round,
        )
        return []
    entries: list[dict] = []
    try:  # best effort: the release itself is recorded next whatever happens here
        entries = _lost(mine, release, server_round, node, expected)
    except (ArithmeticError, MemoryError, ValueError):
        entries = []
    # none computed, or one not finite (no noise): the ledger holds finite numbers only
    if not entries or not all(math.isfinite(e["epsilon"]) for e in entries):
        log.warning(
            "node %s: its %d lost contribution(s) have no finite epsilon to record; not "
            "recovered (the audit reports the gap)",
            node,
            missing,
        )
        return []
    recovered = []
    for entry in entries:
        index = entry["contribution_index"]
        log.warning("node %s: contribution %d was never recorded; recording it", node, index)
        recovered.append(ledger.append("contribution", recovered=RECOVERED, **entry))
    return recovered


def _lost(mine: list[dict], release: dict, server_round: int, node: str, expected: int) -> list:
    """The entries of the contributions between ``mine`` (the node's recorded ones) and
    ``release``, with the parameters of the costliest and their cumulative epsilon."""
    dp_sgd = [e for e in [*mine, release] if e.get("purpose", "training") in DP_SGD]
    costliest = max(dp_sgd or [release], key=lambda e: recompute_epsilon([e], float(e["delta"])))
    template = {k: v for k, v in costliest.items() if k in release}
    template = {k: v for k, v in template.items() if k not in ("signature", "key_id")}
    entries: list[dict] = []
    for index in range(expected, int(release["contribution_index"])):
        entry = {**template, "round": server_round, "node": node, "contribution_index": index}
        entry["epsilon"] = epsilon_curve([*mine, *entries, entry])[-1]
        entries.append(entry)
    return entries
