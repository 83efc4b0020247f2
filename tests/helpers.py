"""What several test files build the same way: the tiny model the end-to-end tests train
(seconds per round on 2 CPU cores) and a node's reply to a training round."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

TINY_SETTINGS = {
    "dim": 16,
    "layers": 1,
    "max_len": 10,
    "dp_dim": 16,
    "dp_max_len": 10,
    "dp_batch_size": 40,
}


def cli_settings(settings: dict) -> list[str]:
    """``--set key=value`` for each setting."""
    return [token for key, value in settings.items() for token in ("--set", f"{key}={value}")]


TINY = [*cli_settings(TINY_SETTINGS), "--device", "cpu", "--quiet"]


def node_reply(
    node: str, arrays: dict[str, np.ndarray] | None, customers: int = 10, declined: bool = False
) -> Message:
    """A node's reply to a training round, as the server receives it: its privacy report, its
    number of customers and, unless None, the ``arrays`` it sends."""
    content = RecordDict(
        {
            "privacy": ConfigRecord({"node": node, "declined": declined}),
            "metrics": MetricRecord({"num-examples": customers}),
        }
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=len(node),
        dst_node_id=0,
        reply_to_message_id="m",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)
