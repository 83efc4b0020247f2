"""Clipping is only as true as the per-sample gradients: Opacus's ghost norms against brute force.

One customer = one sample. For each customer we backpropagate their loss alone (float64) and
compare the gradient norm over every trainable weight with what Opacus computes for clipping.
"""

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from shared.model import FusionRecommender, ModelConfig
from shared.training import (
    CustomerLoss,
    select_trainable,
    train_private,
    training_tensors,
    trim,
)


def tiny_model(fusion: str, variant: str = "fusion") -> FusionRecommender:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    config = ModelConfig(
        num_items=40,
        text_dim=16,
        dim=8,
        max_len=6,
        layers=1,
        heads=2,
        dropout=0.0,
        fusion=fusion,
        variant=variant,
    )
    model = FusionRecommender(config, text)
    with torch.no_grad():  # move off the zero initialisation so every path carries gradient
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.double()


def customers() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1)
    histories = [rng.integers(0, 40, size=n) for n in (2, 3, 5, 7, 9, 4)]
    histories.append(np.array([3, 3, 3]))  # repeated items: the same table rows twice
    return trim(*training_tensors(histories, max_len=6))


def brute_force_norms(model: FusionRecommender, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss_fn = CustomerLoss("sum")
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
        squared = sum((g**2).sum() for g in grads)
        norms.append(squared.sqrt())
    return torch.stack(norms)


@pytest.mark.parametrize("fusion", ["gated", "sum", "concat"])
@pytest.mark.parametrize("variant", ["fusion", "text", "id"])
def test_ghost_norms_match_brute_force(fusion: str, variant: str) -> None:
    model = tiny_model(fusion, variant)
    x, y = customers()
    expected = brute_force_norms(model, x, y)
    module = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean"
    )
    per_customer = CustomerLoss("none")(module(x), y)
    per_customer.mean().backward()
    measured = module.get_norm_sample().double()
    module.to_standard_module()
    assert torch.all(expected > 0)
    torch.testing.assert_close(measured, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("trainable", ["bias", "id"])
def test_ghost_norms_match_brute_force_when_part_is_frozen(trainable: str) -> None:
    """Under DP only part of the model learns; the norms must cover exactly that part."""
    model = tiny_model("gated")
    select_trainable(model, trainable)
    x, y = customers()
    expected = brute_force_norms(model, x, y)
    module = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean"
    )
    CustomerLoss("none")(module(x), y).mean().backward()
    measured = module.get_norm_sample().double()
    module.to_standard_module()
    assert torch.all(expected > 0)
    torch.testing.assert_close(measured, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("physical_batches", [1, 3])
def test_a_private_step_is_the_mean_clipped_gradient_however_the_batch_is_split(
    physical_batches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no noise and every customer sampled, one DP-SGD step moves the weights by exactly
    -lr x (sum of per-customer gradients, each clipped to C) / batch, computed one customer at a
    time here, also when the batch runs as several length-sorted passes."""

    class NoiselessAccountant:  # without noise there is no finite epsilon to compute
        def step(self, **_) -> None: ...
        def get_epsilon(self, delta: float) -> float:
            return float("inf")

        def state_dict(self) -> dict:
            return {}

    monkeypatch.setattr("shared.training.new_accountant", lambda state: NoiselessAccountant())
    model, (x, y) = tiny_model("gated"), customers()
    clip, lr = 0.05, 0.5
    clipped_sum = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):  # brute force: each customer's own gradient, clipped
        model.zero_grad()
        CustomerLoss("sum")(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for total, g in zip(clipped_sum, grads, strict=True):
            total += g * min(1.0, clip / float(norm))
    before = [p.detach().clone() for p in model.parameters()]
    train_private(
        model,
        x,
        y,
        epochs=1,
        expected_batch=len(x),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        lr=lr,
        delta=1e-5,
        device="cpu",
        trainable="all",
        physical_batches=physical_batches,
    )
    for after, start, total in zip(model.parameters(), before, clipped_sum, strict=True):
        torch.testing.assert_close(after.detach() - start, -lr * total / len(x))
