"""A node's local work (client/node.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.client_app import valid_fraction
from client.node import load_node, local_epochs
from shared.data.dataset import load_dataset
from shared.data.partition import write_partitions
from shared.recommender.text import embed_items
from shared.runs.config import RunConfig


def test_a_small_node_trains_enough_epochs_for_local_steps() -> None:
    config = RunConfig(local_epochs=1, local_steps=50, local_batch_size=32)
    assert local_epochs(200, config) == 8  # 7 steps an epoch
    assert local_epochs(3_000, config) == 1  # 94 steps an epoch: local-epochs rules
    assert local_epochs(0, config) == 50  # an empty node: one (empty) step an epoch
    assert local_epochs(200, RunConfig(local_epochs=2, local_steps=0)) == 2


def test_by_default_a_small_node_trains_a_few_epochs_a_round_not_many() -> None:
    """The default local work: a node of 400 customers (13 steps an epoch) trains 2 epochs a
    round, not the 4 that overfit small sparse nodes (docs/evaluation.md); a regional Beauty
    node (2,200 customers, 69 steps an epoch) one."""
    assert local_epochs(400, RunConfig()) == 2
    assert local_epochs(2_200, RunConfig()) == 1


def test_a_node_refuses_a_validation_share_that_is_not_a_fraction() -> None:
    """Whatever the server sends as valid-fraction, a node takes a number in [0, 1] or refuses
    (a hostile value is an error reply, never a crash or a silent default)."""
    assert valid_fraction({}) == 0.0 and valid_fraction({"valid-fraction": 0.25}) == 0.25
    for hostile in (1.5, -0.1, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="valid-fraction"):
            valid_fraction({"valid-fraction": hostile})


def test_the_nodes_a_process_hosts_share_one_copy_of_the_catalog_text(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    first, second = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[:2]
    load_node.cache_clear()
    one, two = (load_node(str(d), str(tiny_bert_dir)) for d in (first, second))
    assert one.name != two.name and one.catalog_digest == two.catalog_digest
    assert one.text is two.text  # embedded (or read from the cache) once
    items = load_dataset(first).items
    embedded = embed_items(items, str(tiny_bert_dir), show_progress=False)
    assert torch.equal(one.text, torch.from_numpy(embedded))
