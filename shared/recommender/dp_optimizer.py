"""Opacus's ghost-clipping DP optimizer with its Gaussian noise from :class:`SecureRandom`.

Kept apart from :mod:`shared.recommender.training` so that importing Opacus (seconds) waits until
private training actually runs.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from shared.recommender.secure_random import SecureRandom


class SecureDPOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` whose noise is drawn from a fresh
    :class:`SecureRandom` instead of torch's generator. Opacus calls :meth:`add_noise` once per
    logical step (never on steps skipped with ``signal_skip_step``), as before."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise_source = SecureRandom()

    def add_noise(self) -> None:
        """``p.grad`` = clipped sum + N(0, (noise_multiplier x max_grad_norm)^2), per weight."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.noise_source.normal(
                p.summed_grad.shape, std, dtype=p.summed_grad.dtype, device=p.summed_grad.device
            )
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def step_without_samples(self) -> None:
        """The step (or part of one) of a Poisson draw that sampled no customer, or none whose
        gradient could be computed: a zero clipped sum, then the noise, scaled and applied as
        every other step (the same mechanism, which the accountant counts); skipping it would
        release no noise at all."""
        self.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.step()
