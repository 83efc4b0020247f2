"""Shared test fixtures. Keep each one small and fast; name it after what it provides."""

from __future__ import annotations

import fcntl
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

# One torch (OpenMP) thread per test process: the suite runs 4 workers on 2 cores
# (pytest_xdist_auto_num_workers), and a thread per core in each of them made them wait on one
# another's spinning threads (tests/shared/test_catalog_pretraining.py: 92 s with 2 threads,
# 22 s with 1, beside other work; a 300 x 384 SVD 5 s against 0.1 s). Set before any test
# imports torch; the workers and the processes the tests start inherit it. The federations'
# nodes already train on one thread each (client/client_app.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

T = TypeVar("T")


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
def one_ray_per_worker(tmp_path_factory: pytest.TempPathFactory):
    """Flower's simulation engine starts Ray for every run and shuts it down after it, about
    20 s on 2 cores each time; the suite's in-process runs share one Ray per test worker
    instead. The first run starts it with its own settings (simulations/simulate.py:
    backend_config; those of the suite's runs are all alike), later runs find it running
    (Flower's RayBackend.init_ray), and it stops when the worker's session ends. A run's node
    actors run one at a time (kept for the next run: :func:`node_actors_per_worker`): Ray is
    given one CPU per worker (the workers already outnumber the cores, so a second actor would
    only add its start and its imports, about 12 s of CPU a private run).

    The workers start their Rays one at a time (:func:`one_at_a_time`): a Ray whose raylet has
    not registered within 30 s fails to start (ray/_private/node.py), and three starting
    together on a busy 2-core machine missed it (the groups of one file start together)."""
    import ray

    shutdown, init = ray.shutdown, ray.init
    ray.shutdown = lambda *args, **kwargs: None  # Flower's RayBackend.terminate calls it
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' base folders share a parent
        lock = tmp_path_factory.getbasetemp().parent / "ray-start.lock"
        ray.init = one_at_a_time(functools.partial(one_cpu, init), lock)
    yield
    ray.shutdown, ray.init = shutdown, init
    shutdown()


@pytest.fixture(scope="session", autouse=True)
def node_actors_per_worker(one_ray_per_worker):
    """Flower's simulation engine creates its node actors (Ray worker processes) for every run
    and terminates them after it: each new one imports torch, Opacus, transformers and Flower
    again, about 5 s of CPU, in every run of the suite. Here the actors a run leaves idle are
    kept for the test worker's next run and handed to it instead of new ones (Flower's
    ``BasicActorPool``), each first made a fresh process but for its imports
    (:func:`fresh_process`: the caches of fedrec's module-level functions emptied, so no run
    sees another's data) and dropped if it no longer answers. Kept actors of other resources
    are terminated first: they would hold the worker's one CPU."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    kept: list[tuple[tuple, object]] = []
    add, terminate = BasicActorPool.add_actors_to_pool, BasicActorPool.terminate_all_actors

    def add_kept(pool: BasicActorPool, num_actors: int) -> None:
        wanted = tuple(sorted(pool.client_resources.items()))
        mine = [actor for key, actor in kept if key == wanted]
        for key, actor in kept:
            if key != wanted:
                actor.terminate.remote()
        kept.clear()
        reused = [actor for actor in mine[:num_actors] if made_fresh(actor)]
        pool.pool.extend(reused)
        pool.num_actors += len(reused)
        add(pool, num_actors - len(reused))

    def keep(pool: BasicActorPool) -> None:
        key = tuple(sorted(pool.client_resources.items()))
        kept.extend((key, actor) for actor in pool.pool)
        pool.pool.clear()

    BasicActorPool.add_actors_to_pool, BasicActorPool.terminate_all_actors = add_kept, keep
    yield
    BasicActorPool.add_actors_to_pool, BasicActorPool.terminate_all_actors = add, terminate


# what a node keeps per process besides functools caches: the encoder's frozen layers, the
# catalog's text embeddings
NODE_STORES = (("client.encoder", "_prefixes"), ("client.node", "_catalog_texts"))


def made_fresh(actor) -> bool:  # noqa: ANN001
    """Whether ``actor`` answered :func:`fresh_process` (False: it is gone, or hangs)."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors lack tests/
    try:
        ray.get(actor.__ray_call__.remote(fresh_process), timeout=60)
    except Exception:  # noqa: BLE001 - dead, hung or unreachable: a new actor replaces it
        return False
    return True


def fresh_process(actor) -> int:  # noqa: ANN001
    """In a kept node actor: empty the ``functools`` cache of each fedrec module-level function
    (a node's data, a model's fingerprint, its accountants' arithmetic) and the node's own
    per-process stores (:data:`NODE_STORES`), as in a new process. Returns how many it
    emptied."""
    emptied = 0
    for name, store in NODE_STORES:
        if name in sys.modules:
            getattr(sys.modules[name], store).clear()
            emptied += 1
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] not in ("client", "server", "shared", "simulations"):
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
                emptied += 1
    return emptied


def one_cpu(start: Callable[..., T], *args, **kwargs) -> T:
    """``ray.init`` with one CPU, whatever the run asked (one node actor at a time)."""
    return start(*args, **{**kwargs, "num_cpus": 1})


def one_at_a_time(start: Callable[..., T], lock: Path) -> Callable[..., T]:
    """``start``, called by one process at a time: the others wait on ``lock``."""

    def alone(*args, **kwargs) -> T:
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
            return start(*args, **kwargs)

    return alone


# The test groups that take longest, longest first (those of tests/simulations measured with
# -n 0 beside other work on 2026-12-07, 80 to 580 s each; the others by the last full run). A
# group is what xdist hands to one worker (``--dist loadscope``, pyproject.toml): a test file's
# module-level tests, or one test class, so that a file's independent federations (a class
# each, with the module fixture its tests share) run on different workers while each fixture is
# still built once (checked: :func:`check_module_fixtures`). ``--dist loadgroup`` and
# ``xdist_group`` marks would not do: xdist 3.8 names a test's group through an attribute
# pytest 9 no longer reads, so every test went to whichever worker was free. These go first,
# so that no worker is left with a long group at the end while the others have finished
# (longest processing time first); a group not listed keeps its place after them.
SLOW_GROUPS = (
    "tests/simulations/test_deploy_faults.py",
    "tests/simulations/test_federation.py::TestPrivateRun",
    "tests/simulations/test_federation.py::TestMerchantRun",
    "tests/simulations/test_interrupt.py",
    "tests/server/test_encoder_rounds.py::TestPrivateEncoderRun",
    "tests/simulations/test_benchmarks.py::TestScale",
    "tests/server/test_node_dp.py::TestSecAggFederation",
    "tests/server/test_node_dp.py::TestPlainFederation",
    "tests/simulations/test_deploy.py",
    "tests/server/test_robust.py",
    "tests/simulations/test_benchmarks.py::TestPrivacyCurves",
    "tests/server/test_node_dp.py::TestSecureRounds",
    "tests/simulations/test_federation.py::TestResumedRun",
    "tests/client/test_policy.py::TestRefusedRun",
    "tests/server/test_ledger_audit.py",
    "tests/server/test_unanswered.py",
    "tests/server/test_audit_tampering.py",
    "tests/simulations/test_benchmarks.py",
    "tests/server/test_encoder_rounds.py",
    "tests/server/test_node_dp.py",
    "tests/client/test_policy.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: xdist's count (a worker per core), but at least 4 (pyproject.toml caps it at
    4): the end-to-end tests wait on processes (the Ray engine's start, Flower's heartbeats and
    polls, a deployment's parties) part of their time, and more workers than cores run
    meanwhile (on 2 cores, 2026-12-07: 16 min 44 s with 3 workers, 14 min 44 s with 4).
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still sets the count exactly."""
    from xdist.plugin import pytest_xdist_auto_num_workers as per_core

    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own reading of it
    return max(4, per_core(config))


def group_of(item: pytest.Item) -> str:
    """The xdist group of a test (``--dist loadscope``): its class, or else its file."""
    return item.parent.nodeid if item.cls else item.nodeid.split("::")[0]


def check_module_fixtures(items: list[pytest.Item]) -> None:
    """A module fixture serves one group: the groups of a file run on different workers, and
    a fixture two of them shared would be built on each (a class-scoped one is built per
    class anyway)."""
    groups: dict[tuple[str, str], str] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)  # a test function's (pytest's own record)
        for name, definitions in (info.name2fixturedefs if info else {}).items():
            if definitions[-1].scope != "module":
                continue
            key, group = (item.nodeid.split("::")[0], name), group_of(item)
            if groups.setdefault(key, group) != group:
                raise pytest.UsageError(
                    f"module fixture {name!r} of {key[0]} serves {groups[key]} and {group}: "
                    "make it serve one test class"
                )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest groups first (:data:`SLOW_GROUPS`); xdist hands the groups out in this
    order with ``--no-loadscope-reorder`` (pyproject.toml), instead of by test count."""
    check_module_fixtures(items)
    rank = {name: i for i, name in enumerate(SLOW_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item), len(SLOW_GROUPS)))
