"""A node's data directory: a dataset directory plus the node's public ``node.json``.

``node.json`` says who the node is and what it makes public: ``node`` (its name), ``partition``
(how the data was split, informational), ``catalog`` (the item ids it sells; null = all) and
``customers`` (its declared customer figure, the public stand-in for its exact count; see
client/policy.py). ``fedrec data split`` and the simulations write it; the node reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.errors import DataError

NODE_FILE = "node.json"


@dataclass(frozen=True)
class NodeInfo:
    """The public description of one node's data."""

    node: str
    partition: str = ""
    catalog: list[str] | None = None
    customers: int | None = None

    def write(self, directory: Path) -> None:
        (Path(directory) / NODE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, directory: Path) -> NodeInfo:
        path = Path(directory) / NODE_FILE
        try:
            info = json.loads(path.read_text())
            return cls(
                node=str(info["node"]),
                partition=str(info.get("partition", "")),
                catalog=None if info.get("catalog") is None else [str(i) for i in info["catalog"]],
                customers=None if info.get("customers") is None else _figure(info["customers"]),
            )
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing (a node's data directory needs it)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a valid node description ({error})") from None

    def catalog_indices(
        self, items: pd.DataFrame, directory: Path | None = None
    ) -> np.ndarray | None:
        """Item indices this node sells (None = the whole catalog); DataError naming
        ``directory``'s node.json when the catalog is empty or names a product ``items`` lacks
        (a node must not silently sell less than it says)."""
        if self.catalog is None:
            return None
        where = NODE_FILE if directory is None else Path(directory) / NODE_FILE
        if not self.catalog:
            raise DataError(where, "its catalog is empty: a node sells at least one product")
        unknown = sorted(set(self.catalog) - set(items["item_id"].astype(str)))
        if unknown:
            raise DataError(
                where,
                f"its catalog names {len(unknown)} product(s) not in the items table, e.g. "
                f"{unknown[:5]}: is it this catalog's node?",
            )
        return np.flatnonzero(items["item_id"].astype(str).isin(set(self.catalog)).to_numpy())


def _figure(value: object) -> int:
    """A declared customer figure: a whole number >= 1 (ValueError otherwise; -5 read as -5
    customers gave the node delta 1 / (10 x 1) = 0.1)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"customers {value!r} is not a whole number")
    if value < 1:
        raise ValueError(f"customers {value!r} is below 1")
    return int(value)


def round_down_2sf(count: int) -> int:
    """``count`` rounded down to two significant figures (at least 1): 2,236 -> 2,200."""
    if count < 100:
        return max(count, 1)
    scale = 10 ** (len(str(count)) - 2)
    return count // scale * scale


def node_catalog(directory: Path, items: pd.DataFrame) -> np.ndarray | None:
    """Item indices the node in ``directory`` sells (None = the whole catalog)."""
    return NodeInfo.read(directory).catalog_indices(items, directory)


def node_name(directory: Path) -> str:
    return NodeInfo.read(directory).node
