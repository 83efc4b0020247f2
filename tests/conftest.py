"""Shared test fixtures. Keep each one small and fast; name it after what it provides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic marketplace dataset (600 users, 300 items, seed 0), written once."""
    from shared.data.convert import write_dataset
    from shared.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth") / "dataset"
    interactions, items = generate(SynthConfig(users=600, items=300, seed=0))
    return write_dataset(out, interactions, items)


@pytest.fixture(scope="session")
def tiny_synth_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset for end-to-end runs: 160 users on the same 300-item catalog as
    ``synth_dataset_dir`` (seed 0), so its item text is already in the embedding cache."""
    from shared.data.convert import write_dataset
    from shared.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("tiny-synth") / "dataset"
    interactions, items = generate(SynthConfig(users=160, items=300, seed=0))
    return write_dataset(out, interactions, items)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT checkpoint (hidden size 32) with MiniLM's tokenizer,
    built from a ``BertConfig``: a fast stand-in for any local BERT checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from shared.recommender.text import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model_path(), local_files_only=True).save_pretrained(out)
    return out


@pytest.fixture(scope="session", autouse=True)
def one_ray_per_worker():
    """Flower's simulation engine starts Ray for every run and shuts it down after it, about
    20 s on 2 cores each time; the suite's in-process runs share one Ray per test worker
    instead. The first run starts it with its own settings (simulations/simulate.py:
    backend_config; those of the suite's runs are all alike), later runs find it running
    (Flower's RayBackend.init_ray), and it stops when the worker's session ends. Every run
    still creates and terminates its own node actors."""
    import ray

    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None  # Flower's RayBackend.terminate calls it
    yield
    ray.shutdown = shutdown
    shutdown()


# The files that take longest, longest first (per-file sums of two 2-core runs beside other
# work, 2026-12-07: the first seven 300 to 590 s each with 3 workers, the last ones about 100 s).
# With ``--dist loadfile`` each file runs on one worker, in the order the files are handed out:
# these go first, so that no worker is left with a long file at the end while the others have
# finished (longest processing time first). A file not listed keeps its place after them.
SLOW_FILES = (
    "tests/simulations/test_federation.py",
    "tests/simulations/test_benchmarks.py",
    "tests/server/test_encoder_rounds.py",
    "tests/server/test_ledger_audit.py",
    "tests/client/test_policy.py",
    "tests/simulations/test_deploy_faults.py",
    "tests/server/test_node_dp.py",
    "tests/server/test_robust.py",
    "tests/server/test_unanswered.py",
    "tests/server/test_audit_tampering.py",
    "tests/simulations/test_deploy.py",
    "tests/shared/test_catalog_pretraining.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: xdist's count (a worker per core), but at least 3 (pyproject.toml caps it at
    4): the end-to-end tests wait on processes (the Ray engine's start, Flower's heartbeats and
    polls, a deployment's parties) part of their time, and a third worker on 2 cores runs
    meanwhile. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still sets the count exactly."""
    from xdist.plugin import pytest_xdist_auto_num_workers as per_core

    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own reading of it
    return max(3, per_core(config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest files first (:data:`SLOW_FILES`); xdist keeps this order with
    ``--no-loadscope-reorder`` (pyproject.toml), instead of handing out files by test count."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FILES)))
