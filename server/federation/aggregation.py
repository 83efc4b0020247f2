"""Aggregating node updates into the global model, row-aware for item tables.

Every update is a delta against the global weights. For item tables each row is aggregated only
over the nodes that sent that row (the nodes that sell that product and trained it), so a
merchant's products are never diluted by the nodes that do not sell them; rows nobody sent keep
their global value. The aggregate delta is applied by a server optimiser: plain FedAvg
(``server_lr`` 1) or FedAdam (Adam on the negative delta, Reddi et al. 2021).

Before any of that, :func:`clip_updates` bounds what one node can move: each item-table row and
each other weight tensor of a node's delta is scaled down to at most ``row-clip`` times what the
round's nodes typically move there, :func:`bound_shifts` (opt-in, ``shift-clip``) bounds how
far a node shifts the rows it sends all together (its products against everyone else's), and
:func:`cap_weights` bounds how much one node weighs in the mean (docs/deployment.md, "What one
node can move").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.federation.wire import ITEM_TABLES

METHODS = ("mean", "median", "trimmed")


@dataclass
class NodeUpdate:
    """One node's reply: its weights (item tables possibly row-sparse), its weight and, where
    the run adds the popularity prior, its item counts."""

    node: str
    weight: float
    arrays: dict[str, torch.Tensor]
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    counts: np.ndarray | None = None  # without DP: its histories' item counts (popularity)


def _row_index(update: NodeUpdate, name: str) -> torch.Tensor | None:
    """The table rows a row-sparse update sent for ``name`` (None: it sent the whole array)."""
    if name not in update.rows:
        return None
    return torch.as_tensor(update.rows[name] + ITEM_TABLES[name])


def _stack(
    name: str, reference: torch.Tensor, updates: list[NodeUpdate]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deltas (nodes, *shape) and a presence mask (nodes, rows or 1)."""
    deltas = torch.zeros(len(updates), *reference.shape)
    present = torch.zeros(
        len(updates), reference.shape[0] if reference.ndim else 1, dtype=torch.bool
    )
    for i, update in enumerate(updates):
        if (index := _row_index(update, name)) is not None:
            deltas[i, index] = update.arrays[name] - reference[index]
            present[i, index] = True
        else:
            deltas[i] = update.arrays[name] - reference
            present[i] = True
    return deltas, present


def _robust(deltas: torch.Tensor, present: torch.Tensor, method: str, trim: float) -> torch.Tensor:
    """Coordinate-wise median or trimmed mean over the nodes present for each row."""
    shape = (*present.shape, *[1] * (deltas.ndim - present.ndim))
    values = torch.where(present.view(shape), deltas, torch.nan)
    if method == "median":
        return torch.nan_to_num(values.nanmedian(dim=0).values)
    ordered = values.sort(dim=0).values  # NaNs (absent nodes) sort last
    count = present.sum(0).view(shape[1:]).expand(deltas.shape[1:])
    cut = (trim * count).floor()
    rank = torch.arange(len(deltas)).view(-1, *[1] * (deltas.ndim - 1))
    keep = (rank >= cut) & (rank < count - cut)
    kept = torch.where(keep, torch.nan_to_num(ordered), 0.0)
    return kept.sum(0) / keep.sum(0).clamp(min=1)


def _delta(update: NodeUpdate, name: str, reference: torch.Tensor) -> torch.Tensor:
    """The node's delta for one weight: rows it sent for a row-sparse table, else all of it."""
    index = _row_index(update, name)
    return update.arrays[name].float() - (reference if index is None else reference[index])


def _row_norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.abs() if delta.ndim == 1 else delta.flatten(1).norm(dim=1)


def _row_bounds(norms: list[torch.Tensor], rows: list[torch.Tensor], size: int) -> torch.Tensor:
    """Each row's typical movement: the median over the nodes that sent it when at least
    three did (one node cannot move a median of three), else the table's scale, the median
    over nodes of each node's median row movement (a row only one or two nodes sell is held to
    it; counted per node, so a node that sends many rows, moved or not, is still one voice)."""
    table = torch.stack([n.median() for n in norms if len(n)]).median()
    count = torch.bincount(torch.cat(rows), minlength=size)
    if int(count.max()) < 3:
        return torch.full((size,), float(table))
    grid = torch.full((len(norms), size), torch.nan)
    for i, (n, r) in enumerate(zip(norms, rows, strict=True)):
        grid[i, r] = n
    per_row = grid.nanmedian(dim=0).values
    return torch.where(count >= 3, per_row, table)


def _factor(norms: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The scale that brings each norm down to its bound (1 where it is within)."""
    return torch.where(norms > bounds, bounds / norms.clamp(min=1e-30), 1.0)


def clip_updates(
    global_state: dict[str, torch.Tensor], updates: list[NodeUpdate], multiple: float
) -> dict[str, int]:
    """Scale each node's delta down, in place, so that no item-table row and no other weight
    tensor moves more than ``multiple`` times the round's typical movement there (the median
    over nodes, :func:`_row_bounds` for rows). Returns, per node, how many rows and tensors
    were scaled down. ``multiple`` 0 turns the bound off."""
    if multiple <= 0 or not updates:
        return {}
    clipped = dict.fromkeys((u.node for u in updates), 0)
    for name, reference in global_state.items():
        reference = reference.float()
        deltas = [_delta(u, name, reference) for u in updates]
        if name in ITEM_TABLES:
            norms = [_row_norms(d) for d in deltas]
            if not any(len(n) for n in norms):  # no node sent a row of it: nothing to bound
                continue
            sent = [_row_index(u, name) for u in updates]
            rows = [torch.arange(len(reference)) if r is None else r for r in sent]
            bounds = multiple * _row_bounds(norms, rows, len(reference))
            factors = [_factor(n, bounds[r]) for n, r in zip(norms, rows, strict=True)]
        else:
            norms = [d.norm().reshape(1) for d in deltas]
            bound = multiple * torch.cat(norms).median()
            factors = [_factor(n, bound) for n in norms]
        for update, delta, factor in zip(updates, deltas, factors, strict=True):
            if bool((factor < 1).any()):
                clipped[update.node] += int((factor < 1).sum())
                shape = (-1, *[1] * (delta.ndim - 1)) if delta.ndim else ()
                base = update.arrays[name].float() - delta
                update.arrays[name] = base + delta * factor.reshape(shape)
    return {node: count for node, count in clipped.items() if count}


def bound_shifts(
    global_state: dict[str, torch.Tensor], updates: list[NodeUpdate], multiple: float
) -> list[tuple[str, str, float, float]]:
    """Hold, in place, each node's common shift of an item table (the mean of the row deltas
    it sends: a merchant lifting all its products' scores together, against every other
    merchant's) to ``multiple`` times the round's median node's shift. Only the part of each
    row's delta along the shift, in the rows moving with it, is shrunk, so the rows keep their
    order among themselves and none moves more than before (the row bound still holds).
    Returns (node, table, its shift, the bound) for each shift held; ``multiple`` 0: off."""
    held = []
    if multiple <= 0 or not updates:
        return held
    for name in (n for n in ITEM_TABLES if n in global_state):
        reference = global_state[name].float()
        deltas = [_delta(u, name, reference) for u in updates]
        shifts = [d.mean(0).norm() if len(d) else None for d in deltas]
        sizes = [s for s in shifts if s is not None]
        if not sizes:  # no node sent a row of it
            continue
        bound = multiple * torch.stack(sizes).median()
        for update, delta, shift in zip(updates, deltas, shifts, strict=True):
            if shift is not None and shift > bound:
                base = update.arrays[name].float() - delta
                update.arrays[name] = base + _shrink_shift(delta, float(bound))
                held.append((update.node, name, float(shift), float(bound)))
    return held


def _shrink_shift(delta: torch.Tensor, bound: float) -> torch.Tensor:
    """``delta`` (rows, ...) with its mean brought down to norm ``bound`` by shrinking each
    row's positive component along the mean (no row's norm grows, none changes direction
    against it)."""
    mean = delta.mean(0)
    direction = mean / mean.norm()
    along = (delta.reshape(len(delta), -1) @ direction.reshape(-1)).clamp(min=0)
    cut = (float(mean.norm()) - bound) / float(along.mean())  # in (0, 1): mean(along) >= |mean|
    shape = (-1, *[1] * (delta.ndim - 1))
    return delta - cut * along.reshape(shape) * direction


def weight_bound(weights: list[float], multiple: float) -> float:
    """The most one node may weigh: ``multiple`` times the round's lower median positive
    weight (a node with no customers to answer for weighs nothing and sets no bound; infinite
    when ``multiple`` is 0, the bound off, or no weight is positive)."""
    weights = [w for w in weights if w > 0]
    if multiple <= 0 or not weights:
        return math.inf
    return multiple * float(torch.tensor(weights, dtype=torch.float64).median())


def cap_weights(updates: list[NodeUpdate], multiple: float) -> dict[str, float]:
    """Lower, in place, each node's weight (its stated customers) to at most ``multiple``
    times the round's median weight (:func:`weight_bound`): a node that claims a thousand times
    the others' customers would otherwise be the whole mean, its bounded movement applied
    undiluted; its item counts (the popularity prior's) are held to the same figure. Returns,
    per node lowered, the weight it claimed."""
    bound = weight_bound([u.weight for u in updates], multiple)
    claimed = {u.node: u.weight for u in updates if u.weight > bound}
    for update in (u for u in updates if u.node in claimed):
        update.weight = bound
        if update.counts is not None:
            update.counts = np.minimum(update.counts, math.floor(bound))
    return claimed


def aggregate(
    global_state: dict[str, torch.Tensor],
    updates: list[NodeUpdate],
    method: str = "mean",
    trim: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The aggregate delta for every weight (mean weighted by node size, median or trimmed).
    The mean is accumulated node by node (memory of one model, however many nodes); the
    median and the trimmed mean sort the nodes' deltas, so they hold all of them."""
    if method not in METHODS:
        raise ValueError(f"aggregation must be one of {METHODS}, got {method!r}")
    out = {}
    for name, reference in global_state.items():
        reference = reference.float()
        if method == "mean":
            out[name] = _weighted_mean(name, reference, updates)
        else:
            out[name] = _robust(*_stack(name, reference, updates), method, trim)
    return out


def _weighted_mean(name: str, reference: torch.Tensor, updates: list[NodeUpdate]) -> torch.Tensor:
    """Each row's (or the whole weight's) delta averaged over the nodes that sent it, weighted
    by node size; rows nobody sent get delta 0."""
    # in float64: the weights are customer figures, and a float32 sum of large ones loses them
    total = torch.zeros_like(reference, dtype=torch.float64)
    weights = torch.zeros(reference.shape[0] if reference.ndim else 1, dtype=torch.float64)
    for update in updates:
        index = _row_index(update, name)
        delta = update.weight * _delta(update, name, reference).double()
        if index is None:
            total += delta
            weights += update.weight
        else:
            total.index_add_(0, index, delta)
            weights.index_add_(
                0, index, torch.full((len(index),), float(update.weight), dtype=torch.float64)
            )
    shape = (*reference.shape[:1], *[1] * max(reference.ndim - 1, 0))  # () for a scalar
    return (total / weights.clamp(min=1e-12).reshape(shape)).to(reference.dtype)


class ServerOptimizer:
    """Applies the aggregate delta: FedAvg (SGD, lr 1 by default) or FedAdam."""

    def __init__(self, kind: str = "sgd", lr: float = 1.0, betas=(0.9, 0.99), eps: float = 1e-3):
        self.kind, self.lr, self.betas, self.eps = kind, lr, betas, eps
        self.state: dict[str, torch.Tensor] = {}

    def step(
        self, global_state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if self.kind == "sgd":
            return {k: v + self.lr * delta[k] for k, v in global_state.items()}
        beta1, beta2 = self.betas
        new = {}
        for name, value in global_state.items():
            m = self.state.get(f"{name}.m", torch.zeros_like(value))
            v = self.state.get(f"{name}.v", torch.zeros_like(value))
            m = beta1 * m + (1 - beta1) * delta[name]
            v = beta2 * v + (1 - beta2) * delta[name] ** 2
            self.state[f"{name}.m"], self.state[f"{name}.v"] = m, v
            new[name] = value + self.lr * m / (v.sqrt() + self.eps)
        return new
