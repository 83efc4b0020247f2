"""Denoising a private round's aggregate update before the server applies it (``dp-denoise``).

Under customer-level DP every node adds Gaussian noise of the same size to every weight it
trains, so the round's averaged update is a signal plus a matrix of independent noise. The
signal of a text projection is concentrated in a few directions (docs/privacy.md, "Where the
private gain lives"); the noise is spread over all of them, and what lands in the many
directions without signal perturbs every score. Each 2-D update is therefore replaced by its
optimal shrinkage of singular values (Gavish and Donoho, "Optimal Shrinkage of Singular
Values", IEEE Trans. Inf. Theory 2017: the Frobenius-loss shrinker, with the noise level
estimated from the median singular value, so nothing the nodes report is trusted for it). It
reads only what the nodes released: post-processing, free under DP, and nothing a node's
guarantee depends on. Without DP there is no injected noise to remove and nothing is changed.

What is shrunk is the sum of every round's averaged update so far, not the round's alone
(:class:`CumulativeDenoiser`): the rounds' noises are independent while their signal points
the same way, so a direction too weak to stand out of one round's noise grows out of the
summed noise over the rounds (the signal adds up t times, the noise sqrt(t) times). Shrinking
each round on its own would zero such a direction in every round, for good.

The item biases (one coordinate per product) are a vector: no directions to keep, but their
signal is sparse in another way. Only the products that many customers bought stand out of the
noise; for the many that few did, the summed update is noise alone, and at a small budget that
noise, multiplied by ``dp-id-scale`` in every score, ranks the products at random. Their sum is
soft-thresholded (Donoho and Johnstone, "Ideal Spatial Adaptation by Wavelet Shrinkage",
Biometrika 1994): moved towards its median by the noise level, read from its median absolute
deviation (most products carry noise only), and set to the median where it lies within it.
That reading holds only where the biases are a random walk of the nodes' noise: where training
pulls them back to what the data say (a few products bought by every customer, as in a
catalogue of films), the noise left is a fraction of what was added, and what spreads them is
signal the threshold would erase. So they are thresholded only while their summed update
spreads at least :data:`RANDOM_WALK_SHARE` of what the noise the nodes added (as their signed
releases state it, :func:`injected_bias_variance`) would alone, and only while every node
subsamples its customers: measured, the threshold paid on Amazon Beauty's nodes of 2,236
customers (a sample rate of 0.23) and did not on three shops of nodes of 200-400 (rate 1: on
MovieLens it cost a fifth of validation NDCG@10), and the spread alone does not tell them
apart (0.77-1.0 in all four).

Whether a run is denoised follows its budget (:func:`denoises`): at a large one the noise
is small beside what the many directions below its edge carry together, and zeroing them
costs more than their noise does (docs/privacy.md, "When to denoise").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from functools import lru_cache

import numpy as np
import torch

from server.federation import budget
from server.federation.aggregation import NodeUpdate
from shared.federation.reports import NodeReport
from shared.runs.config import RunConfig

log = logging.getLogger(__name__)

MIN_SIZE = 16  # a matrix with a side this short has too few singular values to read the noise
ITEM_BIASES = "id_scores.bias"  # the model's item-bias vector (shared/recommender/model.py)
# the item biases' threshold, in noise standard deviations; chosen on Amazon Beauty's
# validation at epsilon 1 and 2 (docs/privacy.md, "Denoising the item biases")
BIAS_THRESHOLD = 1.0
# ... applied while the summed bias update's standard deviation is at least this share of the
# injected noise's (0.89-0.97 on Amazon Beauty; a safeguard where training holds the biases to
# the data: docs/privacy.md, "Denoising the item biases")
RANDOM_WALK_SHARE = 0.6
# ``dp-denoise=auto`` denoises a run that asks less than this epsilon per customer; chosen on
# Amazon Beauty's validation at epsilon 2, 4 and 8 (docs/privacy.md, "When to denoise")
AUTO_BELOW_EPSILON = 3.0


def denoises(config: RunConfig, node_budget: float | None = None) -> bool:
    """Whether the server denoises this run's private rounds (``dp-denoise``): only under
    customer-level DP; ``on`` always, ``off`` never, ``auto`` when the budget each node is
    asked to keep (public: server/federation/budget.py; a merchant's share of the run's
    target; None: the equal share) is below :data:`AUTO_BELOW_EPSILON`: that budget, not the
    run's, sets each node's noise."""
    if not config.dp or config.dp_denoise == "off":
        return False
    if node_budget is None:
        node_budget = budget.node_budget(config)
    return config.dp_denoise == "on" or node_budget < AUTO_BELOW_EPSILON


@lru_cache(maxsize=64)
def marchenko_pastur_median(beta: float) -> float:
    """The median of the Marchenko-Pastur law of aspect ratio ``beta`` (0 < beta <= 1): what
    the squared singular values of an m x n noise matrix, entries of variance 1/n, centre on."""
    # x = 1 + beta - 2 sqrt(beta) cos(phi) runs over the support as phi goes from 0 to pi,
    # and the density times dx becomes smooth in phi (no singularity at the edges)
    phi = np.linspace(0.0, math.pi, 100_001)
    x = 1 + beta - 2 * math.sqrt(beta) * np.cos(phi)
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = np.where(x > 0, 2 * np.sin(phi) ** 2 / (math.pi * x), 2 / math.pi)
    mass = np.concatenate(([0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(phi))))
    return float(np.interp(mass[-1] / 2, mass, x))


def shrink_singular_values(update: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``update`` (2-D) with its singular values optimally shrunk under Frobenius loss, the
    noise level estimated from their median; returns it and how many directions it keeps."""
    matrix = update.double()
    transposed = matrix.shape[0] > matrix.shape[1]
    if transposed:
        matrix = matrix.T
    m, n = matrix.shape  # m <= n
    beta = m / n
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    noise = float(s.median()) / math.sqrt(n * marchenko_pastur_median(beta))
    if noise == 0.0:
        return update, int((s > 0).sum())
    y = s / (noise * math.sqrt(n))
    edge = 1 + math.sqrt(beta)
    kept = y > edge
    shrunk = torch.zeros_like(s)
    z = y[kept]
    shrunk[kept] = torch.sqrt((z**2 - beta - 1) ** 2 - 4 * beta) / z * noise * math.sqrt(n)
    result = (u * shrunk) @ vh
    if transposed:
        result = result.T
    return result.to(update.dtype), int(kept.sum())


def soft_threshold(
    update: torch.Tensor, threshold: float = BIAS_THRESHOLD
) -> tuple[torch.Tensor, int]:
    """``update`` (1-D) moved towards its median by ``threshold`` times its noise level, read
    from the median absolute deviation, and set to the median within that; returns it and how
    many coordinates stay away from the median."""
    values = update.double()
    median = values.median()
    deviation = values - median
    noise = 1.4826 * float(deviation.abs().median())  # the MAD of a Gaussian, as its std
    kept = deviation.abs() > threshold * noise
    shrunk = torch.sign(deviation) * (deviation.abs() - threshold * noise).clamp(min=0.0)
    return (median + shrunk).to(update.dtype), int(kept.sum())


def injected_bias_variance(
    reports: Iterable[NodeReport],
    updates: list[NodeUpdate],
    config: RunConfig,
    global_state: dict[str, torch.Tensor],
) -> float | None:
    """The variance the nodes' DP-SGD noise adds to an item bias of the round's weighted mean
    update, were training to pull none of it back, averaged over the products: each step a
    node adds noise of std noise multiplier × clipping norm to its clipped sum and divides it
    by ``dp-batch-size`` (the public normaliser every node uses, whatever its sample rate:
    client/node.py), then steps by ``dp-lr``, over its steps (its signed release states the
    multiplier, clip and steps); each product's bias is averaged over the nodes that sent its
    row (a merchant's product carries its one node's noise whole, not a tenth of it).

    None when an update has no training release (no DP, a missing report), a figure in it is
    not positive and finite, the model has no item biases, or a node samples every customer at
    every step (sample rate 1: a node with no more customers than ``dp-batch-size``): the
    threshold paid only where every node subsampled (docs/privacy.md, "Denoising the item
    biases")."""
    if ITEM_BIASES not in global_state:
        return None
    products = len(global_state[ITEM_BIASES])
    releases = {r.node: r.release for r in reports if r.release is not None}
    weights = torch.zeros(products, dtype=torch.float64)
    weighted_noise = torch.zeros(products, dtype=torch.float64)
    for update in updates:
        release = releases.get(update.node)
        if release is None or release.purpose != "training" or release.sample_rate >= 1:
            return None
        step = config.dp_lr * release.noise_multiplier * release.max_grad_norm
        step /= config.dp_batch_size
        rows = update.rows.get(ITEM_BIASES)
        index = torch.arange(products) if rows is None else torch.as_tensor(rows).long()
        weights.index_add_(0, index, torch.full((len(index),), update.weight).double())
        # in float64, as products (a signed release's figures can overflow float32 or **)
        added = update.weight * update.weight * release.steps * step * step
        noise = torch.full((len(index),), added, dtype=torch.float64)
        weighted_noise.index_add_(0, index, noise)
    sent = weights > 0  # a product nobody sent keeps its bias: no noise
    per_product = torch.where(sent, weighted_noise / weights.where(sent, 1.0) ** 2, 0.0)
    variance = float(per_product.mean())  # 0 without updates: None below
    return variance if math.isfinite(variance) and variance > 0 else None


Denoiser = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def denoiser_for(name: str, value: torch.Tensor) -> Denoiser | None:
    """How the sum of ``name``'s updates is denoised: a matrix with enough singular values on
    both sides to read its noise from by :func:`shrink_singular_values`, the item biases by
    :func:`soft_threshold`; None for the rest (short vectors, small matrices)."""
    if value.ndim == 2 and min(value.shape) >= MIN_SIZE:
        return shrink_singular_values
    if name == ITEM_BIASES and value.ndim == 1 and value.numel() >= MIN_SIZE:
        return soft_threshold
    return None


class CumulativeDenoiser:
    """The server's denoising of the private rounds: it keeps, per matrix, the weights before
    the first private round (``start/<name>``) and the sum of the rounds' averaged updates as
    the nodes sent them (``raw/<name>``), and moves the matrix to the start plus that sum
    shrunk (:func:`shrink_singular_values`). ``state`` is checkpointed with the weights, so a
    resumed run denoises as one that never stopped."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def __call__(
        self,
        global_state: dict[str, torch.Tensor],
        delta: dict[str, torch.Tensor],
        bias_noise: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The round's ``delta`` with every matrix's and the item biases' replaced by the step
        from its current weights to the denoised sum; returns it and, per tensor, how many
        directions (matrices) or products (the item biases) it keeps. ``bias_noise``: the
        variance the nodes' noise added to each item bias this round
        (:func:`injected_bias_variance`); the biases are thresholded only while their sum
        spreads at least :data:`RANDOM_WALK_SHARE` of what that noise alone would, summed
        over the rounds, and are applied as averaged once a round's is None (unknown, or a
        node sampled every customer: :func:`injected_bias_variance`). Other vectors
        are left as they are (their signal is neither low-rank nor sparse), a tensor that
        never moved too, and a round with any value that is not finite, which is not applied
        (server/federation/rounds.py), is not summed."""
        out, report = dict(delta), {}
        if not all(bool(torch.isfinite(value).all()) for value in delta.values()):
            return out, report  # the round loop rejects the whole round: the sums must too
        for name, value in delta.items():
            raw_key = f"raw/{name}"
            denoise = denoiser_for(name, value)
            if denoise is None or not (raw_key in self.state or bool(value.any())):
                continue
            start = self.state.setdefault(f"start/{name}", global_state[name].clone())
            raw = self.state.get(raw_key, torch.zeros_like(value)) + value
            self.state[raw_key] = raw
            if denoise is soft_threshold and not self.biases_random_walk(name, raw, bias_noise):
                out[name] = start + raw - global_state[name]
                continue
            shrunk, report[name] = denoise(raw)
            out[name] = start + shrunk - global_state[name]
        return out, report

    def biases_random_walk(self, name: str, raw: torch.Tensor, noise: float | None) -> bool:
        """Add this round's injected ``noise`` variance to the biases' running total (−1 for
        good once a round's is unknown: the state is checkpointed, and must stay finite) and
        say whether their summed update ``raw`` spreads at least :data:`RANDOM_WALK_SHARE` of
        what that total noise alone would."""
        key = f"noise/{name}"
        total = self.state.get(key, torch.zeros((), dtype=torch.float64))
        known = noise is not None and float(total) >= 0
        total = total + noise if known else torch.full((), -1.0, dtype=torch.float64)
        self.state[key] = total
        if not known:
            log.info(
                "%s applied as averaged: a round's injected noise is unknown, or a node samples "
                "every customer at every step",
                name,
            )
            return False
        share = float(raw.double().std()) / math.sqrt(float(total))
        if share < RANDOM_WALK_SHARE:
            log.info(
                "%s applied as averaged: the summed update spreads %.2f of the injected noise's "
                "standard deviation (below %g: training holds them to the data)",
                name,
                share,
                RANDOM_WALK_SHARE,
            )
            return False
        return True
