"""The federation's round loop, read top to bottom.

Each round: sample nodes, send them the global weights and the run settings, record every
node's privacy spending in the ledger as its reply arrives (before anything else is done with
it), aggregate the accepted updates, evaluate the global model, and checkpoint. A stopped run
started again with the same OUT resumes after its last completed round. Under customer-level
DP the nodes then compare the rounds' model with its public start, privately, and the start is
shipped where they rank it better (server/federation/guard.py).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.federation.aggregation import NodeUpdate
from server.federation.budget import (
    BUDGET_KEY,
    NODE_UNIT,
    federation_privacy,
    node_budget,
    node_customers,
)
from server.federation.denoising import AUTO_BELOW_EPSILON, injected_bias_variance
from server.federation.encoder_rounds import ENCODER_ROUND, tune_encoder
from server.federation.guard import guard_start
from server.federation.popularity import NodeCounts, add_prior
from server.federation.progress import plot_rounds, report_round
from server.federation.registry import Registry
from server.federation.releases import (
    Reports,
    heard_from,
    note_unamplified,
    privacy_reports,
    record_privacy,
)
from server.federation.resume import require_ledger, resume_problem
from server.federation.selection import MONITOR, RoundSelection, round_validation
from server.federation.settings import check_settings, settings_record
from server.federation.strategy import FedRecStrategy
from server.privacy.ledger import PrivacyLedger, ledger_head
from server.privacy.ledger_gaps import (
    NO_REPLY,
    current_start,
    none_trained,
    record_answered,
    record_requested,
    record_unanswered,
)
from server.privacy.node_keys import NodeKeys
from server.privacy.node_privacy import NodeLevelDP, add_node_level
from shared.federation.wire import encode, nbytes, trainable_state
from shared.recommender.experiment import Catalog, Experiment
from shared.recommender.finetune import tuned_checkpoint
from shared.recommender.training import learns_reversed
from shared.runs.checkpoint import Checkpoint
from shared.runs.config import RunConfig
from shared.runs.durable import RunLock
from shared.runs.outputs import differences

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

    def evaluate(self, server_round: int, state: dict[str, torch.Tensor]) -> dict | None:
        """The nodes evaluate the global model on their own customers (:meth:`ask`)."""
        return self.strategy.aggregate_evaluate(server_round, self.ask(server_round, state))


def _destinations(messages: list[Message]) -> list[int]:
    """The Flower node ids ``messages`` go to."""
    return [message.metadata.dst_node_id for message in messages]


def run_federation(
    grid: Grid,
    config: RunConfig,
    out: Path,
    catalog: Catalog,
    evaluation: Experiment | None = None,
    partitions: Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Run (or resume) the federation over ``catalog`` and write the run's outputs to ``out``.

    A deployment's server holds the public catalog alone and the nodes evaluate the model
    (``federated-eval``); a simulation also gives its ``evaluation`` split (the events its
    nodes do not hold) and where its nodes' ``partitions`` are.
    """
    check_settings(config)
    if evaluation is None and not config.federated_eval:
        raise ValueError(
            "a server that holds only the catalog learns the model's quality from the nodes: "
            "set federated-eval=true"
        )
    with RunLock(out):  # one run at a time writes to OUT
        return _federate(grid, config, out, catalog, evaluation, partitions, show_progress)


def _federate(
    grid: Grid,
    config: RunConfig,
    out: Path,
    catalog: Catalog,
    evaluation: Experiment | None,
    partitions: Path | None,
    show_progress: bool,
) -> dict:
    """The run itself, under the lock on ``out`` (:func:`run_federation`)."""
    customers = None if evaluation is None else len(evaluation.split.test_users)
    # reverse-histories=auto is decided here, for every node, on the whole histories where the
    # server holds them (a simulation): a node's own are cut by its partition (a merchant's
    # are short whatever the data) and would mislead it. A deployment's server holds none:
    # auto is off there, and under DP everywhere (a customer is one sample).
    whole = [] if evaluation is None else evaluation.split.training_histories(False)
    backwards = learns_reversed(config, whole)
    if backwards:
        log.info("the nodes also learn every history backwards (reverse-histories)")
    elif config.reverse_histories == "auto" and evaluation is None and not config.private:
        log.info("reverse-histories=auto is off: the server holds no histories to decide on")
    require_ledger(out)
    federation = Federation(grid, config, out, catalog, partitions, customers, backwards)
    encoder_rounds: list[dict] = []
    if config.text_finetune_layers:  # the nodes tune the encoder first; the catalog follows
        federation.text_encoder, encoder_rounds = tune_encoder(federation, out, show_progress)
        layers = config.text_finetune_layers
        text_model = str(tuned_checkpoint(config.text_model, federation.text_encoder, layers))
        catalog = catalog.embedded_with(text_model, show_progress)
        if evaluation is not None:
            evaluation = replace(evaluation, text=catalog.text, text_model=text_model)
    model = catalog.new_model()
    state = trainable_state(model)
    public_start = {k: v.clone() for k, v in state.items()}  # what the start guard compares with
    strategy, ledger = federation.strategy, federation.ledger
    checkpoint = Checkpoint(out / "checkpoint.safetensors")
    history, trained_rows, done = [], np.zeros(catalog.num_items, dtype=bool), 0
    counts = NodeCounts(catalog.num_items)  # the nodes' item counts (popularity-prior)
    start = None  # the starting model's validation metrics (a candidate when rounds are chosen)
    guard = None  # the start guard's verdict, once asked (a resumed run never asks twice)
    saved = checkpoint.load()
    if saved is not None:
        if problem := resume_problem(saved[0], saved[2], state, catalog.num_items):
            raise SystemExit(
                f"fedrec: {checkpoint.path} cannot be resumed: {problem}; move it aside "
                "(with checkpoint.prev.safetensors) to start over"
            )
        state, strategy.server_state, progress = saved
        if changed := differences(progress["config"], config.to_dict()):
            raise SystemExit(
                f"{out} holds a run with other settings ({'; '.join(changed)}); use another --out"
            )
        history, done, start = progress["history"], progress["round"], progress.get("start")
        guard, counts = progress.get("guard"), NodeCounts(counts.num_items, progress.get("counts"))
        trained_rows[progress["trained_rows"]] = True
        log.info("resuming after round %d of at most %d", done, config.max_rounds)
    selection = None
    if config.selects_rounds:
        selection = RoundSelection(out / "best.safetensors", config.round_patience)
        selection.resume(done, history)
    validating = (
        evaluation.split.validation_users(federation.valid_fraction)
        if selection is not None and evaluation is not None
        else None
    )
    if selection is not None and validating is not None and not done:
        # the start is a candidate too: no round that validates below it is shipped
        start = round_validation({}, evaluation, model, validating)
        selection.observe(0, start, state, [])
    reason = "all rounds completed"
    asked = done  # the last round the nodes were asked to train in (the guard is numbered after it)
    monitor = "test" if config.refit else "valid"
    node_dp = NodeLevelDP(config, ledger) if config.node_dp else None

    def progress_record(server_round: int) -> dict:
        """What the checkpoint after ``server_round`` holds besides the weights."""
        return {
            "round": server_round,
            "history": history,
            "config": config.to_dict(),
            "trained_rows": np.flatnonzero(trained_rows).tolist(),
            "start": start,
            "counts": counts.stored(),
            "ledger": ledger_head(ledger.entries),  # a resumed run must find this entry
        }

    for server_round in range(done + 1, config.max_rounds + 1):
        if selection is not None and selection.stale(server_round - 1):
            reason = (
                f"validation ndcg@10 did not improve for {config.round_patience} rounds "
                f"(best: {best_name(selection.best_round)})"
            )
            break
        started = time.time()
        if node_dp is not None and (refusal := node_dp.refusal()):
            reason = refusal
            log.warning("round %d: %s", server_round, reason)
            break
        asked = server_round
        result = federation.train(server_round, state)
        counts.record(result.updates)
        if result.contributed < max(1, config.min_nodes):
            reason = (
                f"{result.contributed} valid update(s) in round {server_round}, fewer than "
                f"min-nodes {config.min_nodes} (nodes lost, budgets spent or updates rejected)"
                if result.contributed
                else none_trained(ledger.entries, server_round)
            )
            log.warning("round %d: %s", server_round, reason)
            break
        clipped: dict[str, int] = {}  # per node: rows and tensors the row bound scaled down
        if node_dp is not None:  # the noisy uniform mean, in the ledger before it is used
            total = (
                result.total if result.total is not None else node_dp.total(state, result.updates)
            )
            mean = node_dp.release(server_round, total, result.sampled, result.contributed)
            aggregated = strategy.optimizer.step(state, mean)
        else:
            aggregated, clipped = strategy.apply(state, result.updates, result.bias_noise)
            if clipped:
                log.info(
                    "round %d: the row bound scaled down %d rows or tensors of %d node(s)",
                    server_round,
                    sum(clipped.values()),
                    len(clipped),
                )
        if not all(torch.isfinite(value).all() for value in aggregated.values()):
            # never used, never checkpointed: the round's model is the previous one
            log.error(
                "round %d: the aggregate is not finite; the round is not applied", server_round
            )
            result.rejected.append("aggregate: not finite, the round was not applied")
            result.updates.clear()
        else:
            state = aggregated
            if node_dp is not None:
                trained_rows[:] = True
        for update in result.updates:
            if "id_scores.weight" in update.rows:
                trained_rows[update.rows["id_scores.weight"]] = True
            else:
                trained_rows[:] = True
        model.load_state_dict(state)
        entry = {"round": server_round}
        if evaluation is not None:
            # monitoring only (rounds are fixed, nothing is chosen on it); with refit the nodes
            # train on the validation targets, so the held-out test events show progress
            valid, _ = evaluation.evaluate(model, monitor)
            entry[monitor] = {k: v for k, v in valid.items() if "@" in k}
        if config.federated_eval:
            entry["federated"] = federation.evaluate(server_round, state)
        if selection is not None:
            entry["selection"] = round_validation(entry, evaluation, model, validating)
        history.append(
            {
                **entry,
                "nodes": result.contributed,
                "rejected": result.rejected,
                "clipped": clipped,
                "round_s": round(time.time() - started, 1),
                "bytes_down_per_node": nbytes(encode(state)),
                "bytes_up_per_node": result.mean_metric("bytes-up"),
                "loss": result.mean_metric("loss"),
                # the share of the round's nodes that also learnt their histories backwards
                "reversed_histories": result.mean_metric("reversed-histories"),
            }
        )
        checkpoint.save(state, strategy.server_state, progress_record(server_round))
        if selection is not None and entry["selection"] is not None:
            rows = np.flatnonzero(trained_rows).tolist()
            selection.observe(server_round, entry["selection"], state, rows)
        report_round(history[-1], config.max_rounds, show_progress)
    if config.guards_start and history and guard is None:
        # numbered as the last round asked, not the last applied: a node that trained in a
        # round the loop then stopped at refuses a request of an earlier one (client/accountant.py)
        guard = guard_start(federation, asked, state, public_start)
        record = progress_record(history[-1]["round"])
        checkpoint.save(state, strategy.server_state, {**record, "guard": guard})
    if guard is not None and guard["shipped"] == "start":  # the public start, not the rounds'
        state = public_start
        trained_rows[:] = False
    ledger.append("run_end", rounds_completed=len(history), reason=reason)
    chosen = None
    if selection is not None and (best := selection.best_state()) is not None:
        (state, rows), chosen = best, selection.best_valid
        trained_rows[:] = False
        trained_rows[rows] = True
        log.info("the global model: %s (best validation)", best_name(selection.best_round))
    model.load_state_dict(state)
    timing = {
        "rounds": len(history),
        "round_s": round(float(np.mean([h["round_s"] for h in history])), 1) if history else 0.0,
    }
    privacy = federation_privacy(ledger, config) if config.dp else None
    if config.node_dp:
        privacy = add_node_level(privacy, ledger, config)
    federated = [h["federated"] for h in history if h.get("federated")]
    extra = {"rounds": history, **({"federated_evaluation": federated} if federated else {})}
    if encoder_rounds:
        extra["encoder_rounds"] = encoder_rounds
    if selection is not None and evaluation is not None and config.counts_popularity:
        validate = partial(round_validation, {}, evaluation, validating=validating)
        chosen, extra["popularity_prior"] = add_prior(model, counts, validate, chosen)
    if guard is not None:
        extra["start_guard"] = guard
    if selection is not None:
        extra["selection"] = {
            "monitor": f"valid {MONITOR} of the validation customers",
            "valid_fraction": federation.valid_fraction,
            "best_round": selection.best_round,  # 0: the starting model
            "start": start,  # its validation metrics
            "rounds_run": len(history),
            "stopped": reason,
        }
    title = "fedrec federated global recommender"
    trained = torch.from_numpy(trained_rows)
    if config.text_finetune_layers:  # the model ships a copy of the tuned encoder: asked for
        # again, it is marked used (or rebuilt, if other runs' pruned it during the rounds)
        tuned_checkpoint(config.text_model, federation.text_encoder, config.text_finetune_layers)
    if evaluation is not None:
        metrics = evaluation.finish(
            out,
            model,
            trained=trained,
            timing=timing,
            privacy=privacy,
            extra=extra,
            valid=chosen,
            title=title,
        )
    else:
        filled = catalog.fill_untrained(model, trained)
        measured = {"timing": timing, "cold_filled_items": filled, **extra}
        metrics = catalog.write(out, model, measured, privacy, title=title)
    plot_rounds(history, out / "rounds.png")
    return metrics


def best_name(server_round: int) -> str:
    """How the log names the round validation chose (0: the starting model)."""
    return f"round {server_round}" if server_round else "the starting model, no round beat it"
