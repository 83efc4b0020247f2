"""Cryptographically secure randomness for what must stay private: DP noise and DP sampling.

Each :class:`SecureRandom` is a keystream of AES-256 in counter mode keyed with 32 bytes from
``os.urandom`` (the construction of NIST SP 800-90A's CTR_DRBG, without reseeding: a generator
lives for one training session or one release). Nothing seeds it but the operating system, so
no setting, seed or global generator (numpy's, torch's) can reproduce its draws.

Gaussians come from Box-Muller in float64 on 53-bit uniforms and are rounded to the tensor's
dtype. They are floating-point approximations of the continuous Gaussian, not a discrete
Gaussian: for float32 tensors the float64 draws are far finer than the float32 grid, so every
float32 value near the true sum is reachable and the gaps that floating-point attacks read
(Mironov 2012; Jin et al. 2021) are not left in the output. The tails stop at about 8.6 std
(the smallest uniform is 2^-53), a probability of about 1e-17.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 1 << 20  # uniforms per keystream request: 8 MiB of key stream, bounded memory


class SecureRandom:
    """Uniform, Bernoulli and Gaussian draws from a fresh AES-256-CTR keystream."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.AES256(os.urandom(32)), modes.CTR(bytes(16)))
        self._stream = cipher.encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 draws, uniform on the multiples of 2^-53 in [0, 1), on the CPU."""
        words = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64)).mul_(2.0**-53)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent booleans, each True with probability ``p`` (to 2^-53)."""
        return self.uniform(n) < p

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """N(0, std^2) draws of ``shape``, generated on the CPU, then moved to ``device``."""
        out = torch.zeros(shape, dtype=dtype)
        if std == 0:
            return out.to(device)
        flat = out.view(-1)
        for start in range(0, len(flat), CHUNK):
            count = min(CHUNK, len(flat) - start)
            flat[start : start + count] = self._standard_normal(count).mul_(std)
        return out.to(device)

    def _standard_normal(self, n: int) -> torch.Tensor:
        """``n`` float64 N(0, 1) draws by Box-Muller, two per pair of uniforms."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = u[:pairs].neg_().log1p_().mul_(-2.0).sqrt_()  # 1 - u is in (0, 1]: no log(0)
        angle = u[pairs:].mul_(2.0 * math.pi)
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
