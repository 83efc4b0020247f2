"""Node-level DP at the server: noise on the sum of clipped node updates, and its accounting.

Each round the server releases

    mean = (sum of the sampled nodes' clipped updates + N(0, (sigma C)^2 I)) / n

over the weights that can learn, with ``C = node-clip-norm`` and ``n`` the number of nodes it
sampled for the round (a fixed denominator: a node that drops out or declines adds a zero update,
so no reply count changes the sensitivity). Adding or removing one node changes the sum by at
most C, so one round is the Gaussian mechanism with noise multiplier sigma. The noise std on the
mean is Flower's ``compute_stdv(sigma, C, n)``; the noise is drawn from
:class:`shared.recommender.secure_random.SecureRandom`, never from a seeded generator.

Accounting is Flower's ``RdpAccountant`` (flwr.serverapp) with no amplification by sampling, as
Flower's accounted DP mode requires: Flower samples a fixed number of nodes, not Poisson. sigma
is calibrated once so that ``dp-rounds`` releases spend at most ``node-target-epsilon`` at
``node-delta``. Every release is written to the ledger as a ``node_level`` entry (cumulative
epsilon, with its unit) before the new global model is used; the accountant is rebuilt from
those entries, so a resumed run starts from everything already released.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.serverapp import GaussianPrivacyEvent, PrivacyConfig, RdpAccountant
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from server.federation.aggregation import NodeUpdate
from server.privacy.ledger import PrivacyLedger
from shared.federation.node_dp import check_node_dp, clipped_update, learning_weights
from shared.recommender.secure_random import SecureRandom
from shared.runs.config import RunConfig
from shared.runs.rounding import up, up_significant

NODE_LEVEL_UNIT = (
    "one node's whole participation: everything any one merchant or region contributes to "
    "the released model, whatever its data"
)
ACCOUNTANT = "rdp (flwr.serverapp.RdpAccountant), no amplification by sampling"


def _accountant(config: RunConfig, population: int) -> RdpAccountant:
    return RdpAccountant(
        PrivacyConfig(
            target_delta=config.node_delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=config.node_target_epsilon,
        )
    )


def calibrate_node_noise(config: RunConfig) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``dp-rounds`` releases stay within
    ``node_target_epsilon`` at ``node_delta`` by Flower's RDP accountant."""
    event = GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=1, population_size=1)

    def exceeds(sigma: float) -> bool:
        trial = GaussianPrivacyEvent(sigma, event.sample_size, event.population_size)
        return _accountant(config, 1).would_exceed(trial, count=config.dp_rounds)

    low, high = 1e-2, 1e4
    if not exceeds(low):
        return low
    while high / low > 1.001:  # bisection in log space; ``high`` always stays within budget
        middle = math.sqrt(low * high)
        low, high = (middle, high) if exceeds(middle) else (low, middle)
    return high


class NodeLevelDP:
    """The server's node-level mechanism and accountant for one run."""

    def __init__(self, config: RunConfig, ledger: PrivacyLedger):
        check_node_dp(config)
        self.config, self.ledger = config, ledger
        self.population = max(config.clients, 1)
        self.sigma = calibrate_node_noise(config)
        self.accountant = _accountant(config, self.population)
        for entry in ledger.entries:  # a resumed run: what was already released
            if entry["kind"] == "node_level":
                self.accountant.compose(self._event(entry["nodes_sampled"]))

    def _event(self, sampled: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(self.sigma, min(sampled, self.population), self.population)

    def refusal(self) -> str | None:
        """Why the next round must not run (its release would pass the budget), or None.
        Without amplification a release costs the same whatever the number of nodes sampled."""
        if not self.accountant.would_exceed(self._event(self.population)):
            return None
        spent = self.accountant.get_epsilon(self.config.node_delta)
        return (
            f"the next round would bring the node-level epsilon past its budget "
            f"{self.config.node_target_epsilon} (spent {spent:.3f})"
        )

    def total(
        self, global_state: dict[str, torch.Tensor], updates: list[NodeUpdate]
    ) -> dict[str, np.ndarray]:
        """The sum of the nodes' dense updates (FedRecStrategy.node_updates refuses sparse ones
        under node-dp), each re-clipped here: the server does not rely on the nodes' clipping."""
        total = {k: np.zeros(tuple(v.shape), dtype=np.float32) for k, v in global_state.items()}
        for update in updates:
            for name, value in clipped_update(update.arrays, global_state, self.config).items():
                total[name] += value
        return total

    def release(
        self, server_round: int, total: dict[str, np.ndarray], sampled: int, aggregated: int
    ) -> dict[str, torch.Tensor]:
        """The noisy mean update; records the release in the ledger before returning it."""
        names = learning_weights(self.config, list(total))
        mean = {k: v / sampled if k in names else np.zeros_like(v) for k, v in total.items()}
        clip = self.config.node_clip_norm
        std = compute_stdv(self.sigma, clip, sampled)  # sigma C / n on the mean
        noise = SecureRandom()
        for name in names:
            weights = torch.from_numpy(mean[name])
            weights += noise.normal(weights.shape, std, dtype=weights.dtype)
        event = self._event(sampled)
        self.accountant.compose(event)
        self.ledger.append(
            "node_level",
            round=server_round,
            mechanism="gaussian",
            noise_multiplier=self.sigma,
            sample_rate=event.sample_size / self.population,
            steps=1,
            clipping_norm=clip,
            delta=self.config.node_delta,
            epsilon=self.accountant.get_epsilon(self.config.node_delta),
            accountant=ACCOUNTANT,
            unit=NODE_LEVEL_UNIT,
            target_epsilon=self.config.node_target_epsilon,
            nodes_sampled=sampled,
            nodes_aggregated=aggregated,
            secure_aggregation=self.config.secagg,
        )
        return {k: torch.from_numpy(v) for k, v in mean.items()}


def node_level_privacy(ledger: PrivacyLedger, config: RunConfig) -> dict:
    """The node-level guarantee for metrics.json, from the ledger's ``node_level`` entries."""
    releases = [e for e in ledger.entries if e["kind"] == "node_level"]
    epsilon = releases[-1]["epsilon"] if releases else 0.0
    where = "the sum of the clipped updates (SecAgg+)" if config.secagg else "each clipped update"
    return {
        "unit": NODE_LEVEL_UNIT,
        "epsilon": epsilon,
        "delta": config.node_delta,
        "target_epsilon": config.node_target_epsilon,
        "accountant": ACCOUNTANT,
        "noise_multiplier": releases[-1]["noise_multiplier"] if releases else None,
        "clipping_norm": config.node_clip_norm,
        "releases": len(releases),
        "secure_aggregation": config.secagg,
        "statement": (
            f"Node level: the released model is ({up(epsilon, 3)}, "
            f"{up_significant(config.node_delta, 3)})-"
            f"differentially private for {NODE_LEVEL_UNIT} ({len(releases)} rounds). The "
            f"server itself sees {where} before the noise."
        ),
    }


def add_node_level(privacy: dict | None, ledger: PrivacyLedger, config: RunConfig) -> dict:
    """metrics.json's privacy block with the node-level guarantee beside the customer-level
    one (each with its own unit; without ``dp`` there is no customer-level one)."""
    node_level = node_level_privacy(ledger, config)
    privacy = (
        dict(privacy)
        if privacy
        else {
            "statement": "No customer-level guarantee (dp is off): a customer's data is protected "
            "only as part of their node's, below."
        }
    )
    privacy["node_level"] = node_level
    privacy["statement"] += " " + node_level["statement"]
    return privacy
