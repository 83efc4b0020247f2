"""The nodes' privacy reports as a round's replies arrive: each parsed, its sender checked
against the registry, its signed release against the node's key, this run and this round, and
recorded in the ledger before anything else is done with the reply (a node's spending is never
under-reported, even when its update is then refused)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message

from server.federation.strategy import FedRecStrategy
from server.privacy.ledger import PrivacyLedger
from server.privacy.ledger_gaps import record_lost_contributions
from server.privacy.node_keys import NodeKeys
from shared.federation.reports import NodeReport, ReportError, parse_report
from shared.federation.wire import load_arrays

log = logging.getLogger("fedrec.server")


@dataclass
class Reports:
    """The privacy reports of one exchange, parsed, and the nodes whose replies are not to be
    used (a malformed report, or a release that does not verify), with why."""

    reports: list[NodeReport] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    def trusted(self, replies: list[Message], strategy: FedRecStrategy) -> list[Message]:
        """The replies whose report parsed and verified (or that carry none)."""
        return [r for r in replies if strategy.sender(r) not in self.rejected]


def privacy_reports(
    replies: list[Message],
    keys: NodeKeys,
    run_id: str,
    server_round: int,
    strategy: FedRecStrategy,
    private: bool = False,
    sent: Mapping[str, torch.Tensor] | None = None,
) -> Reports:
    """Each reply's privacy report, parsed; the sender checked against the registry (if any)
    and a DP release against the node's key, this run and round, and the digest of the update
    it came with, read against ``sent`` (the weights sent: an update where none were sent is
    malformed). ``private`` (customer-level DP): an update without a signed release is
    refused, since its spending would be missing from the ledger."""
    received = Reports()
    for reply in replies:
        if reply.has_error() or not reply.has_content():
            continue
        sender = strategy.sender(reply)
        unreleased = private and "arrays" in reply.content
        if "privacy" not in reply.content:
            if unreleased:
                received.rejected[sender] = "an update under DP without its privacy report"
            continue
        try:
            if problem := strategy.identity_problem(reply):
                raise ReportError(problem)
            report = parse_report(dict(reply.content["privacy"]))
        except ReportError as error:
            received.rejected[sender] = f"privacy report refused: {error}"
            log.warning("round %d, node %s: %s", server_round, sender, error)
            continue
        if report.release is None and unreleased:
            received.rejected[sender] = "an update under DP without a signed release"
        elif report.release is not None:
            try:
                arrays = (
                    load_arrays(reply.content["arrays"], sent or {})
                    if "arrays" in reply.content
                    else None
                )
            except ValueError as error:
                problem = f"a malformed update: {error}"
            else:
                problem = verify_release(report, keys, arrays, run_id, server_round)
            if problem:  # keyed by who sent it: the reply that is then left out
                received.rejected[sender] = problem
                log.warning("round %d, node %s: %s", server_round, sender, problem)
        received.reports.append(report)
    return received


def verify_release(
    report: NodeReport,
    keys: NodeKeys,
    arrays: dict[str, np.ndarray] | None,
    run_id: str,
    server_round: int,
) -> str | None:
    """Why a signed release must not be trusted (None: it verifies)."""
    release = report.release
    assert release is not None
    if release.run_id != run_id or release.round != server_round:
        return f"signed for run {release.run_id[:12]}, round {release.round}: not this one"
    return keys.check(report, arrays)


def record_privacy(
    ledger: PrivacyLedger, server_round: int, reports: list[NodeReport], stage: str = "train"
) -> None:
    """Append each node's refusal, decline or release to the ledger, before anything else is
    done with its reply. A release is recorded even when it does not verify (its update is
    then not used): a node's spending is never under-reported. A refusal or decline in another
    ``stage`` than the model's training (the encoder rounds' ``train.encoder``, federated
    evaluation's ``evaluate``) says so: the encoder rounds are numbered from 1 too."""
    named = {} if stage == "train" else {"stage": stage}
    for report in reports:
        node = report.node
        if report.refused:
            ledger.append("refused", round=server_round, node=node, reason=report.reason, **named)
            log.warning("node %s refused %s round %d: %s", node, stage, server_round, report.reason)
        elif report.declined:
            ledger.append(
                "declined",
                round=server_round,
                node=node,
                reason=report.reason,
                epsilon=report.epsilon,
                **named,
            )
            log.info("node %s declined %s round %d: %s", node, stage, server_round, report.reason)
        elif report.release is not None:
            release = report.signed()
            record_lost_contributions(ledger, server_round, node, release)
            ledger.append("contribution", **release)


def note_unamplified(reports: list[NodeReport], rounds: int) -> None:
    """Say once which nodes' DP-SGD draws every customer at every step (a Poisson rate of 1:
    their declared customers are at most ``dp-batch-size``, so no amplification by sampling)
    when the plan has more than two rounds: measured on Beauty (docs/privacy.md, "What a node
    needs"), nodes of 400 customers learned more with two."""
    small = sorted(
        r.node
        for r in reports
        if r.release is not None and r.release.purpose == "training" and r.release.sample_rate >= 1
    )
    if small and rounds > 2:
        log.warning(
            "%d node(s) (%s) declare no more customers than dp-batch-size: their DP-SGD samples "
            "every customer at every step, so each of the %d rounds costs them the full "
            "composition; nodes this small learned more with --rounds 2 on Beauty "
            '(docs/privacy.md, "What a node needs")',
            len(small),
            ", ".join(small[:5]) + (", ..." if len(small) > 5 else ""),
            rounds,
        )
