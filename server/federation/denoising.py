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

Whether a run is denoised follows its budget (:func:`denoises`): at a large one the noise
is small beside what the many directions below its edge carry together, and zeroing them
costs more than their noise does (docs/privacy.md, "When to denoise").
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from shared.runs.config import RunConfig

MIN_SIZE = 16  # a matrix with a side this short has too few singular values to read the noise
# ``dp-denoise=auto`` denoises a run that asks less than this epsilon per customer; chosen on
# Amazon Beauty's validation at epsilon 2, 4 and 8 (docs/privacy.md, "When to denoise")
AUTO_BELOW_EPSILON = 3.0


def denoises(config: RunConfig) -> bool:
    """Whether the server denoises this run's private rounds (``dp-denoise``): only under
    customer-level DP; ``on`` always, ``off`` never, ``auto`` when the run's target epsilon
    (public: what it asks every node) is below :data:`AUTO_BELOW_EPSILON`."""
    if not config.dp or config.dp_denoise == "off":
        return False
    return config.dp_denoise == "on" or config.target_epsilon < AUTO_BELOW_EPSILON


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


def shrinkable(value: torch.Tensor) -> bool:
    """A matrix with enough singular values on both sides to read its noise from."""
    return value.ndim == 2 and min(value.shape) >= MIN_SIZE


class CumulativeDenoiser:
    """The server's denoising of the private rounds: it keeps, per matrix, the weights before
    the first private round (``start/<name>``) and the sum of the rounds' averaged updates as
    the nodes sent them (``raw/<name>``), and moves the matrix to the start plus that sum
    shrunk (:func:`shrink_singular_values`). ``state`` is checkpointed with the weights, so a
    resumed run denoises as one that never stopped."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def __call__(
        self, global_state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The round's ``delta`` with every matrix's replaced by the step from its current
        weights to the denoised sum; returns it and, per matrix, how many directions it keeps.
        Vectors (the item biases) are left as they are: their signal is not concentrated in a
        few directions, so there is no noise level to read from them without trusting what
        the nodes report. A matrix that never moved is left too, and a round with any value
        that is not finite, which is not applied (server/federation/rounds.py), is not summed."""
        out, report = dict(delta), {}
        if not all(bool(torch.isfinite(value).all()) for value in delta.values()):
            return out, report  # the round loop rejects the whole round: the sums must too
        for name, value in delta.items():
            raw_key = f"raw/{name}"
            if not shrinkable(value) or not (raw_key in self.state or bool(value.any())):
                continue
            start = self.state.setdefault(f"start/{name}", global_state[name].clone())
            raw = self.state.get(raw_key, torch.zeros_like(value)) + value
            self.state[raw_key] = raw
            shrunk, report[name] = shrink_singular_values(raw)
            out[name] = start + shrunk - global_state[name]
        return out, report
