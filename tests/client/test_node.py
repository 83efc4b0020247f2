"""A node's local work (client/node.py)."""

from __future__ import annotations

from client.node import local_epochs
from shared.runs.config import RunConfig


def test_a_small_node_trains_enough_epochs_for_local_steps() -> None:
    config = RunConfig(local_epochs=1, local_steps=50, local_batch_size=32)
    assert local_epochs(200, config) == 8  # 7 steps an epoch
    assert local_epochs(3_000, config) == 1  # 94 steps an epoch: local-epochs rules
    assert local_epochs(0, config) == 50  # an empty node: one (empty) step an epoch
    assert local_epochs(200, RunConfig(local_epochs=2, local_steps=0)) == 2
