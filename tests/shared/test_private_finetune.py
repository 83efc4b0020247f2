"""DP-SGD on the encoder's top layers (shared/recommender/private_finetune.py): who is sampled,
each customer's gradient clipped on its own, and randomness no seed reproduces."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule

from shared.recommender import private_finetune
from shared.recommender.finetune import FrozenPrefix, top_layers
from shared.recommender.private_finetune import (
    NEGATIVES,
    _clipped_sum,
    customer_losses,
    draw_steps,
    train_top_layers_private,
)
from shared.recommender.secure_random import SecureRandom
from shared.recommender.text import TextEncoder

TEXTS = [
    f"product {i}: {word} for {other} hair" for i in range(40) for word, other in [("soap", "dry")]
]


@pytest.fixture()
def prefix(tiny_bert_dir: Path) -> FrozenPrefix:
    encoder = TextEncoder(str(tiny_bert_dir))
    return FrozenPrefix(encoder, TEXTS, np.arange(len(TEXTS)), layers=1)


def test_each_sampled_customer_gives_one_of_their_own_pairs_and_public_negatives() -> None:
    customer_pairs = [np.array([[1, 2], [2, 3]]), np.array([[10, 11]]), np.array([[20, 21]])]
    catalog = np.arange(30, 40)
    steps = draw_steps(customer_pairs, catalog, 3, 1.0, SecureRandom())
    for rows in steps:  # rate 1: every customer, once, in order
        assert rows.shape == (3, 2 + NEGATIVES)
        for own, row in zip(customer_pairs, rows, strict=True):
            assert any((row[:2] == pair).all() for pair in own)
        assert np.isin(rows[:, 2:], catalog).all()
    (empty,) = draw_steps(customer_pairs, catalog, 1, 0.0, SecureRandom())
    assert empty.shape == (0, 2 + NEGATIVES)
    many = draw_steps([np.array([[1, 2]])] * 2000, catalog, 1, 0.25, SecureRandom())[0]
    assert 400 < len(many) < 600  # Poisson sampling at the rate asked


def test_each_customers_gradient_is_clipped_on_its_own(prefix: FrozenPrefix) -> None:
    """The clipped sum is the sum over customers of each one's own gradient (the gradient of
    their loss alone, through their pair and their negatives) scaled to at most the clip."""
    rows = np.array(
        [[0, 1, *range(20, 27)], [2, 3, *range(21, 28)], [4, 5, 20, 0, 1, 2, 3, 4, 5]],
        dtype=np.int64,
    )
    model = prefix.encoder.model.train()  # Opacus records activations in training mode only
    for module in model.modules():  # without dropout: gradients comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    parameters = prefix.trainable_top()
    own = []
    for row in rows:
        loss = customer_losses(prefix, row[None]).sum()
        own.append(torch.autograd.grad(loss, parameters))
    norms = [torch.sqrt(sum((g**2).sum() for g in grads)) for grads in own]
    # between the norms: one customer keeps their whole gradient, the others are scaled down,
    # each by their own factor (a per-sample gradient off by any factor fails one of the two)
    clip = float(sorted(norms)[0] + sorted(norms)[1]) / 2
    expected = [
        sum(g[i] * min(1.0, clip / float(n)) for g, n in zip(own, norms, strict=True))
        for i in range(len(parameters))
    ]
    sampler = GradSampleModule(prefix.top, loss_reduction="sum")
    try:
        summed, loss = _clipped_sum(prefix, rows, parameters, clip)
    finally:
        sampler.to_standard_module()
    for got, want in zip(summed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.sqrt(sum((g**2).sum() for g in summed)) <= len(rows) * clip * (1 + 1e-5)
    assert loss == pytest.approx(float(customer_losses(prefix, rows).sum()), rel=1e-5)


def _train(prefix: FrozenPrefix, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from shared.recommender.finetune import load_top_layers

    load_top_layers(prefix.encoder, start, 1)
    torch.manual_seed(0)
    np.random.seed(0)
    customer_pairs = [np.array([[i, i + 1]]) for i in range(0, 30, 2)]
    train_top_layers_private(
        prefix,
        customer_pairs,
        np.arange(len(TEXTS)),
        steps=2,
        sample_rate=0.5,
        expected_batch=7.5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    return top_layers(prefix.encoder, 1)


def test_the_noise_and_sampling_come_from_the_os_not_from_a_seed(
    prefix: FrozenPrefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = top_layers(prefix.encoder, 1)
    first, second = _train(prefix, start), _train(prefix, start)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # same seeds, other draws
    assert any(not torch.equal(first[k], start[k]) for k in first)  # and it trained
    monkeypatch.setattr(os, "urandom", lambda n: bytes(n))  # the only source of its draws
    fixed, again = _train(prefix, start), _train(prefix, start)
    for k in fixed:
        torch.testing.assert_close(fixed[k], again[k])
    assert not prefix.encoder.model.training  # left in eval mode, nothing trainable
    assert not any(p.requires_grad for p in prefix.encoder.model.parameters())
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in prefix.top.parameters()
    )


def test_a_customer_whose_encoder_gradient_is_not_finite_is_left_out(
    prefix: FrozenPrefix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers the server chose can make one product's text overflow, and a NaN passes the
    clipping: the clipped sum is now that of the other customers, finite."""
    rows = np.array(
        [[0, 1, *range(20, 27)], [2, 3, *range(21, 28)], [4, 5, 20, 0, 1, 2, 3, 4, 5]],
        dtype=np.int64,
    )
    model = prefix.encoder.model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    parameters = prefix.trainable_top()
    sampler = GradSampleModule(prefix.top, loss_reduction="sum")
    try:
        clean, _ = _clipped_sum(prefix, rows[[0, 2]], parameters, 0.1)
        honest = private_finetune.customer_losses
        poisoned = torch.tensor([1.0, math.nan, 1.0])
        monkeypatch.setattr(
            private_finetune, "customer_losses", lambda p, r: honest(p, r) * poisoned[: len(r)]
        )
        summed, loss = _clipped_sum(prefix, rows, parameters, 0.1)
    finally:
        sampler.to_standard_module()
    assert math.isfinite(loss)
    for got, want in zip(summed, clean, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
