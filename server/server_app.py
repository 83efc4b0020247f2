"""Flower ServerApp: coordinates the nodes and aggregates the global recommender.

``flwr run .`` reads the settings from ``[tool.flwr.app.config]`` (overridable with
``--run-config``); ``fedrec simulate`` builds the same app with :func:`make_server_app`.
With no dataset configured, the embedded synthetic marketplace is generated under OUT/data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from threadpoolctl import threadpool_limits

from server.federation import run_federation
from shared.config import RunConfig
from shared.runs import check_rerun

log = logging.getLogger("fedrec.server")


def embedded_dataset(out: Path) -> Path:
    """The default dataset: a small synthetic marketplace, generated once under ``out``."""
    from shared.convert import write_dataset
    from simulations.synth import SynthConfig, generate

    directory = out / "data"
    if not (directory / "items.csv.gz").exists():
        log.info("generating the embedded synthetic marketplace in %s", directory)
        interactions, items = generate(SynthConfig())
        write_dataset(directory, interactions, items, force=True)
    return directory


def main_with(grid: Grid, config: RunConfig, show_progress: bool = False) -> None:
    # one BLAS thread: in Flower's simulation process (Ray running, the app in a thread of its
    # own) OpenBLAS's thread pool was seen spinning for minutes on small numpy matmuls
    with threadpool_limits(1, "blas"):
        _run(grid, config, show_progress)


def _run(grid: Grid, config: RunConfig, show_progress: bool) -> None:
    out = Path(config.out)
    data = Path(config.data) if config.data else embedded_dataset(out)
    nodes = len(list(grid.get_node_ids()))
    # once written, the partitions fix the federation's size: a node down at a restart must
    # not change the run's settings (the checkpoint would no longer match them)
    if nodes and nodes != config.clients and not (out / "partitions").exists():
        log.info("the federation has %d nodes: using %d partitions", nodes, nodes)
        config.clients = nodes
    if check_rerun(out, config.to_dict()):  # flwr run . again over a finished OUT
        log.warning("nothing to do: run complete (%s); set out to a new directory", out)
        return
    metrics = run_federation(grid, config, data, out, show_progress=show_progress)
    log.info("test ndcg@10 %.4f; outputs in %s", metrics["test"]["ndcg@10"], out)


def make_server_app(
    config: RunConfig, show_progress: bool = True, errors: list[BaseException] | None = None
) -> ServerApp:
    """A ServerApp running the federation with an explicit configuration; an exception in it
    is also appended to ``errors`` (the simulation engine only logs it)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if config.malicious_nodes or config.attack != "none":  # robustness measurement
                from simulations.attacks import AttackGrid

                grid = AttackGrid(grid, config)
            main_with(grid, config, show_progress)
        except BaseException as error:
            if errors is not None:
                errors.append(error)
            raise

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: settings from the run config."""
    config = RunConfig.from_flat(dict(context.run_config))
    if config.malicious_nodes or config.attack != "none":
        raise ValueError(
            "malicious-nodes and attack are for simulations only (fedrec simulate, fedrec bench "
            "robust): a deployment's nodes are what they are"
        )
    main_with(grid, config, show_progress=True)
