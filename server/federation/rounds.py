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
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from server.federation.budget import federation_privacy
from server.federation.encoder_rounds import tune_encoder
from server.federation.exchange import Federation
from server.federation.guard import guard_start
from server.federation.popularity import NodeCounts, add_prior
from server.federation.progress import plot_rounds, report_round
from server.federation.resume import require_ledger, resume_problem
from server.federation.selection import MONITOR, RoundSelection, round_validation
from server.federation.settings import check_settings
from server.federation.validation import Answers
from server.privacy.ledger import ledger_head
from server.privacy.ledger_gaps import none_trained
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
    start_nodes: Answers = {}  # each node's validation answer for it, where the nodes validate
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
        start_nodes = progress.get("start_nodes", {})
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
    if selection is not None and not done:
        # the start is a candidate too (round 0): no round that validates below it is shipped;
        # where the nodes validate (a deployment) they evaluate it as they do every round
        if validating is None:
            _, start_nodes = federation.evaluate(0, state)
        start = round_validation(evaluation, model, validating, start_nodes)
        if start is not None:
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
            "start_nodes": start_nodes,
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
        answers: Answers = {}  # each node's validation answer (where the nodes validate)
        if config.federated_eval:
            entry["federated"], answers = federation.evaluate(server_round, state)
        if selection is not None:
            entry["selection"] = round_validation(
                evaluation, model, validating, answers, start_nodes
            )
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
        validate = partial(round_validation, evaluation, validating=validating)
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
