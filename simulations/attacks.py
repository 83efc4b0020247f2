"""Malicious nodes, for measuring robust aggregation (simulation only).

With ``malicious-nodes`` M > 0, the replies of nodes ``<partition>-0`` .. ``<partition>-(M-1)``
are replaced, on their way to the strategy, by an attack on the update they carry (its delta
from the global weights, item tables as the row-sparse rows the node sent):

- ``scale``: the delta times ``attack-scale`` (a boosted update, e.g. model replacement);
- ``sign-flip``: the delta times ``-attack-scale`` (pushes the model the wrong way);
- ``random``: Gaussian noise with ``attack-scale`` times the delta's norm.

The attack stays well-formed (shapes, dtypes, finite values), so it is the aggregation, not the
update validation, that has to resist it. It wraps the Grid of ``fedrec simulate`` and
``fedrec bench robust`` only; a deployment (``flwr run``) refuses the setting.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from shared.federation.wire import ITEM_TABLES, ROWS
from shared.runs.config import RunConfig

ATTACKS = ("none", "scale", "sign-flip", "random")


def check_attack(config: RunConfig) -> None:
    """Refuse an unknown attack or an impossible number of malicious nodes."""
    if config.attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {config.attack!r}")
    if not 0 <= config.malicious_nodes < max(config.clients, 1):
        raise ValueError(
            f"malicious-nodes must be in [0, clients), got {config.malicious_nodes} "
            f"with {config.clients} clients"
        )
    if (config.malicious_nodes > 0) != (config.attack != "none"):
        raise ValueError("set malicious-nodes > 0 and an attack together (or neither)")
    if config.malicious_nodes and config.secagg:
        raise ValueError(
            "malicious-nodes needs secagg=false: attacks are simulated by replacing plain "
            "replies, and under SecAgg+ there are none to replace"
        )


def attack_update(
    arrays: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    attack: str,
    scale: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The attacked version of a node's reply ``arrays`` against the global ``reference``."""
    bases, deltas = {}, {}
    for name, array in arrays.items():
        if name.endswith(ROWS):
            continue
        base = reference[name].astype(np.float32)
        if name + ROWS in arrays:
            base = base[np.asarray(arrays[name + ROWS]) + ITEM_TABLES[name]]
        bases[name], deltas[name] = base, array.astype(np.float32) - base
    if attack == "random":
        norm = np.sqrt(sum(float((d**2).sum()) for d in deltas.values()))
        noise = {k: rng.standard_normal(d.shape).astype(np.float32) for k, d in deltas.items()}
        noise_norm = np.sqrt(sum(float((z**2).sum()) for z in noise.values())) or 1.0
        deltas = {k: z * (scale * norm / noise_norm) for k, z in noise.items()}
    else:
        factor = scale if attack == "scale" else -scale
        deltas = {k: d * factor for k, d in deltas.items()}
    return {
        **arrays,
        **{k: (bases[k] + d).astype(arrays[k].dtype) for k, d in deltas.items()},
    }


def is_malicious(node: str, count: int) -> bool:
    """Whether the node named ``<partition>-<k>`` is one of the first ``count``."""
    index = node.rsplit("-", 1)[-1]
    return index.isdigit() and int(index) < count


class AttackGrid:
    """A Grid whose malicious nodes' training replies carry an attack instead of their update."""

    def __init__(self, grid: Grid, config: RunConfig):
        check_attack(config)
        self.grid, self.config = grid, config
        self.rng = np.random.default_rng(config.seed)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The real Grid's replies, the malicious nodes' training updates attacked."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if not messages or "arrays" not in messages[0].content:
            return replies
        reference = {k: a.numpy() for k, a in messages[0].content["arrays"].items()}
        for reply in replies:
            content = reply.content if not reply.has_error() else None
            if content is None or "arrays" not in content or "privacy" not in content:
                continue
            if is_malicious(str(content["privacy"]["node"]), self.config.malicious_nodes):
                arrays = {k: a.numpy() for k, a in content["arrays"].items()}
                attacked = attack_update(
                    arrays, reference, self.config.attack, self.config.attack_scale, self.rng
                )
                content["arrays"] = ArrayRecord({k: Array(v) for k, v in attacked.items()})
        return replies
