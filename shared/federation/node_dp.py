"""Node-level DP, the parts both sides share: which settings combine, and the clipped update.

Under ``node-dp`` the unit of privacy is one node: a node's update (its trained weights minus
the global ones, dense over every weight that can learn) is clipped to L2 norm ``node-clip-norm``
at the node, with Flower's own clipping helper, before it leaves; the server re-clips it (when it
can see it, i.e. without SecAgg+), sums, adds Gaussian noise and divides by the number of nodes
it sampled (server/privacy/node_privacy.py). See docs/privacy.md for what this protects.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from shared.recommender.training import DP_TRAINABLE
from shared.runs.config import RunConfig

# strategies whose aggregate is not the uniform mean the node-level noise is calibrated for
NOT_UNIFORM_MEAN = {
    "median": "a coordinate-wise median",
    "trimmed": "a trimmed mean",
    "fedadam": "Adam steps on the aggregate",
}


def check_node_dp(config: RunConfig) -> None:
    """Raise ValueError, saying why, for a combination node-level DP or SecAgg+ cannot honour."""
    if config.secagg and not config.node_dp:
        raise ValueError(
            "secagg=true needs node-dp=true: SecAgg+ sums quantised vectors in a fixed range, "
            "which the node-level clipping provides, and without node-level noise the sum "
            "it reveals carries no guarantee (docs/privacy.md)"
        )
    if config.secagg and config.clients < 2:
        raise ValueError(
            f"secagg=true needs at least 2 nodes (clients={config.clients}): a sum over one "
            "node is that node's update"
        )
    if not config.node_dp:
        return
    if config.strategy in NOT_UNIFORM_MEAN:
        why = NOT_UNIFORM_MEAN[config.strategy]
        extra = " and with secagg the server never sees single updates" if config.secagg else ""
        raise ValueError(
            f"strategy={config.strategy} is incompatible with node-dp: it aggregates by {why}, "
            "but the node-level noise is calibrated for a uniform mean of clipped updates (as "
            f"Flower's accounted DP mode requires){extra}; use fedavg or fedprox"
        )
    if not config.node_clip_norm > 0:
        raise ValueError(f"node-clip-norm must be > 0, got {config.node_clip_norm}")
    if not 0 < config.node_delta < 1 / config.clients:
        raise ValueError(
            f"node-delta must be in (0, 1/clients = {1 / config.clients:g}), got "
            f"{config.node_delta:g}: at 1/nodes or above, publishing one node's update outright "
            "meets the node-level guarantee"
        )
    if config.wire_dtype != "float32":
        raise ValueError(
            "node-dp needs wire-dtype=float32: rounding the sent weights to float16 would add "
            "an error of the weights' own size to every clipped update"
        )


def learning_weights(config: RunConfig, names: list[str]) -> list[str]:
    """The weights a round can change (public, from the settings); every other weight's update
    is zero by construction, so it is neither sent as non-zero nor noised."""
    if not config.dp:
        return list(names)
    keys = DP_TRAINABLE[config.dp_train]
    return [name for name in names if any(key in name for key in keys)]


def clipped_update(
    trained: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    config: RunConfig,
) -> dict[str, np.ndarray]:
    """The node's update for every weight of ``global_state``: dense float32, zero outside
    :func:`learning_weights`, scaled to L2 norm at most ``node_clip_norm`` (Flower's
    ``clip_inputs_inplace``, the FlatClip of McMahan et al. 2018)."""
    names = learning_weights(config, list(global_state))
    update = {
        name: (trained[name].float() - global_state[name].float()).numpy()
        if name in names
        else np.zeros(tuple(value.shape), dtype=np.float32)
        for name, value in global_state.items()
    }
    arrays = [update[name] for name in names]
    if get_norm(arrays) > 0:  # Flower's helper divides by the norm
        clip_inputs_inplace(arrays, config.node_clip_norm)
    return update
