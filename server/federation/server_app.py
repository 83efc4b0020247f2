"""Flower ServerApp: coordinates the nodes and aggregates the global recommender.

``flwr run .`` reads the settings from ``[tool.flwr.app.config]`` (overridable with
``--run-config``); ``fedrec simulate`` wraps :func:`main_with` in an app of its own.

With ``catalog`` set (a deployment), the server holds that public catalog and nothing else: the
nodes evaluate the model. Otherwise it runs a simulation: the dataset ``data`` (with none set,
the embedded synthetic marketplace, generated under OUT/data), split into the nodes'
partitions, with the held-out events evaluated at the server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from threadpoolctl import threadpool_limits

from server.federation.progress import ReplyProgress
from server.federation.rounds import run_federation
from shared.data.partition import ensure_partitions
from shared.recommender.experiment import Catalog, Experiment
from shared.runs.config import RunConfig
from shared.runs.durable import private_dir
from shared.runs.outputs import check_rerun

log = logging.getLogger("fedrec.server")


def embedded_dataset(out: Path) -> Path:
    """The default dataset: a small synthetic marketplace, generated once under ``out``."""
    from shared.data.convert import write_dataset
    from shared.data.synth import SynthConfig, generate

    directory = out / "data"
    if not (directory / "items.csv.gz").exists():
        log.info("generating the embedded synthetic marketplace in %s", directory)
        interactions, items = generate(SynthConfig())
        write_dataset(directory, interactions, items, force=True)
    return directory


def main_with(grid: Grid, config: RunConfig, show_progress: bool = False) -> None:
    """Run the federation of ``config`` on ``grid`` (the ServerApp's body, also what
    ``fedrec simulate`` calls)."""
    # one BLAS thread: in Flower's simulation process (Ray running, the app in a thread of its
    # own) OpenBLAS's thread pool was seen spinning for minutes on small numpy matmuls
    with threadpool_limits(1, "blas"):
        _run(grid, config, show_progress)


def _run(grid: Grid, config: RunConfig, show_progress: bool) -> None:
    out = Path(config.out)
    if check_rerun(out, config.to_dict()):  # flwr run . again over a finished OUT
        log.warning("nothing to do: run complete (%s); set out to a new directory", out)
        return
    if config.catalog:  # a deployment: the operator holds the public catalog, nothing else
        catalog = Catalog.load(config.catalog, config, show_progress=show_progress)
        run_federation(grid, config, out, catalog, show_progress=show_progress)
        log.info("outputs in %s", out)
        return
    experiment, partitions = prepare_simulation(grid, config, show_progress)
    metrics = run_federation(
        grid, config, out, experiment.catalog(), experiment, partitions, show_progress
    )
    if not show_progress:  # the terminal has had the round lines and gets the verdict
        log.info("test ndcg@10 %.4f; outputs in %s", metrics["test"]["ndcg@10"], out)


def prepare_simulation(
    grid: Grid, config: RunConfig, show_progress: bool
) -> tuple[Experiment, Path]:
    """A simulation's server side also plays its harness: the dataset (the embedded default if
    none is set), its split, whose held-out events it evaluates on, and the nodes' partitions
    (written once; canaries and attacks are ``fedrec simulate``'s, see simulations/)."""
    out = Path(config.out)
    data = Path(config.data) if config.data else embedded_dataset(out)
    # the encoder is tuned by the nodes (server/federation/encoder_rounds.py), never here
    experiment = Experiment.prepare(data, config, show_progress=show_progress, tune_text=False)
    private_dir(out)
    return experiment, ensure_partitions(experiment.dataset, experiment.split, config, out)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: settings from the run config."""
    config = RunConfig.from_flat(dict(context.run_config))
    if config.malicious_nodes or config.attack != "none" or config.canaries:
        raise ValueError(
            "malicious-nodes, attack and canaries are for fedrec simulate and fedrec bench "
            "robust only: a deployment's nodes are what they are"
        )
    out = Path(config.out)
    # a simulation's partitions follow the federation's size (Flower's num-supernodes) once,
    # when first written: a node down at a restart must not change the run's settings (the
    # checkpoint would no longer match them)
    if not config.catalog and not (out / "partitions").exists():
        nodes = gathered_nodes(grid, config.clients)
        if nodes != config.clients:
            log.info("the federation has %d nodes: using %d partitions", nodes, nodes)
            config = replace(config, clients=nodes)  # checked again: min-nodes may be above
    main_with(ReplyProgress(grid, show_progress=True), config, show_progress=True)


def gathered_nodes(
    grid: Grid, expected: int, settle_s: float = 5.0, timeout_s: float = 300.0
) -> int:
    """How many nodes are connected once they have gathered: as soon as ``expected`` are, or
    once a count of at least one has held for ``settle_s`` seconds. Nodes register one by one,
    in a simulation too (its engine starts beside the ServerApp): a count taken at once can
    miss some. Raises :class:`TimeoutError` after ``timeout_s`` with none connected, or, with
    ``settle_s`` infinite, with fewer than ``expected``."""
    start = changed = time.monotonic()
    count = -1
    while True:
        now, connected = time.monotonic(), len(list(grid.get_node_ids()))
        if connected != count:
            count, changed = connected, now
        if count >= expected or (count and now - changed >= settle_s):
            return count
        if now - start >= timeout_s:
            raise TimeoutError(
                f"{count} of the federation's {expected} nodes connected within {timeout_s:g} s"
            )
        time.sleep(0.1)
