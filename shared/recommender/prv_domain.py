"""Opacus's PRV accountant with its domain sizing cached (the same epsilons, computed faster).

Before it discretizes, Opacus's ``PRVAccountant`` bounds its domain with RDP
(``compute_safe_domain_size``, remark 5.6 of Gopi et al.): the RDP of every entry of the history
at 151 orders, 99 of them fractional, each a slowly converging series in Python. A node asks for
the same entries again and again (a calibration tries 7 to 9 noise multipliers, each of them
twice when the finer error is needed; the charge and the budget checks repeat the chosen one),
and that sizing was most of a private node's time: 62 of the 73 s a tiny node's first private
round took on a busy 2-core machine. The RDP of one step of one (sample rate, noise multiplier)
is a pure function, cached here per process; the rest is Opacus's own arithmetic in Opacus's
order, so every epsilon is the one Opacus computes, to the bit
(tests/shared/test_prv_domain.py compares them).
"""

from __future__ import annotations

import functools
import math

import numpy as np

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps): a history entry


def merged(history: list[Entry]) -> list[Entry]:
    """``history`` with the entries of one (noise multiplier, sample rate) made one, their
    steps added, in the order each first appears: the same composition (it commutes), what
    Opacus's own ``step`` builds of repeated steps, at a cost that grows with the distinct
    entries, not with the releases. A node's history holds an entry per release, and each cheap
    private answer a server asks for (noise 1e6, a spend of about 1e-5) added one: 200 of them
    made every epsilon of a node of six training rounds take 80 s instead of 3 (merged: 0.6 s;
    2-core CPU), and its answer share allows billions. The releases that are not subsampled
    (sample rate 1: private answers) are one Gaussian together, whatever their noise
    multipliers, where they are of more than one (:func:`_gaussians`): a server that asked
    each answer at another noise (1e6, 1e6 + 1, ...) made as many entries again (60 took
    each epsilon from 0.3 s to 7.9 s; review)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in _gaussians(history):
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _gaussians(history: list[Entry]) -> list[Entry]:
    """``history`` with its Gaussian releases (sample rate 1, noise > 0) of more than one noise
    multiplier made one, where the first of them is: n_i releases at noise multipliers sigma_i
    compose exactly into one Gaussian of noise 1 / sqrt(sum n_i / sigma_i^2) (their privacy
    losses are Gaussian, and add; Dong, Roth and Su 2022, Corollary 3.3)."""
    gaussian = [i for i, (sigma, q, n) in enumerate(history) if q == 1 and sigma > 0 and n > 0]
    if len({history[i][0] for i in gaussian}) < 2:
        return history
    noise = 1 / math.sqrt(sum(history[i][2] / history[i][0] ** 2 for i in gaussian))
    folded = set(gaussian)
    kept = [entry for i, entry in enumerate(history) if i not in folded]
    at = gaussian[0]  # entries before the first Gaussian are all kept
    return [*kept[:at], (noise, 1.0, 1), *kept[at:]]


@functools.lru_cache(maxsize=4096)
def rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one Poisson subsampled Gaussian step at every order its
    ``RDPAccountant`` searches (``DEFAULT_ALPHAS``); the result is shared: never change it."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.flags.writeable = False
    return rdp


def rdp_epsilon(history: list[Entry], delta: float) -> float:
    """``RDPAccountant(history).get_epsilon(delta)``, from the cached per-step RDP (Opacus
    multiplies the per-order RDP by the steps, then sums the entries, as here)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum([rdp_of_one_step(sigma, q) * steps for sigma, q, steps in history])
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


def safe_domain_size(history: list[Entry], eps_error: float, delta_error: float) -> float:
    """Opacus's ``compute_safe_domain_size`` for the PRVs of ``history``: the RDP epsilon of
    the whole history at ``delta_error / 4`` and of one step of each entry at ``delta_error``
    over 8 times the steps, the largest of them (at least ``eps_error``) plus 3."""
    total = sum(steps for _, _, steps in history)
    largest = rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        largest = max(largest, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    return max(largest, eps_error) + 3


@functools.cache
def prv_accountant_class() -> type:
    """Opacus's ``PRVAccountant`` whose domain comes from :func:`safe_domain_size` (Opacus
    imported on first use: it takes seconds)."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class CachedDomainPRVAccountant(PRVAccountant):
        """Opacus's ``PRVAccountant``; its ``_get_domain`` is Opacus's, with the RDP cached."""

        def _get_domain(
            self,
            prvs: list,
            num_self_compositions: list[int],
            eps_error: float,
            delta_error: float,
        ) -> Domain:
            history = [
                (prv.noise_multiplier, prv.sample_rate, steps)
                for prv, steps in zip(prvs, num_self_compositions, strict=True)
            ]
            size = safe_domain_size(history, eps_error, delta_error)
            total = sum(num_self_compositions)
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-size, size, mesh_size)

    return CachedDomainPRVAccountant
