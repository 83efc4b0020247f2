"""A node's private side: its data, its local training and evaluation, and its privacy accountant.

The node's data directory never leaves the node. What the node returns is the trained weights
(item tables limited to its own catalog) and aggregate numbers: customers, loss, and its privacy
spending. Each release is checked against the budget and charged to the node's accountant
(client/accountant.py: every federation that ever used this data directory, one at a time under
a file lock) BEFORE anything computed under it is handed back, so no crash can forget spending.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from client.accountant import NodePrivacy, RequestPosition
from client.policy import NodePolicy
from shared.data.dataset import DataError, Split, leave_one_out, load_dataset
from shared.data.partition import cold_item_indices
from shared.federation.node_directory import NODE_FILE, NodeInfo
from shared.federation.reports import PRIVACY_UNIT
from shared.federation.wire import COUNTS, ITEM_TABLES
from shared.recommender.experiment import catalog_digest
from shared.recommender.metrics import EVALUATED, ScoreFn, per_customer_metrics, rank_users
from shared.recommender.model import FusionRecommender
from shared.recommender.popularity import history_counts
from shared.recommender.secure_random import SecureRandom
from shared.recommender.text import embed_items
from shared.recommender.training import (
    calibrate_noise,
    learns_reversed,
    passes_per_epoch,
    select_trainable,
    steps_per_epoch,
    targets_within,
    train_epoch,
    train_private,
    training_tensors,
    with_reversed,
)
from shared.runs.config import RunConfig, resolve_device


@dataclass
class NodeData:
    """One node's local dataset. The node trains on all of it (in simulation the server has
    already kept the evaluation events out of the partitions); ``split`` is its local
    leave-one-out view, used only for federated evaluation."""

    name: str
    directory: Path
    split: Split
    text: torch.Tensor
    catalog: np.ndarray | None  # item indices this node sells; None = every item
    declared_customers: int | None  # the public figure in node.json, if any
    catalog_digest: str  # of the items table it holds (experiment.catalog_digest)
    items: pd.DataFrame  # the items table it holds (the public catalog)
    partition: str = ""  # how its node.json says the data was split (regional, merchant)


@functools.lru_cache(maxsize=4)
def load_node(directory: str, text_model: str) -> NodeData:
    """Load (once per process) a node's data directory."""
    dataset = load_dataset(directory)
    info = NodeInfo.read(Path(directory))
    catalog = info.catalog_indices(dataset.items, Path(directory))
    if catalog is not None:  # a merchant's events are all on its own products
        events = dataset.interactions
        outside = events[~events["item_idx"].isin(catalog)]
        if len(outside):
            first = outside.loc[outside["row"].idxmin()]
            raise DataError(
                dataset.report.interactions_file,
                f"item_id {first['item_id']!r} is not in this node's catalog ({NODE_FILE}); "
                f"{len(outside)} event(s) are on products it does not sell",
                row=int(first["row"]) + 1,
            )
    digest = catalog_digest(dataset.items)
    return NodeData(
        info.node,
        Path(directory),
        leave_one_out(dataset),
        catalog_text(dataset.items, digest, text_model),
        catalog,
        info.customers,
        digest,
        dataset.items,
        info.partition,
    )


_catalog_texts: dict[tuple[str, str], torch.Tensor] = {}


def catalog_text(items: pd.DataFrame, digest: str, text_model: str) -> torch.Tensor:
    """The catalog's text embeddings (read-only), embedded or read from the cache once per
    process and catalog: the nodes of a simulation share one catalog, and a process hosts many
    of them in turn."""
    key = (digest, text_model)
    if key not in _catalog_texts:
        if len(_catalog_texts) >= 2:  # a process seldom sees more than one catalog
            _catalog_texts.clear()
        embedded = embed_items(items, text_model, show_progress=False)
        _catalog_texts[key] = torch.from_numpy(embedded)
    return _catalog_texts[key]


def build_model(
    node: NodeData, config: RunConfig, state: dict[str, torch.Tensor]
) -> FusionRecommender:
    """The run's model over the node's catalog, holding the weights ``state``, on the run's
    device."""
    model_config = config.model_config(len(node.text), node.text.shape[1])
    model = FusionRecommender.from_state(model_config, node.text, state)
    return model.to(resolve_device(config.device))


class CatalogView(torch.nn.Module):
    """The model scoring only the node's own catalog (targets re-indexed into it)."""

    def __init__(self, model: FusionRecommender, catalog: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.as_tensor(catalog), persistent=False)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.model(items)[..., self.columns]


def training_histories(
    node: NodeData, config: RunConfig, valid_fraction: float = 0.0
) -> list[np.ndarray]:
    """What the node trains on. A node that evaluates the global model (``federated-eval``)
    holds out each customer's last event (and the one before it unless ``refit``, or when the
    customer is a validation customer at ``valid_fraction``) as the protocol's leave-one-out
    split does, so that it never evaluates on what it trained on; a node that answers the
    start guard (``dp-guard``) holds out each customer's last event, which the guard compares
    on. Otherwise its data already lacks the events the simulation's server evaluates on, and
    it trains on all of it."""
    if config.federated_eval:
        return node.split.training_histories(config.refit, valid_fraction)
    if config.guards_start:
        return node.split.training_histories(refit=True)
    return node.split.sequences()


def train_node(
    node: NodeData,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    server_round: int,
    policy: NodePolicy | None = None,
    valid_fraction: float = 0.0,
    position: RequestPosition | None = None,
) -> dict:
    """Local training from the global ``state``; returns weights, rows and numbers to report.

    ``policy`` is the node's own (default: a simulation node's, which accepts any request); a
    request weaker than it is refused before anything is computed. ``valid_fraction``: the
    share of customers whose validation event stays out of training (:func:`training_histories`).
    ``position``: the request's place in its run; a private round of an earlier place than one
    already charged is refused (:meth:`NodePrivacy.order_refusal`).
    """
    policy = policy or NodePolicy()
    customers = public_customers(node, policy)
    if reason := policy.refusal(config, customers):
        return {"node": node.name, "refused": True, "reason": reason}
    device = resolve_device(config.device)
    model = build_model(node, config, state)
    histories = [
        np.asarray(h) for h in training_histories(node, config, valid_fraction) if len(h) >= 2
    ]
    # the server decides reverse-histories for every node (server/federation/rounds.py)
    backwards = learns_reversed(config, histories)
    sequences = with_reversed(histories) if backwards else histories
    inputs, targets = training_tensors(sequences, model.config.max_len)
    scored = scored_catalog(node, config)
    if scored is not None:
        targets = targets_within(targets, torch.as_tensor(scored), model.config.num_items)
    catalog = scored if scored is not None else np.arange(model.config.num_items)
    # under either DP the public figure, never the exact count
    stated = customers if config.dp or config.node_dp else len(histories)
    report: dict = {"customers": stated, "node": node.name, "reversed": backwards}
    trainee = CatalogView(model, scored) if scored is not None else None
    if config.dp:
        private = _train_private(
            node, config, policy, trainee or model, inputs, targets, customers, device, position
        )
        report.update(private)
        if report.get("declined") or report.get("refused"):
            return report
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        proximal = None
        if config.strategy == "fedprox" and config.proximal_mu > 0:

            def proximal() -> torch.Tensor:  # FedProx: stay near the global model
                return (
                    config.proximal_mu
                    / 2
                    * sum(((p - anchor[k]) ** 2).sum() for k, p in model.named_parameters())
                )

        losses = [
            train_epoch(
                model,
                optimizer,
                inputs,
                targets,
                config.local_batch_size,
                device,
                proximal,
                columns=None if trainee is None else trainee.columns,
            )
            for _ in range(local_epochs(len(inputs), config))
        ]
        report["loss"] = float(np.mean(losses))
        # the server's prior: not under DP, and never from a deployed node, whose server the
        # settings cannot vouch for (a server asking for counts there is no simulation's)
        if config.counts_popularity and model.config.use_id and not policy.deployed:
            report[COUNTS] = history_counts(histories, model.config.num_items)
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    report["state"] = trained
    report["rows"] = _rows_to_send(trained, state, catalog, changed_only=not config.dp)
    return report


def scored_catalog(node: NodeData, config: RunConfig) -> np.ndarray | None:
    """The products this node's softmax ranks among (None: every product): its own catalog,
    less the products a simulation holds out as not existing yet (``cold-items``: no node
    trains on them, not even as negatives, as ``fedrec train`` does not)."""
    cold = cold_item_indices(len(node.items), config.cold_items, config.seed)
    if not len(cold):
        return node.catalog
    catalog = node.catalog if node.catalog is not None else np.arange(len(node.items))
    return np.setdiff1d(catalog, cold)


def local_epochs(customers: int, config: RunConfig) -> int:
    """Epochs a node trains per round without DP: ``local-epochs``, or more on a small node,
    enough for ``local-steps`` optimiser steps (a node of 200 customers in batches of 32 takes
    7 steps an epoch: one epoch a round barely moves the model), but no more than
    ``max-local-epochs`` (a merchant with 30 customers would otherwise take 20 passes over
    them a round: its update overfits them, and a federation of many small merchants does
    several times the work of one of a few large ones on the same data)."""
    wanted = passes_per_epoch(customers, config.local_batch_size, config.local_steps)
    return max(config.local_epochs, min(wanted, config.max_local_epochs))


def _rows_to_send(trained: dict, before: dict, catalog: np.ndarray, changed_only: bool) -> dict:
    """Item-table rows this node answers for: its catalog (and, without DP, only changed rows).

    Under DP every catalog row is sent, whatever changed: which rows changed could reveal
    which products the node's customers bought.
    """
    rows = {}
    for name, offset in ITEM_TABLES.items():
        if name not in trained:
            continue
        index = np.asarray(catalog, dtype=np.int64)
        if changed_only:
            after, prior = trained[name][index + offset], before[name][index + offset]
            changed = (after != prior).reshape(len(index), -1).any(1).numpy()
            index = index[changed]
        rows[name] = index
    return rows


def public_customers(node: NodeData, policy: NodePolicy) -> int:
    """The node's customer figure that may leave it (:meth:`NodePolicy.customers`)."""
    exact = sum(len(h) >= 2 for h in node.split.sequences())
    return policy.customers(exact, node.declared_customers)


def privacy_plan(
    config: RunConfig, policy: NodePolicy, customers: int
) -> tuple[float, float, int, float]:
    """(delta, sample rate, DP-SGD steps per round, budget) of this node for ``config``: all
    from the node's public customer figure and its own policy."""
    delta = policy.delta(config, customers)
    steps, sample_rate = steps_per_epoch(customers, config.dp_batch_size)
    return delta, sample_rate, steps * config.dp_local_epochs, policy.budget(config)


def over_budget(
    privacy: NodePrivacy, delta: float, budget: float, event: tuple[float, float, int]
) -> str | None:
    """Why ``event`` (noise multiplier, sample rate, steps) would pass the budget, or None."""
    projected = privacy.epsilon_after(delta, event)
    if projected <= budget:
        return None
    return f"the next release would bring epsilon to {projected:.3f}, over the budget {budget}"


def encoder_plan(config: RunConfig, customers: int) -> tuple[float, int] | None:
    """(sample rate, steps a round) of this node's private encoder rounds
    (client/encoder.py): one expected pass over its customers a round, ``dp-encoder-batch`` of
    them a step; None when the run tunes no encoder under DP."""
    if not (config.dp and config.text_finetune_layers):
        return None
    steps, sample_rate = steps_per_epoch(customers, config.dp_encoder_batch)
    return sample_rate, steps


def noise_multiplier(
    privacy: NodePrivacy, config: RunConfig, policy: NodePolicy, customers: int
) -> float:
    """The noise multiplier of every DP-SGD step this node takes: calibrated once, at its first
    private release, so that its whole plan (``dp-rounds`` of training, the encoder rounds
    when the run tunes the encoder, one private evaluation a round when it evaluates at the
    nodes, the start guard's comparison) spends at most its budget; kept in its accountant's
    state from then on."""
    if privacy.state["noise_multiplier"] is None:
        delta, sample_rate, round_steps, budget = privacy_plan(config, policy, customers)
        encoder = encoder_plan(config, customers)
        privacy.state["noise_multiplier"] = calibrate_noise(
            budget,
            delta,
            sample_rate,
            round_steps * config.dp_rounds,
            releases=config.gaussian_releases(customers),
            more_steps=(
                ((encoder[0], encoder[1] * config.text_finetune_rounds),) if encoder else ()
            ),
        )
    return privacy.state["noise_multiplier"]


def _train_private(
    node: NodeData,
    config: RunConfig,
    policy: NodePolicy,
    model: torch.nn.Module,  # the model, or its view of the node's catalog
    inputs: torch.Tensor,
    targets: torch.Tensor,
    customers: int,
    device: str,
    position: RequestPosition | None,
) -> dict:
    """One private training round: checked against the budget and the order of the run's
    requests and charged (the accountant written to disk) under the accountant's lock, then
    trained; a crash during training over-counts, never forgets. A request whose ``dp-train``
    leaves nothing of this model to train is refused before any charge."""
    try:
        select_trainable(model, config.dp_train)
    except ValueError as error:
        return {"refused": True, "reason": str(error)}
    privacy = NodePrivacy(node.directory, position)
    delta, sample_rate, round_steps, budget = privacy_plan(config, policy, customers)
    with privacy.locked():  # no other release of this node between the check and the charge
        if reason := privacy.order_refusal():
            return {"refused": True, "reason": reason}
        sigma = noise_multiplier(privacy, config, policy, customers)
        event = (sigma, sample_rate, round_steps)
        if reason := over_budget(privacy, delta, budget, event):
            return privacy.declined(delta, reason)
        epsilon, index = privacy.charge(event, delta)  # spent from here, whatever happens next
    spent = train_private(
        model,
        inputs,
        targets,
        epochs=config.dp_local_epochs,
        expected_batch=config.dp_batch_size,
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        lr=config.dp_lr,
        device=device,
        trainable=config.dp_train,
        population=customers,
    )
    return {
        "loss": spent.loss,
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": round_steps,
        "max_grad_norm": config.max_grad_norm,
        "contribution_index": index,
        "accountant": "prv",
        "mechanism": "poisson_subsampled_gaussian",
        "purpose": "training",
        "unit": PRIVACY_UNIT,
        "target_epsilon": budget,
    }


def evaluate_node(
    node: NodeData,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    policy: NodePolicy | None = None,
    valid_fraction: float = 0.0,
    position: RequestPosition | None = None,
) -> dict:
    """Federated evaluation: the global model on each local customer's last event from the
    earlier ones, an event the node held out of its training (:func:`training_histories`);
    without DP, also on the validation event of its validation customers (``valid_fraction``),
    which chooses the rounds (``valid-customers``, ``valid-ndcg@10``, ...). An exact figure
    over fewer customers than the node's ``min-exact-customers`` is left out.

    Under DP (the request's or the node's policy) the answer is itself private and charged to
    the node's accountant: noisy sums of (1, hr@10, ndcg@10) over the customers, each
    customer's vector scaled to L2 norm <= 1, Gaussian noise of std ``eval-noise-multiplier``
    (:func:`private_sums`), in the order of the run's requests (``position``, as in
    :func:`train_node`). Without DP it is exact.
    """
    policy = policy or NodePolicy()
    customers = public_customers(node, policy)
    if reason := policy.refusal(config, customers, training=False):
        return {"node": node.name, "refused": True, "reason": reason}
    score = _scorer(node, config, state)
    users = node.split.test_users
    per_customer = _held_out_metrics(node, score)
    if config.dp:
        return _evaluate_private(node, config, policy, customers, per_customer, position)
    result: dict = {"node": node.name}
    if len(users) >= policy.min_exact_customers:
        result |= {"customers": len(users), **_means(per_customer)}
    validating = node.split.validation_users(valid_fraction) if valid_fraction > 0 else []
    if len(validating) >= max(1, policy.min_exact_customers):
        _, ranks = rank_users(score, node.split, "valid", users=validating)
        valid = _means(per_customer_metrics(ranks))
        result |= {"valid-customers": len(validating)}
        result |= {f"valid-{k}": v for k, v in valid.items()}
    return result


def _means(per_customer: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of each reported metric over the customers (0 when there are none)."""
    return {k: float(per_customer[k].mean()) if len(per_customer[k]) else 0.0 for k in EVALUATED}


def private_sums(values: np.ndarray, noise_multiplier: float) -> np.ndarray:
    """Noisy column sums of ``values`` (customers, k) with entries in [-1, 1]: each row is
    scaled by 1/sqrt(k) (L2 norm <= 1, the sensitivity of adding or removing a customer),
    summed, noised with N(0, noise_multiplier^2) per column, scaled back, and rounded to
    float32 as every DP-SGD release is: the float64 sum and draws are far finer than that
    grid, so their low bits, which floating-point attacks read (Mironov 2012; Jin et al.
    2021), never leave the node (docs/privacy.md, "Randomness")."""
    scale = np.sqrt(values.shape[1])
    total = values.sum(0) / scale
    noise = SecureRandom().normal((values.shape[1],), noise_multiplier, dtype=torch.float64)
    return ((total + noise.numpy()) * scale).astype(np.float32)


def _evaluate_private(
    node: NodeData,
    config: RunConfig,
    policy: NodePolicy,
    customers: int,
    per_customer: dict[str, np.ndarray],
    position: RequestPosition | None,
) -> dict:
    count = len(next(iter(per_customer.values())))
    columns = [np.ones(count)] + [per_customer[k] for k in EVALUATED]
    values = np.stack(columns, axis=1)
    sigma = config.eval_noise_multiplier
    answer = _private_answer(node, config, policy, customers, values, sigma, position)
    if "sums" not in answer:
        return answer
    sums = answer.pop("sums")
    named = {f"noisy_sum_{k}": float(v) for k, v in zip(EVALUATED, sums[1:], strict=True)}
    return {"noisy_customers": float(sums[0]), **named, **answer, "purpose": "evaluation"}


def _private_answer(
    node: NodeData,
    config: RunConfig,
    policy: NodePolicy,
    customers: int,
    values: np.ndarray,
    sigma: float,
    position: RequestPosition | None,
) -> dict:
    """The noisy column ``sums`` of ``values`` (:func:`private_sums`, a Gaussian release of
    sensitivity 1 at noise ``sigma``) with the release's fields, charged to the node's
    accountant before anything leaves it; declined when it would exceed the node's budget,
    refused when it comes after a later round of its run (``position``) or when the node's
    answers would pass its ``max-answer-share`` (:meth:`NodePolicy.answers_refusal`)."""
    privacy = NodePrivacy(node.directory, position)
    delta, _, _, budget = privacy_plan(config, policy, customers)
    with privacy.locked():  # no other release of this node between the check and the charge
        if reason := privacy.order_refusal() or policy.answers_refusal(
            privacy.answers(sigma), delta
        ):
            return {"node": node.name, "refused": True, "reason": reason}
        if reason := over_budget(privacy, delta, budget, (sigma, 1.0, 1)):
            return {"node": node.name, **privacy.declined(delta, reason)}
        sums = private_sums(values, sigma)
        epsilon, index = privacy.charge((sigma, 1.0, 1), delta, answer=True)  # before it leaves
    return {
        "node": node.name,
        "sums": sums,
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "sample_rate": 1.0,
        "steps": 1,
        "max_grad_norm": 1.0,
        "contribution_index": index,
        "accountant": "prv",
        "mechanism": "gaussian",
        "unit": PRIVACY_UNIT,
        "target_epsilon": budget,
        "customers": customers,
    }


def _scorer(node: NodeData, config: RunConfig, state: dict[str, torch.Tensor]) -> ScoreFn:
    """The scores of the model of ``state`` for a batch of customers' histories."""
    model = build_model(node, config, state).eval()

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return model.scores(model.user_states(histories))

    return score


def _held_out_metrics(node: NodeData, score: ScoreFn) -> dict[str, np.ndarray]:
    """Each evaluated customer's metrics on their last event, ranked from the events before
    it: the event the node held out of its training (:func:`training_histories`)."""
    _, ranks = rank_users(score, node.split, "test", users=node.split.test_users)
    return per_customer_metrics(ranks)


def guard_node(
    node: NodeData,
    config: RunConfig,
    state: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    policy: NodePolicy | None = None,
    position: RequestPosition | None = None,
) -> dict:
    """The start guard's comparison (``dp-guard``, server/federation/guard.py): the sum over
    the node's customers of NDCG@10 of the private rounds' model (``state``) less that of its
    public start (``start``), each on the customer's last event, which the node held out of
    its training (:func:`training_histories`), ranked from the events before it; answered
    with Gaussian noise of std ``dp-guard-noise-scale`` x sqrt(the node's declared customers)
    (``RunConfig.guard_noise``; one customer moves the sum by at most 1) and charged to the
    node's accountant as a ``guard`` release. Refused without customer-level DP: the
    comparison is private or not given."""
    policy = policy or NodePolicy()
    customers = public_customers(node, policy)
    if not config.guards_start:
        reason = "the start guard is answered only under DP (dp and dp-guard on, node-dp off)"
        return {"node": node.name, "refused": True, "reason": reason}
    if reason := policy.refusal(config, customers, training=False):
        return {"node": node.name, "refused": True, "reason": reason}
    ndcg = [_held_out_metrics(node, _scorer(node, config, s))["ndcg@10"] for s in (state, start)]
    gain = ndcg[0] - ndcg[1]
    difference = gain[:, None]  # in [-1, 1]: L2 norm <= 1
    sigma = config.guard_noise(customers)
    answer = _private_answer(node, config, policy, customers, difference, sigma, position)
    if "sums" in answer:
        answer["noisy_gain"] = float(answer.pop("sums")[0])
        answer["purpose"] = "guard"
    return answer
