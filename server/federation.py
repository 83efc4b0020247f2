"""The federation's round loop, read top to bottom.

Each round: sample nodes, send them the global weights and the run settings, record every
node's privacy spending in the ledger as its reply arrives (before anything else is done with
it), aggregate the accepted updates, evaluate the global model, and checkpoint. A stopped run
started again with the same OUT resumes after its last completed round.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.ledger import PrivacyLedger
from server.strategy import FedRecStrategy
from shared.config import RunConfig
from shared.experiment import Experiment
from shared.wire import encode, nbytes, trainable_state
from simulations.canaries import audit_canaries, insert_canaries, load_canaries, make_canaries
from simulations.partition import holdout_rows, node_catalog, write_partitions

log = logging.getLogger("fedrec.server")
NODE_UNIT = "one customer's entire history at one node (every event of one customer there)"


class Checkpoint:
    """The global weights, server-optimiser state and per-round history, in one atomic file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def save(self, state: dict, optimizer_state: dict, progress: dict) -> None:
        from safetensors.torch import save_file

        tensors = {f"model/{k}": v.contiguous() for k, v in state.items()}
        tensors |= {f"optimizer/{k}": v.contiguous() for k, v in optimizer_state.items()}
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"progress": json.dumps(progress)})
        os.replace(tmp, self.path)  # a crash leaves the previous round's checkpoint whole

    def load(self) -> tuple[dict, dict, dict] | None:
        from safetensors import safe_open

        if not self.path.exists():
            return None
        with safe_open(str(self.path), "pt") as handle:
            progress = json.loads(handle.metadata()["progress"])
            tensors = {name: handle.get_tensor(name) for name in list(handle.keys())}
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        optimizer = {k[10:]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        return state, optimizer, progress


def settings_record(config: RunConfig, partitions: Path) -> ConfigRecord:
    return ConfigRecord({**config.to_dict(), "partitions-dir": str(partitions.resolve())})


def record_privacy(
    ledger: PrivacyLedger, server_round: int, replies: list[Message], config: RunConfig
) -> list[dict]:
    """Append each node's contribution or refusal to the ledger; returns the contributions."""
    contributions = []
    for reply in replies:
        if reply.has_error() or "privacy" not in reply.content:
            continue
        privacy = dict(reply.content["privacy"])
        node = str(privacy.pop("node"))
        customers = int(reply.content["metrics"]["num-examples"])
        if privacy.pop("declined"):
            ledger.append(
                "declined",
                round=server_round,
                node=node,
                reason=privacy["reason"],
                epsilon=privacy.get("epsilon"),
            )
            log.info("node %s declined round %d: %s", node, server_round, privacy["reason"])
        elif config.dp:
            entry = ledger.append(
                "contribution", round=server_round, node=node, num_customers=customers, **privacy
            )
            contributions.append(entry)
    return contributions


def run_federation(
    grid: Grid, config: RunConfig, data_dir: Path, out: Path, show_progress: bool = True
) -> dict:
    """Run (or resume) the federation and write the CONTRACT §4 outputs to ``out``."""
    if config.text_finetune_layers:
        raise ValueError(
            "text-finetune-layers is for centralized runs (fedrec train) only: in a federation "
            "the encoder would be trained on pooled data; set it to 0"
        )
    out.mkdir(parents=True, exist_ok=True)
    experiment = Experiment.prepare(data_dir, config, show_progress=show_progress)
    if config.dp and not config.delta:  # one delta for the whole federation, below 1/customers
        config.delta = 1.0 / (10 * experiment.dataset.num_users)
    partitions = out / "partitions"
    if not partitions.exists():  # built aside, then renamed: never left half-written
        staging = out / "partitions.partial"
        shutil.rmtree(staging, ignore_errors=True)
        held = holdout_rows(experiment.dataset, experiment.split, config.refit)
        directories = write_partitions(
            experiment.dataset,
            staging,
            config.clients,
            config.partition,
            config.dirichlet_alpha,
            config.seed,
            held,
        )
        if config.canaries:
            items = experiment.dataset.items
            catalogs = [node_catalog(d, items) for d in directories]
            insert_canaries(
                staging,
                make_canaries(items, config.canaries, seed=config.seed, catalogs=catalogs),
                items,
            )
        staging.rename(partitions)
    canaries = load_canaries(partitions) if config.canaries else None
    strategy = FedRecStrategy(config)
    model = experiment.new_model()
    state = trainable_state(model)
    checkpoint = Checkpoint(out / "checkpoint.safetensors")
    history, trained_rows, done = [], np.zeros(experiment.dataset.num_items, dtype=bool), 0
    saved = checkpoint.load()
    if saved is not None:
        state, strategy.optimizer.state, progress = saved
        if progress["config"] != config.to_dict():
            raise SystemExit(f"{out} holds a run with other settings; use another --out")
        history, done = progress["history"], progress["round"]
        trained_rows[progress["trained_rows"]] = True
        log.info("resuming after round %d of %d", done, config.rounds)
    ledger = PrivacyLedger(out / "ledger.jsonl")
    if not ledger.entries:
        ledger.append(
            "run_start", config={**config.to_dict(), "num_nodes": config.clients}, unit=NODE_UNIT
        )
    reason = "all rounds completed"
    monitor = "test" if config.refit else "valid"
    for server_round in range(done + 1, config.rounds + 1):
        started = time.time()
        arrays = encode(state)
        messages = strategy.configure_train(
            server_round,
            ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            settings_record(config, partitions),
            grid,
        )
        replies = list(grid.send_and_receive(messages))
        record_privacy(ledger, server_round, replies, config)
        updates, rejected = strategy.node_updates(replies, state)
        if not updates:
            reason = "no node could train (budgets spent or no valid update)"
            log.warning("round %d: %s", server_round, reason)
            break
        state = strategy.apply(state, updates)
        for update in updates:
            if "id_scores.weight" in update.rows:
                trained_rows[update.rows["id_scores.weight"]] = True
            else:
                trained_rows[:] = True
        model.load_state_dict(state)
        # monitoring only (rounds are fixed, nothing is chosen on it); with refit the nodes
        # train on the validation targets, so the held-out test events are what can show progress
        valid, _ = experiment.evaluate(model, monitor)
        history.append(
            {
                "round": server_round,
                monitor: {k: v for k, v in valid.items() if "@" in k},
                "nodes": len(updates),
                "rejected": rejected,
                "round_s": round(time.time() - started, 1),
                "bytes_down_per_node": nbytes(arrays),
                "bytes_up_per_node": _mean_metric(replies, "bytes-up"),
                "loss": _mean_metric(replies, "loss"),
            }
        )
        checkpoint.save(
            state,
            strategy.optimizer.state,
            {
                "round": server_round,
                "history": history,
                "config": config.to_dict(),
                "trained_rows": np.flatnonzero(trained_rows).tolist(),
            },
        )
        log.info(
            "round %d: %s ndcg@10 %.4f (%s s)",
            server_round,
            monitor,
            valid["ndcg@10"],
            history[-1]["round_s"],
        )
        if show_progress:
            print(
                f"round {server_round}/{config.rounds}: {monitor} ndcg@10 {valid['ndcg@10']:.4f}, "
                f"{len(updates)} nodes, {history[-1]['round_s']} s",
                flush=True,
            )
    ledger.append("run_end", rounds_completed=len(history), reason=reason)
    model.load_state_dict(state)
    timing = {
        "rounds": len(history),
        "round_s": round(float(np.mean([h["round_s"] for h in history])), 1) if history else 0.0,
    }
    privacy = federation_privacy(ledger, config) if config.dp else None
    metrics = experiment.finish(
        out,
        model,
        trained=torch.from_numpy(trained_rows),
        timing=timing,
        privacy=privacy,
        extra={"rounds": history},
        title="fedrec federated global recommender",
    )
    if canaries is not None:  # the released model: after finish() has filled cold items
        audit = audit_canaries(model, canaries, out, delta=config.delta)
        log.info(
            "canary audit: epsilon >= %.3f with 95%% confidence at delta %g",
            audit["epsilon_lower_bound"],
            config.delta,
        )
    plot_rounds(history, monitor, out / "rounds.png")
    return metrics


def _mean_metric(replies: list[Message], key: str) -> float | None:
    values = [
        float(r.content["metrics"][key])
        for r in replies
        if not r.has_error() and key in r.content["metrics"]
    ]
    return float(np.mean(values)) if values else None


def federation_privacy(ledger: PrivacyLedger, config: RunConfig) -> dict:
    """The guarantee per node and for the federation, from the ledger's contributions."""
    from server.accounting import federation_guarantee

    contributions = [e for e in ledger.entries if e["kind"] == "contribution"]
    nodes: dict[str, dict] = {}
    for entry in contributions:
        nodes[entry["node"]] = {
            "epsilon": entry["epsilon"],
            "delta": entry["delta"],
            "contributions": entry["contribution_index"] + 1,
        }
    if not contributions:
        return {"unit": NODE_UNIT, "per_node": {}, "statement": "No node contributed."}
    delta = max(e["delta"] for e in contributions)
    federation = federation_guarantee(contributions, delta, config.partition)
    worst = max(n["epsilon"] for n in nodes.values())
    return {
        "unit": NODE_UNIT,
        "accountant": "prv (opacus), per node",
        "delta": delta,
        "epsilon": worst,
        "target_epsilon": config.target_epsilon,
        "per_node": nodes,
        "federation": federation,
        "statement": (
            f"Every node trained with DP-SGD: at each node, ({worst:.3f}, {delta:.2e})-"
            "differential privacy or better for each customer, covering everything that "
            f"customer did at that node. Federation ({config.partition} partition): see "
            "'federation' for a customer whose data is at several nodes."
        ),
    }


def plot_rounds(history: list[dict], stage: str, path: Path) -> None:
    """Quality of the global model over rounds (PNG)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for metric in ("ndcg@10", "hr@10"):
        ax.plot(rounds, [h[stage][metric] for h in history], marker="o", label=metric)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{stage} split")
    ax.set_title("Global model quality over rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
