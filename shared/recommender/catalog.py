"""A live catalog for a trained model: products added or changed after training.

A new product is known only by its text. :class:`TextToId` is a ridge regression from text
embedding to the item's ID parameters (history vector, candidate vector, bias), fitted once on
the products with behaviour, then applied to each new product in microseconds. :func:`set_items`
writes a product's text and ID parameters into the model, growing its tables in place, so that
both the candidate side (:func:`table_rows`) and the history side (``model.user_states``) know
it at once. :func:`fill_cold_items` does both, after training, for every product nobody trained.
A service changes a copy instead (:func:`with_items`), so its readers never see a half-written
model.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from shared.recommender.model import FusionRecommender


class TextToId:
    """Ridge map text embedding -> (id_in row, id_scores row, bias), fitted on known items:
    those in the ``known`` mask, or else every item whose ID parameters are not all zero."""

    def __init__(
        self,
        model: FusionRecommender,
        ridge: float = 1.0,
        sample: int = 50_000,
        known: torch.Tensor | None = None,
    ):
        self.dim = model.config.dim
        # a logit on the scores; the stored bias is multiplied by ``id_scale`` when scored
        self.boost = model.config.new_item_boost / model.config.id_scale
        self.solution: torch.Tensor | None = None
        if not model.config.use_id:
            return
        device = model.text.device
        rows = torch.arange(model.config.num_items, device=device)
        if known is not None:
            rows = rows[known.to(device)]
        if len(rows) > sample:  # 385 unknowns need nowhere near a million equations
            pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:sample]
            rows = rows[pick.to(device)]
        with torch.no_grad():
            targets = torch.cat(
                [
                    model.id_in.weight[rows + 1],
                    model.id_scores.weight[rows],
                    model.id_scores.bias[rows, None],
                ],
                dim=1,
            ).double()
            if known is None:
                trained = targets.abs().sum(1) > 0  # all-zero: never trained
                rows, targets = rows[trained], targets[trained]
            design = self._design(model.text[rows])
            gram = design.T @ design + ridge * torch.eye(
                design.shape[1], dtype=design.dtype, device=device
            )
            self.solution = torch.linalg.solve(gram, design.T @ targets)

    @staticmethod
    def _design(text: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(len(text), 1, dtype=torch.double, device=text.device)
        return torch.cat([text.double(), ones], dim=1)

    def __call__(self, text: torch.Tensor) -> torch.Tensor:
        """Predicted ``(n, 2 * dim + 1)`` ID parameters for text embeddings ``(n, text_dim)``."""
        if self.solution is None:
            return torch.zeros(len(text), 2 * self.dim + 1, device=text.device)
        predicted = (self._design(text) @ self.solution.to(text.device)).float()
        predicted[:, -1] += self.boost
        return predicted


@torch.no_grad()
def fill_cold_items(model: FusionRecommender, trained: torch.Tensor) -> int:
    """Give the items no customer trained ID parameters predicted from their text
    (:class:`TextToId` fitted on the ``trained`` ones), so a new product competes with
    established ones on what its text says about the ID space; their bias gets
    ``config.new_item_boost``. Returns how many were filled."""
    if not (model.config.use_id and model.config.use_text) or trained.all() or not trained.any():
        return 0
    rows = (~trained).nonzero().squeeze(1).to(model.text.device)
    text = model.text[rows]
    set_items(model, rows, text, TextToId(model, known=trained)(text))
    return len(rows)


@torch.no_grad()
def set_items(
    model: FusionRecommender, rows: np.ndarray, text: torch.Tensor, ids: torch.Tensor | None
) -> None:
    """Write products ``rows`` (existing, or appended as ``num_items``, ``num_items + 1``...).

    ``text``: their embeddings; ``ids``: their ID parameters as :class:`TextToId` returns them,
    or ``None`` to keep the learned ones (every row must then exist already).
    """
    rows = torch.as_tensor(rows, dtype=torch.long, device=model.text.device)
    new = int((rows >= model.config.num_items).sum())
    if new:
        grow(model, new)
    model.text[rows] = text.to(model.text.dtype)
    if ids is not None and model.config.use_id:
        dim = model.config.dim
        model.id_in.weight[rows + 1] = ids[:, :dim]
        model.id_scores.weight[rows] = ids[:, dim : 2 * dim]
        model.id_scores.bias[rows] = ids[:, -1]


@torch.no_grad()
def grow(model: FusionRecommender, count: int) -> None:
    """Append ``count`` zero rows to the model's per-item tensors (text, ID tables, bias)."""
    model.config.num_items += count
    model.text = _extended(model.text, count)
    if model.config.use_id:
        model.id_in.weight = nn.Parameter(_extended(model.id_in.weight, count))
        model.id_scores.weight = nn.Parameter(_extended(model.id_scores.weight, count))
        model.id_scores.bias = nn.Parameter(_extended(model.id_scores.bias, count))
        model.id_in.num_embeddings += count
        model.id_scores.out_features += count


@torch.no_grad()
def with_items(model: FusionRecommender, text: torch.Tensor) -> FusionRecommender:
    """A model for a changed catalog that shares every weight of ``model`` but the per-item
    ones: its text embeddings are ``text`` ((n, text_dim), n >= ``num_items``, used as given),
    its ID tables copies grown with zero rows to n. :func:`set_items` on it (rows below n)
    leaves ``model`` as it was, for the readers still using it (copy-on-write)."""
    count = len(text) - model.config.num_items
    out = copy.copy(model)  # shallow: the module, parameter and buffer dicts are shared ...
    out._modules, out._buffers = dict(model._modules), dict(model._buffers)  # ... until here
    out.config = dataclasses.replace(model.config, num_items=len(text))
    out.text = text
    if model.config.use_id:
        out.id_in = _copied(model.id_in, weight=model.id_in.weight, count=count)
        out.id_in.num_embeddings += count
        out.id_scores = _copied(
            model.id_scores, weight=model.id_scores.weight, bias=model.id_scores.bias, count=count
        )
        out.id_scores.out_features += count
    return out


def _copied(module: nn.Module, count: int, **tensors: torch.Tensor) -> nn.Module:
    """A shallow copy of ``module`` whose parameters ``tensors`` are copies grown by ``count``."""
    out = copy.copy(module)
    out._parameters = dict(module._parameters)
    for name, tensor in tensors.items():
        setattr(out, name, nn.Parameter(_extended(tensor, count)))
    return out


def _extended(tensor: torch.Tensor, count: int) -> torch.Tensor:
    out = tensor.new_zeros(len(tensor) + count, *tensor.shape[1:])
    out[: len(tensor)] = tensor
    return out


@torch.no_grad()
def table_rows(model: FusionRecommender, rows: np.ndarray) -> np.ndarray:
    """Rows of ``[item_table | bias]`` for ``rows`` (:meth:`FusionRecommender.item_table` of
    those items), as the serving index stores them."""
    indices = torch.as_tensor(rows, dtype=torch.long, device=model.text.device)
    table, bias = model.item_table(indices)
    return torch.cat([table, bias[:, None]], dim=1).cpu().numpy()


def full_table(model: FusionRecommender, chunk: int = 100_000) -> np.ndarray:
    """``[item_table | bias]`` (num_items, dim + 1): the vectors a customer state scores against
    (in chunks: a million products never need more than one extra chunk of memory)."""
    return np.concatenate(
        [
            table_rows(model, np.arange(start, min(start + chunk, model.config.num_items)))
            for start in range(0, model.config.num_items, chunk)
        ]
    )
