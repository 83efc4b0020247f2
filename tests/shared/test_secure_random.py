"""All DP randomness comes from SecureRandom (shared/recommender/secure_random.py): its draws have
the right
distribution, and no seed (the run's ``seed`` setting through ``init_seed``, torch's or numpy's
global generator, the clock) reproduces the noise or the sampling of DP-SGD (``train_private``)
or the noise of node-level DP (``NodeLevelDP.release``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.differential_privacy import compute_stdv
from helpers import TEST_DEVICE, customers, tiny_model
from scipy import stats

from server.privacy.ledger import PrivacyLedger
from server.privacy.node_privacy import NodeLevelDP
from shared.recommender.model import init_seed
from shared.recommender.secure_random import SecureRandom
from shared.recommender.training import train_private
from shared.runs.config import RunConfig

N = 1_000_000


def test_gaussian_draws_are_standard_normal() -> None:
    z = SecureRandom().normal((N,), 1.0, dtype=torch.float64).numpy()
    assert abs(z.mean()) < 5 / np.sqrt(N)
    assert abs(z.std() - 1.0) < 5 / np.sqrt(2 * N)
    assert stats.kstest(z, "norm").pvalue > 1e-6
    beyond = np.mean(np.abs(z) > 3.0)  # the tails too, where KS is weak
    expected = 2 * stats.norm.sf(3.0)
    assert abs(beyond - expected) < 5 * np.sqrt(expected / N)


def test_draws_have_the_asked_shape_scale_dtype_and_device() -> None:
    random = SecureRandom()
    z = random.normal((301, 7), 2.5)  # odd count: Box-Muller pairs are cut
    assert z.shape == (301, 7) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert 2.0 < float(z.std()) < 3.0
    assert not random.normal((5,), 0.0).any()
    if torch.cuda.is_available():
        on_gpu = random.normal((3, 4), 1.0, dtype=torch.float16, device="cuda")
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float16


def test_uniform_and_bernoulli_draws() -> None:
    random = SecureRandom()
    u = random.uniform(N).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-6
    chosen = random.bernoulli(N, 0.1)
    assert chosen.dtype == torch.bool
    assert abs(float(chosen.double().mean()) - 0.1) < 5 * np.sqrt(0.1 * 0.9 / N)


def test_no_seed_reproduces_the_draws() -> None:
    draws = []
    for _ in range(2):
        init_seed(0)
        draws.append(SecureRandom().normal((1000,), 1.0, dtype=torch.float64))
    init_seed(0)
    assert not torch.allclose(draws[0], draws[1])
    assert not torch.allclose(draws[0], torch.randn(1000, dtype=torch.float64))


def private_step(
    noise_multiplier: float, expected_batch: int = 7, epochs: int = 1, passes: int = 1
) -> dict[str, torch.Tensor]:
    """The weights after ``train_private`` on ``tiny_model``, torch and numpy seeded with the
    run's seed right before, as ``Experiment.new_model`` leaves them."""
    model, (x, y) = tiny_model(), customers()
    init_seed(RunConfig().seed)
    train_private(
        model,
        x,
        y,
        epochs=epochs,
        expected_batch=expected_batch,
        noise_multiplier=noise_multiplier,
        max_grad_norm=0.05,
        lr=0.5,
        device=TEST_DEVICE,
        trainable="all",
        physical_batches=passes,
    )
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_two_private_runs_with_the_same_seed_release_different_weights() -> None:
    first, second = private_step(1.0), private_step(1.0)
    assert not torch.allclose(first["id_scores.bias"], second["id_scores.bias"])


def test_dp_sgd_noise_is_not_the_seeded_generators_and_is_added_once() -> None:
    """Every customer is sampled (rate 1), so the noise is the noisy step minus the noise-free
    one, times -batch / lr. It is N(0, (sigma C)^2) once per step, though the step runs as three
    passes, and it is not what torch's generator gives from the run's seed (what Opacus draws
    with ``secure_mode`` off)."""
    sigma, clip, lr, batch = 1.0, 0.05, 0.5, 7
    clean = private_step(0.0, passes=3)
    noisy = private_step(sigma, passes=3)
    noise = {
        k: (noisy[k] - clean[k]) * (-batch / lr) for k in clean if clean[k].is_floating_point()
    }
    flat = torch.cat([v.flatten() for v in noise.values()])
    assert float(flat.std()) == pytest.approx(sigma * clip, rel=0.1)  # sqrt(2) off if twice
    init_seed(RunConfig().seed)  # as train_private started: nothing else draws from torch's
    seeded = [torch.normal(0.0, sigma * clip, v.shape, dtype=v.dtype) for v in noise.values()]
    for actual, replayed in zip(noise.values(), seeded, strict=True):
        assert not torch.allclose(actual, replayed, atol=1e-3 * sigma * clip)


def test_a_step_that_samples_no_customer_still_adds_the_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Poisson draw of no customer is still the subsampled Gaussian step the accountant
    counts: the weights move by -lr x N(0, (sigma C)^2) / batch, as on any other step."""
    monkeypatch.setattr(SecureRandom, "bernoulli", lambda self, n, p: torch.zeros(n, dtype=bool))
    sigma, clip, lr, batch = 1.0, 0.05, 0.5, 7
    start, noisy = private_step(0.0), private_step(sigma)
    noise = {
        k: (noisy[k] - start[k]) * (-batch / lr) for k in start if start[k].is_floating_point()
    }
    flat = torch.cat([v.flatten() for v in noise.values()])
    assert float(flat.std()) == pytest.approx(sigma * clip, rel=0.1)


def test_poisson_sampling_does_not_follow_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without noise, two runs at the same clock differ only if their samples do (rate 3/7,
    nine steps: equal samples every step has probability about 1e-18)."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)
    first, second = private_step(0.0, 3, 3), private_step(0.0, 3, 3)
    assert not torch.allclose(first["id_scores.bias"], second["id_scores.bias"])


def test_node_level_noise_is_not_numpys_seeded_draw(tmp_path: Path) -> None:
    config = RunConfig(node_dp=True, node_clip_norm=2.0, clients=4, rounds=3)
    node_dp = NodeLevelDP(config, PrivacyLedger(tmp_path / "ledger.jsonl"))
    total = {"id_scores.bias": np.zeros(1000, np.float32)}
    releases = []
    for server_round in (1, 2):  # identical inputs, generators seeded alike
        init_seed(config.seed)
        releases.append(node_dp.release(server_round, total, 4, 4)["id_scores.bias"].numpy())
    init_seed(config.seed)
    std = compute_stdv(node_dp.sigma, config.node_clip_norm, 4)
    seeded = np.random.normal(0, std, 1000).astype(np.float32)  # what Flower's helper drew
    assert not np.allclose(releases[0], releases[1], atol=1e-3 * std)
    assert not np.allclose(releases[0], seeded, atol=1e-3 * std)
    assert releases[0].std() == pytest.approx(std, rel=0.15)
