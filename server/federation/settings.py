"""What a federation's settings may be, and what the nodes are sent of them.

:func:`check_settings` refuses, before any output, settings a federation cannot run;
:func:`settings_record` is the run's settings as every message carries them.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord

from server.federation.strategy import FedRecStrategy
from shared.data.partition import SCHEMES
from shared.federation.node_dp import check_node_dp
from shared.runs.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, RunConfig


def settings_record(
    config: RunConfig,
    budget: float,
    catalog_digest: str,
    partitions: Path | None,
    valid_fraction: float = 0.0,
    reversed_histories: bool = False,
) -> ConfigRecord:
    """What the nodes are sent each round: the run's settings, with ``budget`` as the epsilon
    per customer each node is asked to keep (server/federation/budget.py, ``node_budget``)
    and ``reverse-histories`` decided for all of them (on or off, never auto), the digest of
    the catalog the global model is indexed by (a node holding another refuses), the share of
    customers whose validation event no node trains on (they choose the rounds) and, in a
    simulation, where the partitions are. The run's id is added once the ledger has started
    (:class:`Federation`)."""
    request = {
        **config.to_dict(),
        "target_epsilon": budget,
        "reverse_histories": "on" if reversed_histories else "off",
    }
    record = {**request, "catalog-digest": catalog_digest, "valid-fraction": valid_fraction}
    if partitions is not None:
        record["partitions-dir"] = str(Path(partitions).resolve())
    return ConfigRecord(record)


def check_settings(config: RunConfig) -> None:
    """Refuse settings a federation cannot run (ValueError saying which), before any output."""
    if config.text_finetune_layers and config.node_dp:
        raise ValueError(
            "text-finetune-layers: encoder rounds under node-level DP are not built; use "
            "customer-level --dp, or set text-finetune-layers=0"
        )
    if config.dp:
        check_answer_noise(config)
    if config.fragment_nodes:
        raise ValueError(
            "fragment-nodes is for centralized runs (fedrec train): a merchant federation's "
            "nodes hold the fragments themselves; set it to 0"
        )
    check_node_dp(config)
    FedRecStrategy(config)  # the strategy's name
    if config.partition not in SCHEMES:
        raise ValueError(f"partition must be one of {SCHEMES}, got {config.partition!r}")
    if config.cold_items and config.federated_eval:
        raise ValueError(
            "cold-items holds products out of the simulated nodes' data and scores them at the "
            "server: it needs the server's evaluation (federated-eval=false)"
        )


def check_answer_noise(config: RunConfig) -> None:
    """Refuse (ValueError) the noise of a private run's answers when no node could give one the
    server accounts (noise multiplier in [``MIN_NOISE_MULTIPLIER``, ``MAX_NOISE_MULTIPLIER``]):
    every node would refuse, before it charges anything. The start guard's noise multiplier at
    a node is ``dp-guard-noise-scale`` x sqrt(its declared customers), at least the scale."""
    low, high = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    if not low <= config.eval_noise_multiplier <= high:
        raise ValueError(
            f"eval-noise-multiplier must be in [{low:g}, {high:g}] under dp (the noise "
            f"multipliers the server accounts, and every node accepts), got "
            f"{config.eval_noise_multiplier:g}"
        )
    if not 0 < config.dp_guard_noise_scale <= high:
        raise ValueError(
            f"dp-guard-noise-scale must be in (0, {high:g}] under dp: a node's start-guard "
            f"noise multiplier is the scale x sqrt(its customers), which the server accounts "
            f"up to {high:g}; got {config.dp_guard_noise_scale:g}"
        )
