"""Who the nodes are: the operator's registry of Flower node ids, names, catalogs and sizes.

A reply's sender is the node id Flower authenticated (SuperNode authentication), never what the
reply says of itself. The registry (``registry`` setting, a JSON file the operator writes when it
registers each merchant's key) maps that id to what the operator knows publicly of the node::

    {"<flower node id>": {"name": "merchant-acme", "catalog": ["p0012", ...] | null,
                          "customers": 2200}}

With it, the server refuses replies from ids it does not know or that speak for another node,
updates to rows of products the node does not sell, and weights above the registered customer
figure. Without one (simulations), a node is known by the name in its report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


class RegistryError(ValueError):
    """A registry file that cannot be used; names the file and the entry."""


@dataclass(frozen=True)
class RegisteredNode:
    """One registered node: its name, the item indices it sells (None: all), its declared
    customers."""

    name: str
    rows: np.ndarray | None
    customers: int


class Registry:
    """The registered nodes by Flower node id."""

    def __init__(self, nodes: dict[int, RegisteredNode]):
        self.nodes = nodes

    @classmethod
    def load(cls, path: str | Path, items: pd.DataFrame) -> Registry:
        """The registry at ``path``, catalogs resolved against the server's ``items``."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RegistryError(f"{path}: cannot read the node registry ({error})") from None
        if not isinstance(raw, dict):
            raise RegistryError(f"{path}: expected an object of node ids")
        index = pd.Index(items["item_id"].astype(str))
        nodes = {}
        for key, entry in raw.items():
            try:
                node_id, name = int(key), str(entry["name"])
                catalog = entry.get("catalog")
                rows = None
                if catalog is not None:
                    positions = index.get_indexer([str(i) for i in catalog])
                    if (positions < 0).any():
                        raise ValueError("its catalog names products the catalog lacks")
                    rows = np.sort(positions.astype(np.int64))
                customers = entry.get("customers")
                if isinstance(customers, bool) or not isinstance(customers, int) or customers < 1:
                    raise ValueError(
                        f"customers must be its declared customer figure, a positive whole "
                        f"number, got {customers!r} (without it the node's weight in the mean "
                        "and its answers would be whatever it claims)"
                    )
                nodes[node_id] = RegisteredNode(name, rows, customers)
            except (KeyError, TypeError, ValueError) as error:
                raise RegistryError(f"{path}: node {key!r}: {error}") from None
        return cls(nodes)

    def lookup(self, node_id: int) -> RegisteredNode | None:
        return self.nodes.get(int(node_id))

    def named(self, name: str) -> RegisteredNode | None:
        """The registered node called ``name`` (None: none is)."""
        return next((node for node in self.nodes.values() if node.name == name), None)

    @property
    def customers(self) -> int | None:
        """The registered nodes' customers summed (None: no node is registered)."""
        return sum(node.customers for node in self.nodes.values()) or None


def write_registry(path: Path, nodes: dict[int, dict]) -> None:
    """Write a registry (``{node id: {"name", "catalog", "customers"}}``)."""
    path.write_text(json.dumps({str(k): v for k, v in nodes.items()}, indent=1))
