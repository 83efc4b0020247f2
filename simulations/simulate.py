"""``fedrec simulate``: a federated run on Flower's simulation engine (Ray), the same ServerApp
and ClientApp that ``flwr run .`` uses, with settings from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.policy import parse_node_config
from shared.data.dataset import leave_one_out, load_dataset
from shared.data.partition import ensure_partitions
from shared.federation.node_directory import node_catalog
from shared.recommender.artifacts import load_model, read_text_model
from shared.recommender.experiment import Experiment
from shared.runs.config import RunConfig, resolve_device
from shared.runs.quiet import quiet_third_party, show_worker_output, worker_environment
from simulations.attacks import AttackGrid, check_attack
from simulations.canaries import audit_canaries, insert_canaries, load_canaries, make_canaries
from simulations.interrupt import Handler, interrupted, stop_descendants, stop_signals
from simulations.train import (
    add_run_config_arguments,
    already_done,
    locked,
    run_config_from_args,
)
from simulations.verdict import add_context, print_verdict, run_context

log = logging.getLogger("fedrec.simulate")
RAY_WORKER = b"ray::ClientAppActor"  # the simulated nodes: the title of their Ray workers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset directory (docs/data-and-evaluation.md) (default: the embedded "
        "synthetic marketplace, generated under OUT/data)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/simulate"),
        help="output directory; an interrupted run there resumes, a finished one is not run again",
    )
    parser.add_argument(
        "--clients", type=int, default=None, help=f"number of nodes (default: {RunConfig.clients})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="the most federated rounds: without DP the run stops earlier once validation "
        "stops improving (round-patience) and keeps the best round's model; under DP it sets "
        f"dp-rounds, exactly the rounds run ({RunConfig.dp_rounds} unless given) "
        f"(default: {RunConfig.rounds})",
    )
    parser.add_argument(
        "--partition",
        choices=("regional", "merchant"),
        default=None,
        help="regional: customers split across nodes (by the region their events name when "
        "the data have a region column; --set regions=off ignores it); merchant: each node "
        f"holds the events on its own products (default: {RunConfig.partition})",
    )
    parser.add_argument(
        "--strategy",
        default=None,
        help=f"fedavg, fedprox, fedadam, median or trimmed (default: {RunConfig.strategy})",
    )
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="local epochs per round without DP; under --dp the nodes train "
        f"dp-local-epochs, a --set (default: {RunConfig.local_epochs})",
    )
    parser.add_argument(
        "--dp",
        action="store_true",
        help="DP-SGD at every node (unit: one customer's history at a node)",
    )
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help=f"each node's budget (default: {RunConfig.target_epsilon})",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="DP delta (default: 1/(10 x customers at the node))",
    )
    parser.add_argument(
        "--canaries",
        type=int,
        default=None,
        metavar="M",
        help="empirical privacy audit: M random canary customers, each put "
        "into a random node's data by a fair coin and scored after "
        f"training (OUT/canaries.json, docs/privacy-audit.md) (default: {RunConfig.canaries})",
    )
    add_node_config_argument(parser, deployed=False)
    add_run_config_arguments(parser)


def add_node_config_argument(parser: argparse.ArgumentParser, deployed: bool) -> None:
    """``--node-config``: every node's own privacy policy (client/policy.py)."""
    empty = (
        "a deployed node's policy is require-dp=true max-epsilon=8 min-exact-customers=50 "
        "max-epochs=10 max-rounds=20 max-steps=10000 max-secagg-shares=200 "
        "max-model-weights=500000000 "
        "max-step-activations=500000000 text-models=minilm max-answer-share=0.25 "
        "exclusive-customers=false (true for a node.json split by region: fedrec deploy local "
        "made the split)"
        if deployed
        else "a simulated node accepts any request and vouches its customers are its own "
        "alone in a regional split"
    )
    parser.add_argument(
        "--node-config",
        type=parse_node_config,
        default="",
        metavar='"KEY=VALUE ..."',
        help="each node's own privacy policy, set on the node's side and never by the server: "
        "require-dp (true/false), max-epsilon, max-delta, declared-customers, "
        "min-exact-customers, max-epochs, max-rounds, max-steps, max-secagg-shares, "
        "max-model-weights, "
        "max-step-activations, text-models (comma-separated), max-answer-share, "
        "exclusive-customers (true/false: its customers are its own alone, what a regional "
        "headline needs); a node refuses a request weaker than its policy; "
        f"empty: {empty} (docs/privacy.md)",
    )


@contextlib.contextmanager
def patched_environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` for the duration, restored afterwards (the variables are
    for the engine's workers, not for whatever this process starts later)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def backend_config(clients: int, device: str) -> dict:
    """One CPU per simulated node (each node's torch uses one thread), a GPU share on CUDA."""
    import torch

    cpus = os.cpu_count() or 1
    gpus = 0.0
    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = 1.0 / min(clients, cpus)
    init_args = {
        "num_cpus": cpus,
        "include_dashboard": False,
        "logging_level": logging.ERROR,  # Ray's own start-up messages
        # no workers started ahead for the driver: the nodes' actors run in workers of their
        # own (Flower gives them a runtime environment), so Ray only stopped those as idle a
        # few seconds later, their start a waste of CPU and their exit at times a crash report
        "_system_config": {"prestart_worker_first_driver": False},
    }
    store = object_store_bytes()
    if store is not None:
        init_args["object_store_memory"] = store
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": init_args}


def object_store_bytes() -> int | None:
    """Ray's object store under a virtual-memory limit (``ulimit -v``): a quarter of it, as
    every Ray process maps the whole store beside its own memory (Ray's default, 30% of the
    machine's memory, ended the run in Ray's "mmap failed" abort); None (Ray's default)
    without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft // 4


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's settings: defaults, then ``--set`` overrides, then the named options
    (``--rounds`` sets ``dp-rounds`` when the run is private)."""
    config = run_config_from_args(
        args,
        data=str(args.data) if args.data else None,
        out=str(args.out),
        clients=args.clients,
        partition=args.partition,
        strategy=args.strategy,
        local_epochs=args.local_epochs,
        dp=args.dp or None,
        target_epsilon=args.target_epsilon,
        delta=args.delta,
        canaries=args.canaries,
    )
    return config.with_rounds(args.rounds)


def run(args: argparse.Namespace) -> int:
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.federation.resume import require_ledger
    from server.federation.settings import check_settings

    config = config_from_args(args)
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"fedrec: {args.data}: not a dataset directory")
    try:  # before Flower starts and anything is written
        check_settings(config)
        check_attack(config)
    except ValueError as error:
        raise SystemExit(f"fedrec: {error}") from None
    if already_done(args.out, config):
        return 0
    require_ledger(args.out)  # a checkpoint to resume, whose ledger was removed or cut
    logging.basicConfig(  # fedrec's own progress lines read like the printed ones
        level=logging.INFO if not args.quiet else logging.WARNING, format="%(message)s"
    )
    logging.getLogger("flwr").setLevel(logging.WARNING)
    quiet_third_party()
    if not args.quiet:
        print(
            f"starting the simulation engine (Ray) with {config.clients} nodes; "
            "data, embeddings and partitions are prepared next",
            flush=True,
        )
    # run_simulation is marked deprecated in flwr 1.42 in favour of `flwr run`, which needs a
    # SuperLink process and reads settings only from pyproject/--run-config; it is the only
    # in-process engine that takes an explicit ServerApp and ClientApp, which this command needs.
    errors: list[BaseException] = []
    stop = threading.Event()  # Ctrl-C or SIGTERM: the run stops at its next exchange
    # the lock: another run on OUT is refused at once; Ray's workers inherit the environment
    with (
        locked(args.out),
        patched_environment(worker_environment()),
        stop_signals(stopping(stop), (signal.SIGINT, signal.SIGTERM)),
    ):
        try:
            # on, whatever an earlier run's ServerApp thread, ending after its engine, left
            show_worker_output(True)
            run_simulation(
                server_app=make_server_app(config, not args.quiet, errors, stop),
                client_app=make_client_app(args.node_config),
                num_supernodes=config.clients,
                backend_config=backend_config(config.clients, config.device),
            )
        except Exception:  # the engine's teardown, its nodes stopped under it
            if not stop.is_set():
                raise
        finally:
            show_worker_output(True)  # off since the ServerApp ended (the engine's teardown)
    if any(isinstance(error, Interrupted) for error in errors):  # not one that had finished
        raise SystemExit(interrupted(args.out, "the federation was stopped"))
    if errors:
        print(f"fedrec: the federation failed: {errors[0]}", file=sys.stderr)
        return 1
    if config.canaries:
        audit_released_model(config)
    print(f"wrote {config.out}/metrics.json, recs.csv, model/, ledger.jsonl, rounds.png")
    print_verdict(add_context(args.out, federation_context(config)), args.out)
    return 0


class Interrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C, SIGTERM): raised in the ServerApp at its next exchange with
    the nodes, so between two ledger writes, never during one. A KeyboardInterrupt, not an
    Exception: no handler of a failed round takes it for one (SecAgg+'s halts the round)."""


class StoppableGrid:
    """A Grid that raises :class:`Interrupted` at any use once ``stop`` is set."""

    def __init__(self, grid: Grid, stop: threading.Event):
        self.grid, self.stop = grid, stop

    def __getattr__(self, name: str):
        if self.stop.is_set():
            raise Interrupted
        return getattr(self.grid, name)


def stopping(stop: threading.Event) -> Handler:
    """The signal handler of a run: the first signal sets ``stop`` (the ServerApp stops at its
    next exchange, the engine's nodes are stopped under it, and the engine's errors as they go
    are not shown); a second one stops at once (KeyboardInterrupt)."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        show_worker_output(False)  # the nodes' workers are stopped next
        logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)
        print("fedrec: stopping the federation...", file=sys.stderr, flush=True)

    return handler


def make_server_app(
    config: RunConfig,
    show_progress: bool = True,
    errors: list[BaseException] | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """The simulation's ServerApp: the federation's own (server/federation/server_app.py), behind
    the simulation's attackers if any, and with its canaries in the partitions first; an
    exception in it is also appended to ``errors`` (the simulation engine only logs it). Once
    ``stop`` is set it ends at its next exchange with the nodes and stops the engine's nodes."""
    from server.federation.progress import ReplyProgress
    from server.federation.server_app import gathered_nodes, main_with

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if stop is not None:
            grid = StoppableGrid(grid, stop)
        try:  # every simulated node is started: wait for all (rounds sample who is there)
            gathered_nodes(grid, config.clients, settle_s=math.inf)
            if config.canaries:
                partitions_with_canaries(config)
            grid = ReplyProgress(grid, show_progress)  # beneath the attackers: sees their replies
            if config.malicious_nodes or config.attack != "none":  # robustness measurement
                grid = AttackGrid(grid, config)
            main_with(grid, config, show_progress)
        except Interrupted as stopped:  # the ledger holds every reply received: stop the nodes
            if errors is not None:
                errors.append(stopped)
            stop_descendants(RAY_WORKER)  # a training in progress ends now: the engine winds down
        except BaseException as error:
            if errors is not None:
                errors.append(error)
            raise
        finally:  # the engine stops the nodes' workers next: what they print then is no news
            show_worker_output(False)

    return server_app


def partitions_with_canaries(config: RunConfig) -> Path:
    """The partitions, canaries inserted before they are in place (empirical privacy audit,
    docs/privacy-audit.md); a resumed run keeps the ones it has."""
    from server.federation.server_app import embedded_dataset

    out = Path(config.out)
    data = Path(config.data) if config.data else embedded_dataset(out)
    dataset = load_dataset(data)

    def insert(staging: Path, directories: list[Path]) -> None:
        catalogs = [node_catalog(d, dataset.items) for d in directories]
        canaries = make_canaries(
            dataset.items, config.canaries, seed=config.seed, catalogs=catalogs
        )
        insert_canaries(staging, canaries, dataset.items)

    return ensure_partitions(dataset, leave_one_out(dataset), config, out, prepare=insert)


def audit_released_model(config: RunConfig) -> dict:
    """Score the canaries on the released model (OUT/canaries.json, for fedrec audit)."""
    out = Path(config.out)
    metrics = json.loads((out / "metrics.json").read_text())
    delta = (metrics.get("privacy") or {}).get("delta", 0.0)
    experiment = Experiment.prepare(
        config.data or (out / "data"), config, show_progress=False, tune_text=False
    )
    text = experiment.catalog().embedded_with(read_text_model(out / "model")).text
    model = load_model(out / "model", text, resolve_device(config.device))
    audit = audit_canaries(model, load_canaries(out / "partitions"), out, delta=delta)
    log.info(
        "canary audit: epsilon >= %.3f with 95%% confidence at delta %g",
        audit["epsilon_lower_bound"],
        delta,
    )
    return audit


def federation_context(config: RunConfig) -> dict:
    """The reference points of :func:`simulations.verdict.run_context` on the federation's
    dataset and split (the server evaluated the model on the same ones)."""
    from server.federation.server_app import embedded_dataset

    data = Path(config.data) if config.data else embedded_dataset(Path(config.out))
    return run_context(Experiment.prepare(data, config, show_progress=False, tune_text=False))
