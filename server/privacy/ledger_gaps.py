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
    returns them. Each takes the parameters of the node's costliest known release (the
    largest epsilon alone, among its training and encoder releases when it has any), and no
    signature: it is the server's record, which the node's receipt log can confirm."""
    mine = [e for e in ledger.entries if e["kind"] == "contribution" and e["node"] == node]
    expected = mine[-1]["contribution_index"] + 1 if mine else 0
    dp_sgd = [e for e in [*mine, release] if e.get("purpose", "training") in DP_SGD]
    costliest = max(dp_sgd or [release], key=lambda e: recompute_epsilon([e], float(e["delta"])))
    template = {k: v for k, v in costliest.items() if k in release}
    template = {k: v for k, v in template.items() if k not in ("signature", "key_id")}
    recovered = []
    missing = int(release["contribution_index"]) - expected
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
    for index in range(expected, int(release["contribution_index"])):
        entry = {**template, "round": server_round, "node": node, "contribution_index": index}
        entry["epsilon"] = epsilon_curve([*mine, entry])[-1]
        log.warning("node %s: contribution %d was never recorded; recording it", node, index)
        mine.append(ledger.append("contribution", recovered=RECOVERED, **entry))
        recovered.append(mine[-1])
    return recovered
