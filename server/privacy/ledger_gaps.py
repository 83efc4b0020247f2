"""Spending whose reply never reached the ledger: recorded when the node next contributes.

A node writes its accountant to disk before its update leaves it, so a server stopped mid-round
can lose a reply whose privacy was already spent. The node's next contribution then shows a gap
in its ``contribution_index``. Each missing contribution is appended before that next one, with
its parameters (fixed for a node within a run: its noise multiplier is calibrated once, its
sample rate and steps follow from its data and the run's settings, which a resumed run may not
change) and the cumulative epsilon they compose to, marked ``recovered``. The ledger then never
holds less spending than the nodes' accountants, and the audit's index check still holds.

A reply that never comes (the node stopped, the network dropped it, the round timed out, the
run ended) may still have been spent. The server records each private request a node did not
answer as ``unanswered``; until the node's next contribution shows by its index whether it
spent (a gap is recovered as above, no gap: it did not), each such request counts as one more
copy of the node's costliest release (:func:`outstanding_requests`), in the run's statement and
in the audit. A run that ends with a reply lost therefore states at least what was spent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from server.privacy.accounting import epsilon_curve, recompute_epsilon
from server.privacy.ledger import PrivacyLedger

log = logging.getLogger("fedrec.server")
DP_SGD = ("training", "encoder")  # the purposes of DP-SGD releases (the others: one answer)

NO_REPLY = "no reply (the node stopped, its reply was lost, or the round timed out)"
# the purpose of the release each request stage asks for (the stages: server/federation/)
STAGE_PURPOSE = {
    "train": "training",
    "train.encoder": "encoder",
    "evaluate": "evaluation",
    "evaluate.guard": "guard",
}
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


def costliest(releases: list[dict]) -> dict:
    """The release a lost one of the same node is accounted at: the largest epsilon alone,
    among its training and encoder releases when it has any (their parameters are fixed for a
    node within a run)."""
    return _dearest([e for e in releases if e.get("purpose", "training") in DP_SGD] or releases)


def _lost(mine: list[dict], release: dict, server_round: int, node: str, expected: int) -> list:
    """The entries of the contributions between ``mine`` (the node's recorded ones) and
    ``release``, with the parameters of the costliest and their cumulative epsilon."""
    template = {k: v for k, v in costliest([*mine, release]).items() if k in release}
    template = {k: v for k, v in template.items() if k not in ("signature", "key_id")}
    entries: list[dict] = []
    for index in range(expected, int(release["contribution_index"])):
        entry = {**template, "round": server_round, "node": node, "contribution_index": index}
        entry["epsilon"] = epsilon_curve([*mine, *entries, entry])[-1]
        entries.append(entry)
    return entries


def record_unanswered(
    ledger: PrivacyLedger, server_round: int, unanswered: dict[str, str], stage: str = "train"
) -> None:
    """Append an ``unanswered`` entry for each node of ``unanswered`` (node name -> why: no
    reply, or the error Flower returned) that a private request of ``stage`` reached in
    ``server_round`` without a reply to record."""
    named = {} if stage == "train" else {"stage": stage}
    for node, reason in sorted(unanswered.items()):
        log.warning("round %d, node %s: no answer to %s (%s)", server_round, node, stage, reason)
        ledger.append("unanswered", round=server_round, node=node, reason=reason, **named)


def outstanding_requests(entries: list[dict]) -> dict[str, list[str]]:
    """Per node, the purposes of the private requests it left unanswered since its last
    contribution: each may have been spent, and none is resolved until a contribution's
    index shows whether it was."""
    outstanding: dict[str, list[str]] = {}
    for entry in entries:
        node = str(entry.get("node"))
        if entry.get("kind") == "contribution":
            outstanding.pop(node, None)
        elif entry.get("kind") == "unanswered":
            purpose = STAGE_PURPOSE.get(str(entry.get("stage", "train")), "training")
            outstanding.setdefault(node, []).append(purpose)
    return outstanding


def outstanding_releases(
    entries: list[dict], answer_sigma: Callable[[str, float], float | None]
) -> tuple[list[dict], list[str]]:
    """(for each outstanding request of a node that contributed, the release it is counted
    at, marked ``outstanding``; the nodes with outstanding requests that never contributed,
    whose spending no release of theirs bounds). The release counted: the node's costliest of
    the request's purpose; for an answer of a purpose it never released (the start guard's
    comparison is asked once, last), the one Gaussian answer its plan gives it
    (``answer_sigma(purpose, its declared customers)``: the noise, None for DP-SGD); else its
    costliest of any purpose."""
    contributions: dict[str, list[dict]] = {}
    for entry in entries:
        if entry.get("kind") == "contribution":
            contributions.setdefault(str(entry["node"]), []).append(entry)
    copies: list[dict] = []
    silent: list[str] = []
    for node, purposes in outstanding_requests(entries).items():
        mine = contributions.get(node)
        if not mine:
            silent.append(node)
            continue
        for purpose in purposes:
            alike = [c for c in mine if c.get("purpose", "training") == purpose]
            sigma = None if alike else answer_sigma(purpose, float(mine[-1]["num_customers"]))
            if sigma is not None:
                counted = {**mine[-1], **planned_answer(purpose, sigma)}
            else:
                counted = _dearest(alike or mine)
            copies.append({**counted, "outstanding": True})
    return copies, sorted(silent)


def planned_answer(purpose: str, sigma: float) -> dict:
    """The release fields of one planned private answer of ``purpose`` at noise ``sigma``
    (the Gaussian mechanism at sensitivity 1, once)."""
    return {
        "purpose": purpose,
        "mechanism": "gaussian",
        "noise_multiplier": sigma,
        "sample_rate": 1.0,
        "steps": 1,
    }


def _dearest(releases: list[dict]) -> dict:
    """The release with the largest epsilon alone."""
    return max(releases, key=lambda e: recompute_epsilon([e], float(e["delta"])))
