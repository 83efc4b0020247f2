"""Flower ClientApp: a merchant or regional node trains on its own data, returns only weights.

Where the node's data is: ``data-dir`` in the node config (deployment:
``flower-supernode --node-config "data-dir=/path"``), else ``<partitions-dir>/node-<partition-id>``
(simulation, where Flower sets ``partition-id``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.client import NumPyClient

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.node import evaluate_node, load_node, train_node
from shared.config import RunConfig
from shared.node_dp import clipped_update
from shared.wire import encode, nbytes

app = ClientApp()

PRIVACY_FIELDS = (
    "epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "contribution_index",
    "accountant",
    "mechanism",
    "unit",
    "target_epsilon",
    "reason",
)


NOT_SETTINGS = ("server-round", "partitions-dir", "state-names")


def node_directory(settings: dict, context: Context) -> str:
    """This node's data: its ``data-dir`` (deployment) or its partition (simulation)."""
    if "data-dir" in context.node_config:
        return str(context.node_config["data-dir"])
    partitions = settings["partitions-dir"]
    return str(Path(partitions) / f"node-{context.node_config['partition-id']}")


def _load(settings: dict, context: Context):
    """The run's settings, the node's data and the round, from what the server sent."""
    config = RunConfig.from_flat({k: v for k, v in settings.items() if k not in NOT_SETTINGS})
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    torch.set_flush_denormal(True)
    node = load_node(node_directory(settings, context), config.text_model)
    return config, node, int(settings.get("server-round", 0))


def _setup(msg: Message, context: Context):
    config, node, server_round = _load(dict(msg.content["config"]), context)
    return config, node, msg.content["arrays"].to_torch_state_dict(), server_round


def _privacy_report(report: dict) -> dict:
    privacy = {k: report[k] for k in PRIVACY_FIELDS if k in report}
    return {"node": report["node"], "declined": bool(report.get("declined")), **privacy}


class _SecureNode(NumPyClient):
    """A node's side of a SecAgg+ round (server/secagg.py): it sends its clipped update (a
    delta, dense), masked by ``secaggplus_mod``, and its privacy report in plain."""

    def __init__(self, context: Context):
        self.node_context = context

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
        names = str(config["state-names"]).split(",")
        run_config, node, server_round = _load(dict(config), self.node_context)
        state = {name: torch.tensor(value) for name, value in zip(names, parameters, strict=True)}
        report = train_node(node, run_config, state, server_round)
        if report.get("declined"):  # still takes part in the protocol, with a zero update
            update = {name: np.zeros(value.shape, np.float32) for name, value in state.items()}
        else:
            update = clipped_update(report["state"], state, run_config)
        metrics = {**_privacy_report(report), "customers": report["customers"]}
        return [update[name] for name in names], 1, metrics  # every node weighs 1


secure_app = ClientApp(
    client_fn=lambda context: _SecureNode(context).to_client(), mods=[secaggplus_mod]
)


def _secure_rounds(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Hands the messages of a SecAgg+ round to ``secure_app``, every other one on."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secure_app(msg, context)
    return call_next(msg, context)


@app.train(mods=[_secure_rounds])
def train(msg: Message, context: Context) -> Message:
    """Train locally from the global weights; reply with weights, metrics and privacy spent."""
    config, node, state, server_round = _setup(msg, context)
    report = train_node(node, config, state, server_round)
    content = RecordDict({"privacy": ConfigRecord(_privacy_report(report))})
    metrics = {"num-examples": report["customers"]}
    if not report.get("declined"):
        sent, rows = report["state"], report["rows"]
        if config.node_dp:  # dense and clipped: which rows a node sends is private at node level
            update = clipped_update(sent, state, config)
            sent = {k: v.float() + torch.from_numpy(update[k]) for k, v in state.items()}
            rows = None
        arrays = encode(sent, rows, dtype=config.wire_dtype)
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        metrics["bytes-up"] = nbytes(arrays)
        if not (config.dp or config.node_dp):  # under DP only the weights leave the node
            metrics["loss"] = report["loss"]
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on the node's local holdout."""
    config, node, state, _ = _setup(msg, context)
    result = evaluate_node(node, config, state)
    metrics = {"num-examples": result.pop("customers"), **result}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
