"""The federation strategy: Flower's FedAvg node sampling, with fedrec's own aggregation.

Flower's built-in strategies average whole arrays; fedrec's item tables travel row-sparse and
must be averaged row by row over the nodes that sent each row (server/federation/aggregation.py), so
``aggregate_train`` is replaced. Every reply is validated (shape, dtype, finite, norm) and a
reply that fails is logged with its node and left out; what an accepted one can move is bounded
(``row-clip``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

from server.federation.aggregation import (
    NodeUpdate,
    ServerOptimizer,
    aggregate,
    bound_shifts,
    cap_weights,
    clip_updates,
    weight_bound,
)
from server.federation.denoising import CumulativeDenoiser, denoises
from server.federation.guard import ANSWER_SPREAD
from server.federation.registry import Registry
from server.federation.validation import Answers, node_validation, validation_mean
from shared.federation.wire import COUNTS, ITEM_TABLES, decode, load_arrays, load_counts
from shared.recommender.metrics import EVALUATED
from shared.runs.config import RunConfig

log = logging.getLogger("fedrec.server")

# the most customers one reply may speak for where no registry declares its node's figure: far
# above any shop, and small enough that sums of weights and counts stay exact in float64
MAX_CUSTOMERS = 1e9

STRATEGIES = {  # name -> (aggregation, server optimiser)
    "fedavg": ("mean", "sgd"),
    "fedprox": ("mean", "sgd"),
    "fedadam": ("mean", "adam"),
    "median": ("median", "sgd"),
    "trimmed": ("trimmed", "sgd"),
}


class FedRecStrategy(FedAvg):
    """FedAvg's sampling and evaluation averaging; row-aware robust aggregation."""

    def __init__(
        self, config: RunConfig, node_budget: float | None = None, max_update_norm: float = 1e4
    ):
        if config.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be one of {sorted(STRATEGIES)}, got {config.strategy!r}"
            )
        super().__init__(
            fraction_train=config.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=config.min_nodes,
            min_evaluate_nodes=config.min_nodes,
            min_available_nodes=config.min_nodes,
        )
        self.config = config
        self.method, kind = STRATEGIES[config.strategy]
        self.trim, self.row_clip = config.trim_fraction, config.row_clip
        self.shift_clip = config.shift_clip
        self.optimizer = ServerOptimizer(kind, config.server_lr)
        self.max_update_norm = max_update_norm
        self.dense = config.node_dp  # node-level DP: the set of rows sent would itself leak
        # customer-level DP: the nodes' evaluation answers are noisy sums
        self.private, self.eval_noise = config.dp, config.eval_noise_multiplier
        self.denoiser = CumulativeDenoiser() if denoises(config, node_budget) else None
        self.registry: Registry | None = None  # set by the round loop in a deployment
        # the share of each node's customers that validate (client/node.py: chosen by hash)
        self.valid_fraction = 1.0  # set by the round loop in a deployment

    @property
    def server_state(self) -> dict[str, torch.Tensor]:
        """What the server carries from round to round besides the weights, checkpointed with
        them: the server optimiser's moments and the denoiser's sums."""
        denoised = {} if self.denoiser is None else self.denoiser.state
        return self.optimizer.state | {f"denoise/{k}": v for k, v in denoised.items()}

    @server_state.setter
    def server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.optimizer.state = {k: v for k, v in state.items() if not k.startswith("denoise/")}
        if self.denoiser is not None:
            self.denoiser.state = {
                k.removeprefix("denoise/"): v for k, v in state.items() if k.startswith("denoise/")
            }

    def sender(self, reply: Message) -> str:
        """The node a reply comes from: its registered name (by Flower's authenticated node
        id) when there is a registry, else the name in its report, else the node id."""
        return self.node_name(reply.metadata.src_node_id, reply_sender(reply))

    def node_name(self, node_id: int, claimed: str) -> str:
        """Flower node ``node_id``'s registered name, else the name it ``claimed``."""
        registered = None if self.registry is None else self.registry.lookup(node_id)
        return claimed if registered is None else registered.name

    def identity_problem(self, reply: Message) -> str | None:
        """Why a reply must not be used for who it is (None: nothing): with a registry, an
        unregistered node id, or a report that speaks for another node."""
        return self.node_problem(reply.metadata.src_node_id, _report_name(reply))

    def node_problem(self, node_id: int, claimed: str | None) -> str | None:
        """:meth:`identity_problem` of what Flower node ``node_id`` sent, its report naming
        ``claimed`` (None: no name)."""
        if self.registry is None:
            return None
        registered = self.registry.lookup(node_id)
        if registered is None:
            return f"Flower node {node_id} is not in the registry"
        if claimed is not None and claimed != registered.name:  # named as registered, or not
            return f"its report speaks for {claimed!r}, registered as {registered.name!r}"
        return None

    def node_updates(
        self, replies: Iterable[Message], global_state: dict[str, torch.Tensor]
    ) -> tuple[list[NodeUpdate], list[str]]:
        """Decode and validate the replies that carry weights; returns updates and rejections."""
        updates, rejected = [], []
        for reply in replies:
            if reply.has_error() or "arrays" not in reply.content:
                continue
            node = self.sender(reply)
            try:
                if problem := self.identity_problem(reply):
                    raise ValueError(problem)
                arrays = load_arrays(reply.content["arrays"], global_state)
                weight = _weight(reply)
                tensors, rows = decode(arrays, global_state)
                if self.dense and rows:
                    raise ValueError("a row-sparse update under node-dp (it must be dense)")
                if self.registry is not None:
                    weight = self._check_registered(reply, rows, weight, global_state)
                norm = _update_norm(tensors, rows, global_state)
                if norm > self.max_update_norm:
                    raise ValueError(f"update norm {norm:.3g} exceeds {self.max_update_norm:g}")
                counts = self._counts(reply, weight, global_state)
            except ValueError as error:
                log.warning("rejected the update of node %s: %s", node, error)
                rejected.append(f"{node}: {error}")
                continue
            updates.append(NodeUpdate(node, weight, tensors, rows, counts))
        claimed = cap_weights(updates, self.row_clip)
        for update in (u for u in updates if u.node in claimed):
            log.warning(
                "node %s weighs %g customers in the mean, not the %g it states (row-clip x the "
                "round's median)",
                update.node,
                update.weight,
                claimed[update.node],
            )
        return updates, rejected

    def _counts(
        self, reply: Message, customers: float, global_state: dict[str, torch.Tensor]
    ) -> np.ndarray | None:
        """The item counts ``reply`` carries (:func:`load_counts`: at most its ``customers``
        each), where the run adds the popularity prior to the item biases (None: elsewhere,
        an exchange without them, or none sent)."""
        biases = global_state.get("id_scores.bias")
        if not self.config.counts_popularity or biases is None or COUNTS not in reply.content:
            return None
        return load_counts(reply.content[COUNTS], biases.shape[0], customers)

    def _check_registered(
        self,
        reply: Message,
        rows: dict[str, np.ndarray],
        weight: float,
        global_state: dict[str, torch.Tensor],
    ) -> float:
        """Rows only of the products the node is registered to sell (of the item tables the
        exchange carries: the encoder rounds carry none), and a weight no larger than its
        registered customers; returns the weight to use."""
        registered = self.registry.lookup(reply.metadata.src_node_id)
        if registered.rows is not None and not self.dense:
            for name in (n for n in ITEM_TABLES if n in global_state):
                if name in rows:
                    outside = np.setdiff1d(rows[name], registered.rows)
                    if len(outside):
                        raise ValueError(
                            f"{name}: rows of {len(outside)} product(s) it does not sell"
                        )
                else:
                    raise ValueError(f"{name}: a whole item table from a node that sells part")
        return min(weight, float(registered.customers))

    def apply(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[NodeUpdate],
        bias_noise: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The new global weights from the accepted updates, each first bounded by
        ``row-clip`` (:func:`clip_updates`), and per node how many rows and tensors the bound
        scaled down; under DP each trained matrix and the item biases are moved to their denoised
        sum of the private rounds (``dp-denoise``, :class:`CumulativeDenoiser`; ``bias_noise``:
        the variance the nodes' noise added to each item bias, :func:`injected_bias_variance`)."""
        clipped = clip_updates(global_state, updates, self.row_clip)
        for node, name, shift, bound in bound_shifts(global_state, updates, self.shift_clip):
            log.warning(
                "node %s shifted its %s rows together by %.3g, held to %.3g (shift-clip x the "
                "round's median node)",
                node,
                name,
                shift,
                bound,
            )
        delta = aggregate(global_state, updates, self.method, self.trim)
        if self.denoiser is not None:
            delta, shrunk = self.denoiser(global_state, delta, bias_noise)
            log.info(
                "the private rounds' summed update denoised: %s",
                ", ".join(
                    f"{name} kept {kept} of {min(delta[name].shape)} "
                    + ("directions" if delta[name].ndim == 2 else "products")
                    for name, kept in shrunk.items()
                ),
            )
        return self.optimizer.step(global_state, delta), clipped

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> dict[str, float | int | bool] | None:
        """The nodes' evaluation of the global model over all their customers: exact means
        weighted by customers, or, under DP (the run's setting, never the reply's say), the sum
        of the nodes' noisy sums over the sum of their noisy counts; each reply speaks for at
        most its declared customers (:meth:`declared_customers`; under DP plus
        :data:`ANSWER_SPREAD` of its noise's stds). A reply that is not a well-formed
        evaluation is left out. Without DP ``valid`` is the customer-weighted mean of the
        nodes' validation answers (:meth:`validation`), reported; the round is chosen on
        their robust summary (server/federation/validation.py)."""
        replies = [r for r in replies if not r.has_error() and self.identity_problem(r) is None]
        private = self.private
        count_key = "noisy_customers" if private else "customers"
        keys = [count_key, *(f"noisy_sum_{k}" if private else k for k in EVALUATED)]
        # each noisy column's std: the noise multiplier, scaled back by sqrt(columns)
        spread = ANSWER_SPREAD * self.eval_noise * math.sqrt(len(keys))
        answers = []
        for reply in replies:
            if "metrics" not in reply.content:
                continue
            values = [reply.content["metrics"].get(k) for k in keys]
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                log.warning("round %d: an evaluation reply without %s", server_round, keys)
                continue
            count, *rest = (float(v) for v in values)
            limit = self.declared_customers(reply)
            if private:
                in_range = all(abs(v) <= limit + spread for v in (count, *rest))
            else:
                in_range = count >= 0 and all(0 <= v <= 1 for v in rest)
            if not in_range:
                log.warning("round %d: an evaluation reply out of range", server_round)
                continue
            answers.append((count if private else min(count, limit), rest))
        # exact answers are means: each weighs at most row-clip x the median node's customers
        bound = math.inf if private else weight_bound([c for c, _ in answers], self.row_clip)
        customers, sums = 0.0, dict.fromkeys(EVALUATED, 0.0)
        for count, rest in answers:
            count = min(count, bound)
            customers += count
            for name, value in zip(EVALUATED, rest, strict=True):
                sums[name] += value if private else value * count
        nodes = len(answers)
        if customers <= 0:
            return None
        means = {k: min(1.0, max(0.0, v / customers)) for k, v in sums.items()}
        summary = {"round": server_round, "nodes": nodes, "customers": round(customers)}
        valid = validation_mean(self.validation(server_round, replies))
        return {**summary, "dp": private, **means, **({"valid": valid} if valid else {})}

    def validation(self, server_round: int, replies: Iterable[Message]) -> Answers:
        """Each node's exact validation answer, which chooses the rounds where the nodes
        validate (:func:`node_validation`: at most :meth:`validation_customers` and
        ``row-clip`` times the median node's; one node cannot outvote the others on which round
        is kept); none under DP."""
        if self.private:
            return {}
        replies = [r for r in replies if not r.has_error() and self.identity_problem(r) is None]
        return node_validation(
            server_round, replies, self.sender, self.validation_customers, self.row_clip
        )

    def validation_customers(self, reply: Message) -> float:
        """The most validation customers a reply may speak for: what the server expects of its
        node, its declared customers (:meth:`declared_customers`) times ``valid_fraction``, so
        a node claiming its whole registered figure weighs what an honest node of its size
        answers for (an honest node's luck of the draw above that weighs no more either)."""
        return self.declared_customers(reply) * self.valid_fraction

    def declared_customers(self, reply: Message) -> float:
        """The most customers a reply may speak for: its registered node's declared figure
        (a node cannot outweigh the others by claiming more), else :data:`MAX_CUSTOMERS`."""
        registered = (
            None if self.registry is None else self.registry.lookup(reply.metadata.src_node_id)
        )
        return MAX_CUSTOMERS if registered is None else float(registered.customers)


def reply_sender(reply: Message) -> str:
    """The node a reply speaks for: its report's name, else Flower's node id."""
    name = _report_name(reply)
    return str(reply.metadata.src_node_id) if name is None else name


def _report_name(reply: Message) -> str | None:
    """The node its privacy report names (None: no report, or no name in it)."""
    if not reply.has_error() and reply.has_content() and "privacy" in reply.content:
        name = reply.content["privacy"].get("node")
        if isinstance(name, str):
            return name
    return None


def _weight(reply: Message) -> float:
    """The node's weight in the mean: its stated customers, which must be a finite number
    >= 0 (no node has fewer than none)."""
    metrics = reply.content.get("metrics", {})
    value = metrics.get("num-examples")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"num-examples must be a finite number >= 0, got {value!r}"[:200])
    return min(max(float(value), 1.0), MAX_CUSTOMERS)


def _update_norm(
    tensors: dict[str, torch.Tensor],
    rows: dict[str, np.ndarray],
    global_state: dict[str, torch.Tensor],
) -> float:
    total = 0.0
    for name, value in tensors.items():
        reference = global_state[name]
        if name in rows:
            reference = reference[torch.as_tensor(rows[name] + ITEM_TABLES[name])]
        total += float(((value - reference.float()) ** 2).sum())
    return total**0.5
