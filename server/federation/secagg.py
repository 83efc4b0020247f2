"""Secure aggregation (SecAgg+) of the node-level DP updates: the server sees only their sum.

In flwr 1.42 SecAgg+ exists only on the legacy path: ``SecAggPlusWorkflow`` driven by a
``LegacyContext`` and a legacy ``flwr.server.strategy``, answered at the nodes by
``secaggplus_mod`` (client/client_app.py). fedrec runs that workflow one round at a time from
its own round loop (server/federation/rounds.py), so the ledger, the checkpoint and resuming work
as in every other run; Flower's ``DefaultWorkflow`` would own the loop instead.

What the nodes send through it is their clipped update (a delta, L2 norm <= C, so every
coordinate is within +-C): the workflow quantises each coordinate over ``clipping_range = C`` with
2**22 levels (stochastic rounding, unbiased, error <= 2C / 2**22 per coordinate and node) and
never clips one. Every node weighs 1 (``max_weight = 1``): the workflow returns the uniform mean
over the nodes that completed the protocol, which is turned back into their sum.

A reply the workflow cannot read (one node's masked vector missing, of another shape, not an
array) raised out of it and ended the run before any of the round's reports reached the
ledger. The round now halts as the protocol does when too few nodes complete it: no sum, no
report, and under customer-level DP every sampled node is ledgered as unanswered (its
spending stated until a later release of the node shows it: server/privacy/ledger_gaps.py).

The server cannot re-clip an update it never sees, and the workflow bounds each coordinate
only (to +-C): a node that skips its clipping added up to C to every coordinate, an update
of norm C x sqrt(weights), hundreds of honest updates in one. No sum of nodes that clip can
be longer than C per node (plus the quantisation's error): a longer one halts the round the
same way (:func:`sum_problem`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.common import parameters_to_ndarrays

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.server import LegacyContext, SimpleClientManager

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.server.compat.grid_client_proxy import GridClientProxy

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.server.strategy import FedAvg as LegacyFedAvg

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.server.workflow import SecAggPlusWorkflow

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from shared.runs.config import RunConfig

QUANTIZATION_LEVELS = 2**22  # the workflow's default quantization_range

log = logging.getLogger("fedrec.server")
# Every node shares its keys with every other (full graph: plain SecAgg security), and any two
# thirds of the shares reconstruct a dropped node's mask (the round survives a third dropping;
# at half or less a node refuses the setup: two disjoint groups could each reach it, which
# lets a server unmask one node's update). The cost grows with shares x threshold: at 100
# sampled nodes each node spends about 5 s a round splitting its secrets (twice: its
# rehearsal, client/client_app.py). A node refuses a setup of more shares than its
# max-secagg-shares (200 by default, client/policy.py): 200 sampled nodes a round.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3  # above half: nodes refuse less (client/client_app.py)
STATE_NAMES = "state-names"  # the weights' names, in the order of the arrays sent


class _Sampler(LegacyFedAvg):
    """FedAvg's node sampling with fedrec's settings; keeps what SecAgg+ hands over."""

    def __init__(self, config: RunConfig, settings: dict):
        nodes = max(2, config.min_nodes)  # SecAgg+ needs two nodes at least
        super().__init__(
            fraction_fit=config.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_available_clients=nodes,
            on_fit_config_fn=lambda server_round: {**self.settings, "server-round": server_round},
        )
        self.settings = settings
        self.sampled: list[int] = []  # the Flower node ids sampled this round
        # told the sampled ids before any request leaves (the server ledgers the request)
        self.on_sample: Callable[[list[int]], None] | None = None
        self.results = []  # (Flower node id, FitRes) of each completed node
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        """FedAvg's sampling; starts the round's bookkeeping afresh."""
        chosen = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = [proxy.node_id for proxy, _ in chosen]
        if self.on_sample is not None:
            self.on_sample(self.sampled)
        self.results, self.mean = [], None
        return chosen

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        """Keeps the completed nodes' results and SecAgg+'s mean; updates no model."""
        self.results = [(proxy.node_id, fit_res) for proxy, fit_res in results]
        if results:  # SecAgg+ has put the same aggregate into every result
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}  # the global model is fedrec's, not the workflow's


class SecureAggregation:
    """Runs one training round through Flower's SecAgg+ workflow."""

    def __init__(self, grid: Grid, config: RunConfig, settings: ConfigRecord):
        self.grid = grid
        self.sampler = _Sampler(config, dict(settings))
        self.proxies: dict[int, GridClientProxy] = {}
        context = Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        )
        self.context = LegacyContext(
            context, strategy=self.sampler, client_manager=SimpleClientManager()
        )
        # round-timeout bounds each of the protocol's four exchanges (0: wait for every reply
        # or for Flower to report the node unavailable, as a plain round does)
        self.clip = config.node_clip_norm
        self.workflow = SecAggPlusWorkflow(
            num_shares=NUM_SHARES,
            reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
            max_weight=1.0,
            clipping_range=config.node_clip_norm,
            quantization_range=QUANTIZATION_LEVELS,
            timeout=config.round_timeout or None,
        )

    def _connected_nodes(self) -> None:
        """Register the nodes connected now (waiting for the minimum a round needs), as
        Flower's DefaultWorkflow does in a thread."""
        while len(ids := set(self.grid.get_node_ids())) < self.sampler.min_available_clients:
            time.sleep(1.0)
        manager = self.context.client_manager
        for node_id in set(self.proxies) - ids:
            manager.unregister(self.proxies.pop(node_id))
        for node_id in ids - set(self.proxies):
            self.proxies[node_id] = GridClientProxy(node_id, self.grid, self.grid.run.run_id)
            manager.register(self.proxies[node_id])

    def train_round(
        self, server_round: int, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, np.ndarray] | None, list[tuple[int, dict]], list[int]]:
        """(sum of the nodes' clipped updates or None if the protocol halted, the nodes' plain
        reports with the Flower node id of each sender, the Flower node ids sampled). A reply
        the workflow cannot read halts the protocol (no sum, no report), never the run."""
        self.sampler.sampled = []  # this round's once the workflow samples (none asked before)
        self._connected_nodes()
        self.sampler.settings[STATE_NAMES] = ",".join(state)
        self.context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
            {name: Array(value.numpy()) for name, value in state.items()}
        )
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round, Key.START_TIME: time.time()}
        )
        try:
            self.workflow(self.grid, self.context)
            total = self._sum(state)
        except Exception:  # a hostile or broken reply: logged, the round halted
            log.exception("round %d: SecAgg+ failed on a reply; the round halts", server_round)
            return None, [], self.sampler.sampled
        completed = len(self.sampler.results)
        if total is not None and (problem := sum_problem(total, completed, self.clip)):
            log.error(
                "round %d: the SecAgg+ sum is refused (%s); the round halts", server_round, problem
            )
            return None, [], self.sampler.sampled
        reports = [(node_id, dict(fit_res.metrics)) for node_id, fit_res in self.sampler.results]
        return total, reports, self.sampler.sampled

    def _sum(self, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray] | None:
        """The completed nodes' summed updates, shaped as ``state`` (SecAgg+'s mean times the
        nodes that completed it); None when the protocol halted."""
        if self.sampler.mean is None:
            return None
        completed = len(self.sampler.results)
        return {
            name: (np.asarray(mean) * completed).astype(np.float32).reshape(value.shape)
            for (name, value), mean in zip(state.items(), self.sampler.mean, strict=True)
        }


def sum_problem(total: dict[str, np.ndarray], nodes: int, clip: float) -> str | None:
    """Why ``total`` cannot be the sum of ``nodes`` updates each clipped to L2 norm ``clip``
    (None: it can be): longer than ``nodes`` x ``clip`` plus the quantisation's error (under a
    level, 2 ``clip`` / :data:`QUANTIZATION_LEVELS`, per coordinate and node), or not finite."""
    squares = sum(float(np.square(value, dtype=np.float64).sum()) for value in total.values())
    size = sum(value.size for value in total.values())
    step = 2 * clip / QUANTIZATION_LEVELS
    bound = nodes * (clip + step * math.sqrt(size)) * (1 + 1e-6)
    norm = math.sqrt(squares)
    if not math.isfinite(norm):
        return "not finite"
    if norm > bound:
        return f"norm {norm:.4g} from {nodes} node(s) clipped to {clip:g}: at most {bound:.4g}"
    return None
