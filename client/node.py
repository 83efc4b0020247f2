"""A node's private side: its data, its local training, and its privacy accountant.

The node's data directory never leaves the node. What the node returns is the trained weights
(item tables limited to its own catalog) and aggregate numbers: customers, loss, and its privacy
spending. Its accountant state is written to ``<data dir>/privacy/accountant.json`` (atomically,
fsynced) BEFORE the update is handed back, so no crash can forget spending; it covers every
federation that ever used this data directory.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.config import RunConfig, resolve_device
from shared.data import Split, leave_one_out, load_dataset
from shared.metrics import evaluate
from shared.model import FusionRecommender
from shared.text import embed_items
from shared.training import (
    calibrate_noise,
    new_accountant,
    steps_per_epoch,
    targets_within,
    train_epoch,
    train_private,
    training_tensors,
)
from shared.wire import ITEM_TABLES
from simulations.partition import node_catalog, node_name

PRIVACY_UNIT = "one customer's entire history at this node (every event of one customer)"


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


@functools.lru_cache(maxsize=4)
def load_node(directory: str, text_model: str) -> NodeData:
    """Load (once per process) a node's data directory."""
    dataset = load_dataset(directory)
    text = torch.from_numpy(embed_items(dataset.items, text_model, show_progress=False))
    return NodeData(
        node_name(Path(directory)),
        Path(directory),
        leave_one_out(dataset),
        text,
        node_catalog(Path(directory), dataset.items),
    )


def build_model(
    node: NodeData, config: RunConfig, state: dict[str, torch.Tensor]
) -> FusionRecommender:
    model_config = config.model_config(len(node.text), node.text.shape[1])
    model = FusionRecommender(model_config, node.text)
    model.load_state_dict(state)
    return model.to(resolve_device(config.device))


class CatalogView(torch.nn.Module):
    """The model scoring only the node's own catalog (targets re-indexed into it)."""

    def __init__(self, model: FusionRecommender, catalog: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.as_tensor(catalog), persistent=False)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.model(items)[..., self.columns]


class NodePrivacy:
    """The node's one accountant for all federations on its data, persisted as JSON."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "privacy" / "accountant.json"
        self.state = (
            json.loads(self.path.read_text())
            if self.path.exists()
            else {"accountant": {}, "contributions": 0, "noise_multiplier": None}
        )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump(self.state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def epsilon_after(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        accountant = new_accountant(self.state["accountant"] or None)
        if extra is not None:
            accountant.history.append(extra)
        return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def train_node(
    node: NodeData, config: RunConfig, state: dict[str, torch.Tensor], server_round: int
) -> dict:
    """Local training from the global ``state``; returns weights, rows and numbers to report."""
    device = resolve_device(config.device)
    model = build_model(node, config, state)
    histories = [np.asarray(h) for h in node.split.sequences() if len(h) >= 2]
    inputs, targets = training_tensors(histories, model.config.max_len)
    if node.catalog is not None:
        targets = targets_within(targets, torch.as_tensor(node.catalog), model.config.num_items)
    catalog = node.catalog if node.catalog is not None else np.arange(model.config.num_items)
    report: dict = {"customers": len(inputs), "node": node.name}
    if config.dp:
        report.update(_train_private(node, config, model, inputs, targets, server_round, device))
        if report.get("declined"):
            return report
    else:
        trainee = CatalogView(model, catalog) if node.catalog is not None else None
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
            for _ in range(config.local_epochs)
        ]
        report["loss"] = float(np.mean(losses))
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    report["state"] = trained
    report["rows"] = _rows_to_send(trained, state, catalog, changed_only=not config.dp)
    return report


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


def _train_private(
    node: NodeData,
    config: RunConfig,
    model: FusionRecommender,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    server_round: int,
    device: str,
) -> dict:
    privacy = NodePrivacy(node.directory)
    delta = config.delta or 1.0 / (10 * max(len(inputs), 1))
    steps, sample_rate = steps_per_epoch(len(inputs), config.dp_batch_size)
    round_steps = steps * config.local_epochs
    if privacy.state["noise_multiplier"] is None:  # calibrated once, for the planned rounds
        privacy.state["noise_multiplier"] = calibrate_noise(
            config.target_epsilon, delta, sample_rate, round_steps * config.rounds
        )
    sigma = privacy.state["noise_multiplier"]
    projected = privacy.epsilon_after(delta, (sigma, sample_rate, round_steps))
    if projected > config.target_epsilon:
        return {
            "declined": True,
            "epsilon": privacy.epsilon_after(delta),
            "delta": delta,
            "reason": f"the next contribution would bring epsilon to {projected:.3f}, over "
            f"the budget {config.target_epsilon}",
        }
    view = CatalogView(model, node.catalog) if node.catalog is not None else model
    spent = train_private(
        view,
        inputs,
        targets,
        epochs=config.local_epochs,
        expected_batch=config.dp_batch_size,
        noise_multiplier=sigma,
        max_grad_norm=config.max_grad_norm,
        lr=config.dp_lr,
        delta=delta,
        device=device,
        accountant_state=privacy.state["accountant"] or None,
        trainable=config.dp_train,
    )
    privacy.state["accountant"] = spent.accountant_state
    privacy.state["contributions"] += 1
    privacy.save()  # before anything leaves the node
    return {
        "loss": spent.loss,
        "epsilon": spent.epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps": spent.steps,
        "max_grad_norm": config.max_grad_norm,
        "contribution_index": privacy.state["contributions"] - 1,
        "accountant": "prv",
        "mechanism": "poisson_subsampled_gaussian",
        "unit": PRIVACY_UNIT,
        "target_epsilon": config.target_epsilon,
    }


def evaluate_node(node: NodeData, config: RunConfig, state: dict[str, torch.Tensor]) -> dict:
    """Federated evaluation: the global model on each local customer's last event from the
    earlier ones (events the node also trains on: optimistic; for deployments without a
    server-side holdout)."""
    model = build_model(node, config, state).eval()

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return model.scores(model.user_states(histories))

    users = node.split.test_users
    if not len(users):
        return {"customers": 0}
    metrics, _ = evaluate(score, node.split, "test", users=users)
    return {"customers": len(users), **{k: v for k, v in metrics.items() if "@" in k}}
