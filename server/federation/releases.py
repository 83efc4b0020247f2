"""The nodes' privacy reports as a round's replies arrive: each parsed, its sender checked
against the registry, its signed release against the run's plan (server/federation/
release_bounds.py), the node's key, this run and this round, and recorded in the ledger before
anything else is done with the reply (a node's spending is never under-reported, even when its
update is then refused: a report refused for any of these reasons is recorded as an
``unverified`` entry with the epsilon it claims, never recomputed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message

from server.federation.release_bounds import release_problem
from server.federation.strategy import FedRecStrategy
from server.privacy.ledger import PrivacyLedger
from server.privacy.ledger_gaps import record_lost_contributions
from server.privacy.node_keys import NodeKeys
from shared.federation.reports import (
    MAX_TEXT,
    NodeReport,
    ReportError,
    claimed_epsilon,
    parse_report,
)
from shared.federation.wire import load_arrays

log = logging.getLogger("fedrec.server")


@dataclass
class Reports:
    """The privacy reports of one exchange, parsed, and the nodes whose replies are not to be
    used (a malformed report, or a release that does not verify), with why; ``unverified``:
    the ledger fields of each refused report, with the epsilon it claims where it states one."""

    reports: list[NodeReport] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    unverified: list[dict] = field(default_factory=list)

    def trusted(self, replies: list[Message], strategy: FedRecStrategy) -> list[Message]:
        """The replies whose report parsed and verified (or that carry none)."""
        return [r for r in replies if strategy.sender(r) not in self.rejected]

    def receive(
        self,
        sender: str,
        record: dict,
        identity: str | None,
        check: tuple[NodeKeys, str, int | None, int, FedRecStrategy],
        arrays: dict[str, np.ndarray] | None = None,
        unreleased: bool = False,
    ) -> None:
        """Take ``sender``'s privacy ``record``: parsed, refused for its ``identity`` problem
        (if any), its release bounded by the run's plan and verified (``check``: the node keys,
        run id, server start, round and strategy; ``arrays``: the update it signs, when the
        server sees it).
        ``unreleased``: an update under customer-level DP, refused without a signed release."""
        keys, run_id, start, server_round, strategy = check
        try:
            if identity:
                raise ReportError(identity)
            report = parse_report(record)
        except ReportError as error:
            why = f"privacy report refused: {error}"
            self.refuse(sender, why, server_round, claimed_epsilon(record))
            return
        release = report.release
        if release is None:
            if unreleased:
                self.rejected[sender] = "an update under DP without a signed release"
            self.reports.append(report)
            return
        registered = None if strategy.registry is None else strategy.registry.named(sender)
        customers = None if registered is None else registered.customers
        problem = release_problem(release, strategy.config, customers)
        if problem is not None:
            problem = f"release refused as malformed: {problem}"
        else:
            problem = verify_release(report, keys, arrays, (run_id, start, server_round))
        if problem:
            self.refuse(sender, problem, server_round, release.epsilon, report.signed())
        else:
            self.reports.append(report)

    def refuse(
        self,
        node: str,
        why: str,
        server_round: int,
        epsilon: float | None,
        release: dict | None = None,
    ) -> None:
        """Leave ``node``'s reply out for ``why``; keep for the ledger what its report claims
        was spent: its ``epsilon`` (None: it states none) and its ``release`` as sent, when
        it parsed."""
        why = why[:MAX_TEXT]
        self.rejected[node] = why
        log.warning("round %d, node %s: %s", server_round, node[:MAX_TEXT], why)
        entry: dict = {"node": node[:MAX_TEXT], "reason": why}
        if epsilon is not None:
            entry["epsilon"] = epsilon
        if release is not None:
            entry["release"] = release
        self.unverified.append(entry)


def privacy_reports(
    replies: list[Message],
    keys: NodeKeys,
    run_id: str,
    server_round: int,
    strategy: FedRecStrategy,
    private: bool = False,
    *,
    sent: Mapping[str, torch.Tensor],
    start: int | None = None,
) -> Reports:
    """Each reply's privacy report, parsed; the sender checked against the registry (if any)
    and a DP release against the run's plan, the node's key, this run, server ``start`` and
    round, and the digest of the update it came with, read against ``sent`` (the weights
    sent: an update where none were sent is malformed). ``private`` (customer-level DP): an
    update without a signed release is refused, since its spending would be missing from the
    ledger. A second reply for a node already heard from in this exchange leaves every reply
    of that node out (which is the node's cannot be told; the first one's report is recorded
    as it is)."""
    received = Reports()
    heard: dict[str, int] = {}  # node -> the Flower node id of its first reply
    for reply in replies:
        if reply.has_error() or not reply.has_content():
            continue
        sender = strategy.sender(reply)
        unreleased = private and "arrays" in reply.content
        source = reply.metadata.src_node_id
        if sender in heard:
            record = dict(reply.content.get("privacy", {}))
            why = f"a second reply for it in this exchange (Flower nodes {heard[sender]}, {source})"
            received.refuse(sender, why, server_round, claimed_epsilon(record))
            continue
        heard[sender] = source
        if "privacy" not in reply.content:
            if unreleased:
                received.rejected[sender] = "an update under DP without its privacy report"
            continue
        record = dict(reply.content["privacy"])
        try:
            arrays = (
                load_arrays(reply.content["arrays"], sent) if "arrays" in reply.content else None
            )
        except ValueError as error:
            why = f"a malformed update: {error}"
            received.refuse(sender, why, server_round, claimed_epsilon(record))
            continue
        received.receive(
            sender,
            record,
            strategy.identity_problem(reply),
            (keys, run_id, start, server_round, strategy),
            arrays,
            unreleased,
        )
    return received


def verify_release(
    report: NodeReport,
    keys: NodeKeys,
    arrays: dict[str, np.ndarray] | None,
    asked: tuple[str, int | None, int],
) -> str | None:
    """Why a signed release must not be trusted (None: it verifies): among others, one signed
    for another run or round than ``asked`` (run id, server start, round), or for another
    server start, or for none where this server numbers its starts (a node of today signs the
    start it was asked; one leaving it out would settle requests in flight by the old rule)."""
    release = report.release
    assert release is not None
    run_id, start, server_round = asked
    if release.run_id != run_id or release.round != server_round:
        return f"signed for run {release.run_id[:12]}, round {release.round}: not this one"
    if start is not None and release.server_start != start:
        return f"signed for server start {release.server_start}: this server's start is {start}"
    return keys.check(report, arrays)


def record_privacy(
    ledger: PrivacyLedger,
    server_round: int,
    reports: list[NodeReport],
    stage: str = "train",
    unverified: Sequence[dict] = (),
) -> None:
    """Append each node's refusal, decline or verified release to the ledger, before anything
    else is done with its reply, then each refused report (``unverified``,
    :attr:`Reports.unverified`) as an ``unverified`` entry: what it claims spent, never
    recomputed (a node's spending is never under-reported, and a hostile release's parameters
    never reach the accountant). A refusal, decline or refused report in another ``stage``
    than the model's training (the encoder rounds' ``train.encoder``, federated evaluation's
    ``evaluate``) says so: the encoder rounds are numbered from 1 too."""
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
    for entry in unverified:
        ledger.append("unverified", round=server_round, **entry, **named)


def heard_from(
    replies: Sequence[Message], strategy: FedRecStrategy
) -> tuple[dict[int, str], dict[int, str]]:
    """(Flower node id -> name of each node that replied with content, Flower node id -> the
    error Flower returned for a node instead of its reply)."""
    heard, errors = {}, {}
    for reply in replies:
        if reply.has_error():
            errors[reply.metadata.src_node_id] = f"error: {reply.error.reason}"[:MAX_TEXT]
        elif reply.has_content():
            heard[reply.metadata.src_node_id] = strategy.sender(reply)
    return heard, errors


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
