"""Fixtures of the node's tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from shared.data.convert import write_dataset
from shared.data.dataset import load_dataset
from shared.data.partition import write_partitions


@pytest.fixture(scope="module")
def node_dir(tiny_synth_dataset_dir: Path, tmp_path_factory) -> Path:
    """A node's partition whose customer ids are long and distinctive, so that any copy of one
    in a message would be found."""
    source = load_dataset(tiny_synth_dataset_dir)
    interactions = pd.read_csv(source.report.interactions_file, dtype=str)
    interactions["user_id"] = "customer-" + interactions["user_id"] + "-private"
    items = pd.read_csv(next(tiny_synth_dataset_dir.glob("items.*")), dtype=str)
    data = write_dataset(tmp_path_factory.mktemp("wire") / "data", interactions, items)
    return write_partitions(load_dataset(data), tmp_path_factory.mktemp("parts"), 2)[0]
