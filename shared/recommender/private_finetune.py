"""DP-SGD on the text encoder's top layers: each customer's gradient clipped, noise on the sum.

The non-private recipe (:mod:`shared.recommender.finetune`) contrasts each pair with the other
pairs of its batch, so one customer's products are negatives in every other customer's loss and
no per-customer gradient exists to clip. Here a customer's loss depends only on their own data
and public products: each customer Poisson-sampled for a step gives one consecutive pair (a, b)
of their history and :data:`NEGATIVES` products drawn from the public catalog; a's and b's
embeddings are each contrasted with the other against those negatives (InfoNCE at the same
temperature), the gradient taken through all of the customer's embeddings (without the
gradient through the negatives the recipe collapses: docs/evaluation.md, "What makes the
recipe learn"). The gradient of that loss with respect to the top layers is the customer's;
it is clipped to ``max_grad_norm``, the clipped gradients are summed, Gaussian noise of std
``noise_multiplier x max_grad_norm`` is added, and AdamW steps on the sum divided by the
expected batch. One step is the Poisson-subsampled Gaussian mechanism for one customer's whole
history (the unit of every other DP release of a node), accounted as such by the caller.

Per-customer gradients come from Opacus's ``GradSampleModule`` on the top layers, with each
customer's texts packed into one sequence (attention within each text only:
:meth:`FrozenPrefix.embed_packed`), so that a per-sample gradient is a customer's. Poisson
sampling, the choice of pair, the negatives and the noise come from :class:`SecureRandom`,
never from a seeded generator.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from shared.recommender.finetune import TEMPERATURE, FrozenPrefix
from shared.recommender.secure_random import SecureRandom
from shared.runs.progress import progress_bar

NEGATIVES = 7  # public catalog products a sampled customer's pair is contrasted against
LEARNING_RATE = 3e-4  # AdamW on the noisy mean (docs/evaluation.md: 31 steps of 256 learn)
CHUNK = 8  # customers per backward pass: bounds the per-customer gradients held at once


def _draw(random: SecureRandom, counts: np.ndarray) -> np.ndarray:
    """One uniform index below each of ``counts``."""
    return np.minimum((random.uniform(len(counts)).numpy() * counts).astype(np.int64), counts - 1)


def draw_steps(
    customer_pairs: list[np.ndarray],
    catalog: np.ndarray,
    steps: int,
    sample_rate: float,
    random: SecureRandom,
) -> list[np.ndarray]:
    """Each step's sampled customers as rows of (a, b, NEGATIVES negatives): Poisson sampling of
    the customers at ``sample_rate``, one pair of each, negatives uniform over ``catalog``."""
    counts = np.array([len(p) for p in customer_pairs], dtype=np.int64)
    drawn = []
    for _ in range(steps):
        chosen = np.flatnonzero(random.bernoulli(len(customer_pairs), sample_rate).numpy())
        which = _draw(random, counts[chosen])
        pairs = [customer_pairs[c][i] for c, i in zip(chosen, which, strict=True)]
        pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        picks = _draw(random, np.full(len(chosen) * NEGATIVES, len(catalog), dtype=np.int64))
        negatives = np.asarray(catalog, dtype=np.int64)[picks].reshape(len(chosen), NEGATIVES)
        drawn.append(np.concatenate([pairs, negatives], axis=1))
    return drawn


def customer_losses(prefix: FrozenPrefix, rows: np.ndarray) -> torch.Tensor:
    """Each customer's loss (one per row of (a, b, negatives...)): a against b among the
    negatives and b against a, a negative equal to a or b left out."""
    count = len(rows)
    embedded = prefix.embed_packed(rows)
    anchors, positives, others = embedded[:, 0], embedded[:, 1], embedded[:, 2:]
    ids = torch.as_tensor(rows, device=embedded.device)
    same = (ids[:, 2:] == ids[:, :1]) | (ids[:, 2:] == ids[:, 1:2])
    positive = (anchors * positives).sum(1, keepdim=True)
    zero = torch.zeros(count, dtype=torch.long, device=embedded.device)
    loss = 0.0
    for side in (anchors, positives):
        against = torch.einsum("cd,ckd->ck", side, others).masked_fill(same, float("-inf"))
        logits = torch.cat([positive, against], 1) / TEMPERATURE
        loss = loss + F.cross_entropy(logits, zero, reduction="none") / 2
    return loss


def _clipped_sum(
    prefix: FrozenPrefix, rows: np.ndarray, parameters: list[torch.nn.Parameter], clip: float
) -> tuple[list[torch.Tensor], float]:
    """The sum over ``rows``' customers of each one's gradient clipped to ``clip``, and the sum
    of their losses. Needs the top layers wrapped in a ``GradSampleModule`` that reduces by
    sum (with ``mean`` Opacus scales every per-sample gradient by the batch size)."""
    count = len(rows)
    losses = customer_losses(prefix, rows)
    with warnings.catch_warnings():  # the stored token states need no gradient: Opacus's
        warnings.filterwarnings("ignore", "Full backward hook is firing")  # hooks say so
        losses.sum().backward()
    per_customer = [p.grad_sample for p in parameters]
    norms = torch.sqrt(sum((g.reshape(count, -1) ** 2).sum(1) for g in per_customer))
    # a customer whose gradient is not finite (weights the server chose can make one product's
    # text overflow) is left out: a rule about that customer alone, so the sensitivity holds
    finite = torch.isfinite(norms)
    factor = torch.where(finite, (clip / (norms + 1e-6)).clamp(max=1.0), 0.0)
    summed = [
        torch.einsum("c,c...->...", factor, g.masked_fill(~finite.view(-1, *[1] * (g.ndim - 1)), 0))
        for g in per_customer
    ]
    for p in parameters:
        p.grad_sample, p.grad = None, None
    return summed, losses.detach()[finite].sum().item()


def train_top_layers_private(
    prefix: FrozenPrefix,
    customer_pairs: list[np.ndarray],
    catalog: np.ndarray,
    *,
    steps: int,
    sample_rate: float,
    expected_batch: float,
    noise_multiplier: float,
    max_grad_norm: float,
    show_progress: bool = False,
) -> list[float]:
    """``steps`` DP-SGD steps (AdamW on the noisy mean) on the top layers of ``prefix``; one list
    of consecutive pairs per customer, negatives from ``catalog``. Returns each step's mean loss
    over its sampled customers (NaN for a step that sampled none). The steps are accounted by
    the caller: Poisson-subsampled Gaussian, ``noise_multiplier``, ``sample_rate``, ``steps``."""
    from opacus.grad_sample import GradSampleModule

    random = SecureRandom()
    drawn = draw_steps(customer_pairs, catalog, steps, sample_rate, random)
    prefix.add(np.concatenate([np.zeros(0, np.int64), *(rows.ravel() for rows in drawn)]))
    model = prefix.encoder.model
    parameters = prefix.trainable_top()
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    sampler = GradSampleModule(prefix.top, loss_reduction="sum")  # a gradient per customer
    model.train()
    losses = []
    try:
        for rows in progress_bar(drawn, "private encoder steps", disable=not show_progress):
            # customers of like packed length share a chunk (less padding); the sum is the same
            rows = rows[np.argsort([sum(len(prefix.states[int(i)]) for i in r) for r in rows])]
            total = [torch.zeros_like(p) for p in parameters]
            loss = 0.0
            for start in range(0, len(rows), CHUNK):
                clipped, chunk_loss = _clipped_sum(
                    prefix, rows[start : start + CHUNK], parameters, max_grad_norm
                )
                for summed, part in zip(total, clipped, strict=True):
                    summed.add_(part)
                loss += chunk_loss
            std = noise_multiplier * max_grad_norm
            for parameter, summed in zip(parameters, total, strict=True):
                noise = random.normal(summed.shape, std, dtype=summed.dtype, device=summed.device)
                parameter.grad = (summed + noise) / expected_batch
            optimizer.step()  # a step with no customer sampled still releases noise
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss / len(rows) if len(rows) else float("nan"))
    finally:
        sampler.to_standard_module()  # hooks and per-text gradients removed
        model.eval()
        model.requires_grad_(False)
    return losses
