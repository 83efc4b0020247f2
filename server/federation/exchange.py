"""One run's exchanges with its nodes (:class:`Federation`): the messages of a round, sent
and their replies received; every private request ledgered before it leaves, every node's
privacy report recorded as its reply arrives (before anything else is done with it), and the
updates that pass validation kept (:class:`RoundResult`). The round loop that uses it is
server/federation/rounds.py."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.federation.aggregation import NodeUpdate
from server.federation.budget import BUDGET_KEY, NODE_UNIT, node_budget, node_customers
from server.federation.denoising import AUTO_BELOW_EPSILON, injected_bias_variance
from server.federation.encoder_rounds import ENCODER_ROUND
from server.federation.registry import Registry
from server.federation.releases import (
    Reports,
    heard_from,
    note_unamplified,
    privacy_reports,
    record_privacy,
)
from server.federation.settings import settings_record
from server.federation.strategy import FedRecStrategy
from server.federation.validation import Answers
from server.privacy.ledger import PrivacyLedger
from server.privacy.ledger_gaps import (
    NO_REPLY,
    current_start,
    record_answered,
    record_requested,
    record_unanswered,
)
from server.privacy.node_keys import NodeKeys
from shared.federation.wire import encode
from shared.recommender.experiment import Catalog
from shared.runs.config import RunConfig

log = logging.getLogger("fedrec.server")


# the largest value a node's reported number can honestly take (the rest: no upper bound)
REPORTED_MAX = {"reversed-histories": 1.0}  # 1: this node learnt its histories backwards too


@dataclass
class RoundResult:
    """What one training exchange gave: the updates to aggregate (or, under SecAgg+, their
    sum), how many nodes were sampled and contributed, and what was rejected."""

    updates: list[NodeUpdate]
    total: dict[str, np.ndarray] | None
    sampled: int
    contributed: int
    rejected: list[str]
    replies: list[Message]
    bias_noise: float | None = None  # what the nodes' DP noise added to each item bias

    def mean_metric(self, key: str) -> float | None:
        """The mean of a number the replies report (``loss``, ``bytes-up``), None if none does;
        a value that is not one finite number in [0, its :data:`REPORTED_MAX`] (a list, NaN, a
        negative loss, a share above 1: any node can send one) is left out."""
        high = REPORTED_MAX.get(key, math.inf)
        values = [
            float(value)
            for r in self.replies
            if not r.has_error()
            and isinstance(value := r.content.get("metrics", {}).get(key), int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0 <= value <= high
        ]
        return float(np.mean(values)) if values else None


class Federation:
    """One run's round machinery: the grid, the strategy, the ledger and the nodes' keys."""

    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        out: Path,
        catalog: Catalog,
        partitions: Path | None,
        customers: int | None,
        reversed_histories: bool = False,
    ):
        self.grid, self.config = grid, config
        # a deployment: nodes are who the operator registered
        registry = Registry.load(config.registry, catalog.items) if config.registry else None
        self.ledger = PrivacyLedger(out / "ledger.jsonl")
        # what each node is asked to keep, per customer: the run's first start states it (a
        # ledger from before it did asked the equal share)
        budget = None
        # a later start of the run's server (a resume) is numbered one more than the last; its
        # ``resumed`` entry is written before its first private request (:meth:`request`)
        self.resuming = bool(self.ledger.entries)
        self.start = current_start(self.ledger.entries) + int(self.resuming)
        if self.ledger.entries:
            budget = self.ledger.entries[0].get(BUDGET_KEY) or node_budget(config)
        elif config.dp:
            log.info("composing the nodes' private plans for the budget each is asked to keep")
            budget = node_budget(config, node_customers(partitions, registry))
        if not self.ledger.entries:
            self.ledger.append(
                "run_start",
                config={**config.to_dict(), "num_nodes": config.clients},
                unit=NODE_UNIT,
                **({BUDGET_KEY: budget} if config.dp else {}),
            )
        self.budget = config.target_epsilon if budget is None else budget
        if config.dp:
            log.info("each node is asked to keep epsilon %.4g per customer", budget)
        self.strategy = FedRecStrategy(config, self.budget)
        self.strategy.registry = registry
        if config.dp and config.dp_denoise == "auto":
            log.info(
                "dp-denoise=auto: the private update is %s (denoised below a node budget of %g)",
                "denoised" if self.strategy.denoiser else "applied as averaged",
                AUTO_BELOW_EPSILON,
            )
        if registry is not None:
            customers = registry.customers
        # unknown customers (no registry figures): every validation event chooses the rounds
        self.valid_fraction = config.valid_fraction(customers or 0)
        self.strategy.valid_fraction = self.valid_fraction  # what each node's answer weighs
        self.run_id = self.ledger.entries[0]["hash"]  # what every node's signed report names
        settings = settings_record(
            config, self.budget, catalog.digest, partitions, self.valid_fraction, reversed_histories
        )
        self.settings = ConfigRecord(
            {**dict(settings), "run-id": self.run_id, "server-start": self.start}
        )
        self.keys = NodeKeys(out / "node-keys")
        self.names: dict[int, str] = {}  # Flower node id -> the name its replies gave
        # the encoder's tuned top layers (server/federation/encoder_rounds.py), sent with every
        # message of the model's rounds: each node builds the same text encoder from them
        self.text_encoder: dict[str, torch.Tensor] | None = None
        self.secure = None
        if config.secagg:  # the legacy path, only for SecAgg+ rounds (server/federation/secagg.py)
            from server.federation.secagg import SecureAggregation

            self.secure = SecureAggregation(grid, config, self.settings)

    def messages(self, messages: list[Message], message_type: str) -> list[Message]:
        """The strategy's messages as ``message_type``, each carrying the tuned encoder layers
        when there are any (never in the encoder's own rounds: there they are the arrays)."""
        if self.text_encoder is not None and message_type != ENCODER_ROUND:
            encoder = ArrayRecord({k: Array(v.numpy()) for k, v in self.text_encoder.items()})
            for message in messages:  # one RecordDict, shared by the messages of a round
                message.content["text-encoder"] = encoder
        return [
            Message(
                content=m.content, dst_node_id=m.metadata.dst_node_id, message_type=message_type
            )
            for m in messages
        ]

    def record_unanswered(
        self,
        server_round: int,
        sent: list[int],
        heard: dict[int, str],
        errors: dict[int, str] | None = None,
        stage: str = "train",
    ) -> None:
        """Under DP, ledger each node of ``sent`` (Flower node ids) not ``heard`` from (id ->
        the name its reply gave) in answer to a ``stage`` request: it may have spent
        (server/privacy/ledger_gaps.py). Named as its earlier replies named it (a registered
        node by the registry; one never heard from by its Flower id), with Flower's error for
        it where ``errors`` holds one."""
        self.names.update(heard)
        if not self.config.dp:
            return
        unanswered = {}
        for node_id in sent:
            if node_id not in heard:
                name = self.names.get(node_id) or self.strategy.node_name(
                    node_id, f"flower node {node_id}"
                )
                unanswered[name] = (errors or {}).get(node_id, NO_REPLY)
        record_unanswered(self.ledger, server_round, unanswered, stage)
        record_answered(self.ledger, server_round, stage)

    def request(self, server_round: int, sent: list[int], stage: str = "train") -> None:
        """Under DP, ledger a private request of ``stage`` to ``sent`` (Flower node ids) before
        it leaves: a stop or crash before :meth:`record_unanswered` closes it leaves it counted
        as spent (server/privacy/ledger_gaps.py). A node is named as its replies named it. A
        resumed server's first request is preceded by its ``resumed`` entry: the releases after
        it are signed for this start."""
        if self.config.dp:
            if self.resuming:
                self.ledger.append("resumed")
                self.resuming = False
            names = {i: self.names.get(i) or self.strategy.node_name(i, "") for i in sent}
            unnamed = [i for i, name in names.items() if not name]
            record_requested(
                self.ledger, server_round, list(filter(None, names.values())), unnamed, stage
            )

    def reports(
        self, replies: list[Message], server_round: int, state: dict, private: bool = False
    ) -> Reports:
        """The replies' privacy reports, checked for this run, server start and round
        (:func:`privacy_reports`, ``private`` and ``sent=state`` as there)."""
        keys, run_id, strategy = self.keys, self.run_id, self.strategy
        return privacy_reports(
            replies, keys, run_id, server_round, strategy, private, sent=state, start=self.start
        )

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and wait for the replies (at most ``round-timeout`` seconds)."""
        return list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout or None))

    def train(
        self, server_round: int, state: dict[str, torch.Tensor], message_type: str = "train"
    ) -> RoundResult:
        """Send the global weights (``message_type``: the model's, or the encoder's
        ``train.encoder``), record every node's privacy report once the replies are in, and keep
        the updates that pass validation."""
        if self.secure is not None:  # the server sees the sum of the clipped updates only
            self.secure.sampler.on_sample = partial(self.request, server_round)
            total, records, sampled = self.secure.train_round(server_round, state)
            received = Reports()  # the masked updates themselves cannot be checked here
            check = (self.keys, self.run_id, self.start, server_round, self.strategy)
            heard: dict[int, str] = {}
            for node_id, record in records:  # checked as privacy_reports checks a reply's
                named = record.get("node")
                claimed = named if isinstance(named, str) else None
                identity = self.strategy.node_problem(node_id, claimed)
                heard[node_id] = self.strategy.node_name(node_id, claimed or str(node_id))
                received.receive(heard[node_id], record, identity, check)
            record_privacy(
                self.ledger, server_round, received.reports, unverified=received.unverified
            )
            self.record_unanswered(server_round, sampled, heard)
            done = sum(not (r.refused or r.declined) for r in received.reports)
            contributed = 0 if total is None else done
            return RoundResult([], total, len(sampled), contributed, [], [])
        arrays = ArrayRecord({k: Array(v) for k, v in encode(state).items()})
        messages = self.messages(
            list(self.strategy.configure_train(server_round, arrays, self.settings, self.grid)),
            message_type,
        )
        self.request(server_round, _destinations(messages), message_type)
        replies = self.exchange(messages)
        received = self.reports(replies, server_round, state, self.config.dp)
        record_privacy(
            self.ledger, server_round, received.reports, message_type, received.unverified
        )
        self.record_unanswered(
            server_round, _destinations(messages), *heard_from(replies, self.strategy), message_type
        )
        if server_round == 1 and message_type == "train":
            note_unamplified(received.reports, self.config.dp_rounds)
        updates, rejected = self.strategy.node_updates(
            received.trusted(replies, self.strategy), state
        )
        rejected += [f"{node}: {why}" for node, why in received.rejected.items()]
        noise = injected_bias_variance(received.reports, updates, self.config, state)
        return RoundResult(updates, None, len(messages), len(updates), rejected, replies, noise)

    def ask(
        self,
        server_round: int,
        state: dict[str, torch.Tensor],
        message_type: str = "evaluate",
        start: dict[str, torch.Tensor] | None = None,
    ) -> list[Message]:
        """Send every node the global weights (and ``start``, the starting ones, when given)
        for an answer (``message_type``: federated evaluation's ``evaluate``, the start guard's
        ``evaluate.guard``); their private answers are recorded in the ledger like any release
        before anything else is done. Returns the replies whose reports verify."""
        arrays = ArrayRecord({k: Array(v) for k, v in encode(state).items()})
        messages = self.messages(
            list(self.strategy.configure_evaluate(server_round, arrays, self.settings, self.grid)),
            message_type,
        )
        if start is not None:
            starting = ArrayRecord({k: Array(v) for k, v in encode(start).items()})
            for message in messages:  # the same record for each (their content may be shared)
                message.content["start"] = starting
        self.request(server_round, _destinations(messages), message_type)
        replies = self.exchange(messages)
        received = self.reports(replies, server_round, state)
        record_privacy(
            self.ledger, server_round, received.reports, message_type, received.unverified
        )
        self.record_unanswered(
            server_round, _destinations(messages), *heard_from(replies, self.strategy), message_type
        )
        return received.trusted(replies, self.strategy)

    def evaluate(
        self, server_round: int, state: dict[str, torch.Tensor]
    ) -> tuple[dict | None, Answers]:
        """The nodes evaluate the global model on their own customers (:meth:`ask`): the
        summary of their answers, and each node's validation answer (without DP), which
        chooses the rounds where the nodes validate."""
        replies = self.ask(server_round, state)
        summary = self.strategy.aggregate_evaluate(server_round, replies)
        return summary, self.strategy.validation(server_round, replies)


def _destinations(messages: list[Message]) -> list[int]:
    """The Flower node ids ``messages`` go to."""
    return [message.metadata.dst_node_id for message in messages]
