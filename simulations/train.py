"""``fedrec train``: centralized training, the reference run every federation is compared with."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from shared.recommender.experiment import Experiment
from shared.recommender.metrics import per_customer_metrics, target_ranks
from shared.recommender.model import FusionRecommender
from shared.recommender.popularity import (
    add_popularity,
    history_counts,
    popularity_logits,
    popularity_weight,
)
from shared.recommender.selection import EpochChoice
from shared.recommender.training import (
    calibrate_noise,
    learns_reversed,
    passes_per_epoch,
    planned_epsilon,
    steps_per_epoch,
    targets_within,
    train_epoch,
    train_private,
    training_tensors,
    with_reversed,
)
from shared.runs.config import RunConfig, resolve_device
from shared.runs.durable import OutputInUse, RunLock
from shared.runs.outputs import OtherSettings, check_rerun
from shared.runs.quiet import quiet_third_party
from shared.runs.rounding import up, up_significant
from simulations.verdict import print_verdict, run_context


def add_run_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set key=value`` overrides for any RunConfig setting, ``--device`` and ``--quiet``
    (shared by every command that runs the model: train, simulate, deploy local, the benches
    quality, privacy, dp-cost, robust and scale)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any run setting, e.g. --set dim=64 --set fusion=concat "
        "(see docs/configuration.md for the full list)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help=f"auto, cpu, cuda or cuda:N (default: {RunConfig.device})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_config_from_args(args: argparse.Namespace, **explicit) -> RunConfig:
    """The run's settings: defaults, then the ``--set`` overrides, then the ``explicit``
    options given (None: not given) and ``--device``; a bad one exits saying why."""
    values = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"fedrec: --set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = value.strip()
    values.update({k: v for k, v in explicit.items() if v is not None})
    if args.device:
        values["device"] = args.device
    try:
        config = RunConfig.from_flat(values)
        resolve_device(config.device)  # a device this machine has
    except ValueError as error:
        raise SystemExit(f"fedrec: {error}") from None
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (docs/data-and-evaluation.md)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory for the run")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="the most training epochs; with --dp, dp-epochs: exactly the epochs run "
        f"({RunConfig.dp_epochs} unless given) (default: {RunConfig.epochs})",
    )
    parser.add_argument(
        "--dp", action="store_true", help="train with DP-SGD (unit: one customer's whole history)"
    )
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help=f"DP budget (default: {RunConfig.target_epsilon})",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="DP delta, used only if smaller than the default, as at every federation node "
        "(default: 1/(10 x customers))",
    )
    add_run_config_arguments(parser)


def train_centralized(experiment: Experiment, show_progress: bool = True) -> dict:
    """Train on all customers. Returns the model, timing, privacy (or None), per-epoch history,
    the popularity prior validation kept (``popularity-prior``, not under DP) and, when the
    model was refit on the validation targets, the validation metrics measured before that
    refit."""
    config = experiment.config
    started = time.time()
    if config.dp:
        return _train_private(experiment, show_progress) | {"train_s": time.time() - started}
    histories = experiment.train_histories()
    # decided once (for the refit too), on the whole histories: fragment-nodes' pieces are
    # short because they are cut, as a merchant node's are (server/federation/rounds.py)
    whole = experiment.split.training_histories(False)
    backwards = learns_reversed(config, whole)
    if backwards and show_progress:
        print("also learning every history backwards (reverse-histories)", flush=True)
    model, history, best_epoch = _fit(
        experiment, histories, config.epochs, True, show_progress, backwards
    )
    kept = next(h for h in history if h["epoch"] == best_epoch)
    weight, tried = 0.0, []
    if config.popularity_prior and model.config.use_id:
        logits = popularity_logits(history_counts(histories, model.config.num_items), model)
        validate = partial(_valid_ndcg, experiment)
        weight, tried = popularity_weight(model, logits, validate, kept["valid_ndcg@10"])
        add_popularity(model, logits, weight)
        if show_progress and weight:
            print(f"validation keeps the popularity prior at weight {weight:g}", flush=True)
    result = {"model": model, "history": history, "privacy": None, "valid": None}
    result["popularity_prior"] = {"weight": weight, "tried": tried}
    if config.refit:  # validation has chosen the epochs; now learn from those events too
        result["valid"], _ = experiment.evaluate(model, "valid")
        result["valid_test"], _ = experiment.evaluate(model, "test")
        if show_progress and best_epoch:
            print(f"refit on training + validation events for {best_epoch} epoch(s)", flush=True)
        elif show_progress:
            print("no epoch beat the public start on validation: it is the model", flush=True)
        refit = experiment.train_histories(refit=True)
        result["model"] = _fit(experiment, refit, best_epoch, False, show_progress, backwards)[0]
        counts = history_counts(refit, model.config.num_items)
        add_popularity(result["model"], popularity_logits(counts, result["model"]), weight)
    best = max(history, key=lambda h: h["valid_ndcg@10"])
    if show_progress and best["epoch"] != best_epoch:
        print(
            f"validation cannot tell epoch {best_epoch} from epoch {best['epoch']} "
            f"(epoch-tolerance): epoch {best_epoch}, the earlier, is kept",
            flush=True,
        )
    result["timing"] = {
        "train_s": round(time.time() - started, 1),
        "best_epoch": best_epoch,
        "best_valid_epoch": best["epoch"],
        "epoch_s": round(float(np.mean([h["epoch_s"] for h in history if h["epoch"]])), 1),
    }
    result["reversed_histories"] = backwards
    return result


def _valid_ndcg(experiment: Experiment, model: FusionRecommender) -> float:
    """The model's validation NDCG@10 (what chooses the popularity prior's weight)."""
    return experiment.evaluate(model, "valid")[0]["ndcg@10"]


def _fit(
    experiment: Experiment,
    histories: list,
    epochs: int,
    select: bool,
    show_progress: bool,
    backwards: bool = False,
) -> tuple[FusionRecommender, list[dict], int]:
    """Adam over full-catalog softmax; with ``select``, early stopping on validation NDCG@10,
    the untrained public start (epoch 0) being the first candidate, and of the epochs that
    beat it the earliest within ``epoch-tolerance`` standard errors of the best is kept
    (:class:`EpochChoice`); with ``backwards``, every history is learnt reversed too
    (:func:`learns_reversed`). Returns the model, the history and the kept epoch."""
    config = experiment.config
    model = experiment.new_model()
    sequences = with_reversed(histories) if backwards else histories
    inputs, targets = training_tensors(sequences, model.config.max_len)
    columns = None
    trained = experiment.trained_items(histories)
    if not trained.all():  # products nobody has touched yet (held out: new) are not negatives
        columns = trained.nonzero().squeeze(1)
        targets = targets_within(targets, columns, len(trained))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    choice, start, history = EpochChoice(config.epoch_tolerance), None, []
    if select:  # the public start is a candidate too: an epoch must beat it on validation
        start = copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "valid_ndcg@10": _valid_ndcg(experiment, model)})
    floor, stale = history[0]["valid_ndcg@10"] if select else 0.0, 0
    passes = passes_per_epoch(len(inputs), config.batch_size, config.epoch_steps)
    for epoch in range(1, epochs + 1):
        epoch_start = time.time()
        loss = train_epoch(
            model,
            optimizer,
            inputs,
            targets,
            config.batch_size,
            experiment.device,
            show_progress=show_progress,
            columns=columns,
            passes=passes,
        )
        record = {"epoch": epoch, "loss": loss, "epoch_s": round(time.time() - epoch_start, 1)}
        history.append(record)
        if not select:
            continue
        values = _valid_values(experiment, model)
        record["valid_ndcg@10"] = float(values.mean())
        if show_progress:
            print(
                f"epoch {epoch}: loss {loss:.4f}  valid ndcg@10 {record['valid_ndcg@10']:.4f}  "
                f"({record['epoch_s']} s)",
                flush=True,
            )
        snapshot = partial(copy.deepcopy, model.state_dict())
        if record["valid_ndcg@10"] > floor and choice.offer(epoch, values, snapshot):
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if not select:
        return model, history, epochs
    kept = choice.kept
    model.load_state_dict(kept.state if kept else start)
    return model, history, kept.epoch if kept else 0


def _valid_values(experiment: Experiment, model: FusionRecommender) -> np.ndarray:
    """Each validation customer's NDCG@10 (their mean is the model's validation NDCG@10)."""
    split = experiment.split
    _, top = experiment.evaluate(model, "valid")
    ranks = target_ranks(top, split.target("valid")[split.test_users])
    return per_customer_metrics(ranks)["ndcg@10"]


def _train_private(experiment: Experiment, show_progress: bool) -> dict:
    """DP-SGD for a fixed number of epochs: no model selection on private validation data."""
    config = experiment.config
    model = experiment.new_model()
    inputs, targets = training_tensors(
        experiment.train_histories(config.refit), model.config.max_len
    )
    delta = config.customer_delta(len(inputs))  # as every federation node takes its delta
    steps, sample_rate = steps_per_epoch(len(inputs), config.dp_batch_size)
    sigma = calibrate_noise(config.target_epsilon, delta, sample_rate, steps * config.dp_epochs)
    spent = train_private(
        model,
        inputs,
        targets,
        epochs=config.dp_epochs,
        expected_batch=config.dp_batch_size,
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        lr=config.dp_lr,
        device=experiment.device,
        trainable=config.dp_train,
        show_progress=show_progress,
    )
    epsilon = planned_epsilon(sigma, delta, sample_rate, spent.steps)  # by Opacus's PRV
    privacy = {
        "unit": "one customer's entire history (every event of one customer)",
        "epsilon": epsilon,
        "delta": delta,
        "accountant": "prv (opacus)",
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": spent.steps,
        "max_grad_norm": config.max_grad_norm,
        "sampling": "poisson",
        "statement": (
            f"Trained with DP-SGD: ({up(epsilon, 3)}, {up_significant(delta, 3)})-differential "
            "privacy "
            "for each customer, covering everything that customer did in the training data. "
            "No decision was taken on validation data (fixed epochs)."
        ),
    }
    return {
        "model": model,
        "history": [{"epoch": config.dp_epochs, "loss": spent.loss}],
        "privacy": privacy,
        "valid": None,
        "timing": {},
    }


def run(args: argparse.Namespace) -> int:
    config = run_config_from_args(
        args,
        data=str(args.data),
        out=str(args.out),
        dp=args.dp or None,
        target_epsilon=args.target_epsilon,
        delta=args.delta,
    ).with_epochs(args.epochs)
    if config.dp and config.text_finetune_layers:
        raise SystemExit(
            "fedrec: private encoder tuning runs in a federation's encoder rounds (fedrec "
            "simulate --dp); fedrec train --dp does not tune it (set text-finetune-layers=0)"
        )
    if already_done(args.out, config):
        return 0
    with locked(args.out):
        quiet_third_party()
        experiment = Experiment.prepare(args.data, config, show_progress=not args.quiet)
        result = train_centralized(experiment, not args.quiet)
        extra = {"history": result["history"], "context": run_context(experiment)}
        if "popularity_prior" in result:
            extra["popularity_prior"] = result["popularity_prior"]
        if "reversed_histories" in result:
            extra["reversed_histories"] = result["reversed_histories"]
        if result.get("valid_test"):
            extra["test_before_refit"] = result["valid_test"]
        metrics = experiment.finish(
            args.out,
            result["model"],
            trained=experiment.trained_items(experiment.train_histories(config.refit)),
            timing=result["timing"]
            | ({"train_s": round(result["train_s"], 1)} if "train_s" in result else {}),
            privacy=result["privacy"],
            extra=extra,
            valid=result["valid"],
            title="fedrec centralized reference model",
        )
    print(f"wrote {args.out}/metrics.json, recs.csv, model/")
    print_verdict(metrics, args.out)
    return 0


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the lock on ``out`` for a command's run; another run on it exits at once, saying
    so. Shared by train and simulate."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(RunLock(out))
        except OutputInUse as error:
            raise SystemExit(f"fedrec: {error}") from None
        yield


def already_done(out: Path, config: RunConfig) -> bool:
    """True (after saying so) when ``out`` holds this finished run; exits when it holds a run
    with other settings. Shared by train and simulate, before anything starts."""
    try:
        complete = check_rerun(out, config.to_dict())
    except OtherSettings as error:
        raise SystemExit(f"fedrec: {error}") from None
    if complete:
        print(f"nothing to do: run complete ({out})")
        print_verdict(json.loads((out / "metrics.json").read_text()), out)
    return complete
