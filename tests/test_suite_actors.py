"""The suite's kept node actors (tests/conftest.py: ``node_actors_per_worker``) start each run
as a new process would, but for their imports."""

from __future__ import annotations

import importlib
from pathlib import Path

from conftest import NODE_STORES, fresh_process

from shared.recommender import training
from shared.recommender.text import model_fingerprint


def test_a_kept_actor_starts_its_next_run_with_fedrecs_caches_emptied(tmp_path: Path) -> None:
    """What one run cached in a node's process (a model's fingerprint by its path, an
    accountant's arithmetic) is gone before the actor takes the worker's next run: a checkpoint
    changed in place between two runs is read again, as a new process would."""
    (tmp_path / "weights.bin").write_bytes(b"one")
    before = model_fingerprint(tmp_path)
    training.planned_epsilon(2.0, 1e-5, 0.1, 10)
    assert training._planned_epsilon.cache_info().currsize > 0
    (tmp_path / "weights.bin").write_bytes(b"two")
    assert model_fingerprint(tmp_path) == before  # cached, as in a kept actor's process
    stores = [getattr(importlib.import_module(name), store) for name, store in NODE_STORES]
    for store in stores:
        store["a run's"] = "value"
    assert fresh_process(None) >= 2 + len(stores)
    assert training._planned_epsilon.cache_info().currsize == 0
    assert not any(stores)
    assert model_fingerprint(tmp_path) != before
