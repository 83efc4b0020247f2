"""Flower ClientApp: a merchant or regional node trains on its own data, returns only weights.

Where the node's data is: ``data-dir`` in the node config (deployment:
``flower-supernode --node-config "data-dir=/path"``), else ``<partitions-dir>/node-<partition-id>``
(simulation, where Flower sets ``partition-id``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import evaluate_node, load_node, train_node
from shared.config import RunConfig
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


def node_directory(msg: Message, context: Context) -> str:
    if "data-dir" in context.node_config:
        return str(context.node_config["data-dir"])
    partitions = msg.content["config"]["partitions-dir"]
    return str(Path(partitions) / f"node-{context.node_config['partition-id']}")


def _setup(msg: Message, context: Context):
    settings = dict(msg.content["config"])
    config = RunConfig.from_flat(
        {k: v for k, v in settings.items() if k not in ("server-round", "partitions-dir")}
    )
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    torch.set_flush_denormal(True)
    node = load_node(node_directory(msg, context), config.text_model)
    state = msg.content["arrays"].to_torch_state_dict()
    return config, node, state, int(settings.get("server-round", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the global weights; reply with weights, metrics and privacy spent."""
    config, node, state, server_round = _setup(msg, context)
    report = train_node(node, config, state, server_round)
    privacy = {k: report[k] for k in PRIVACY_FIELDS if k in report}
    content = RecordDict(
        {
            "privacy": ConfigRecord(
                {"node": node.name, "declined": bool(report.get("declined")), **privacy}
            ),
        }
    )
    metrics = {"num-examples": report["customers"]}
    if not report.get("declined"):
        arrays = encode(report["state"], report["rows"], dtype=config.wire_dtype)
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        metrics["bytes-up"] = nbytes(arrays)
        if not config.dp:  # under DP nothing computed on private data leaves but the weights
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
