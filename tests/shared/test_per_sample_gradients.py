"""Clipping is only as true as the per-sample gradients: Opacus's ghost norms against brute force.

One customer = one sample. For each customer we backpropagate their loss alone (float64) and
compare the gradient norm over every trainable weight with what Opacus computes for clipping.
"""

import pytest
import torch
from helpers import TEST_DEVICE, customers, tiny_model
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from client.node import CatalogView
from shared.recommender.model import FusionRecommender
from shared.recommender.training import (
    CustomerLoss,
    length_buckets,
    select_trainable,
    targets_within,
    train_private,
)


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


@pytest.mark.parametrize("id_scale", [1.0, 10.0])
@pytest.mark.parametrize("trainable", ["text", "bias", "id"])
def test_ghost_norms_match_brute_force_when_part_is_frozen(trainable: str, id_scale: float) -> None:
    """Under DP only part of the model learns; the norms must cover exactly that part, also
    with the ID scores scaled outside their module (``dp-id-scale``)."""
    model = tiny_model("gated", id_scale=id_scale)
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
    physical_batches: int,
) -> None:
    """With no noise and every customer sampled, one DP-SGD step moves the weights by exactly
    -lr x (sum of per-customer gradients, each clipped to C) / batch, computed one customer at a
    time here, also when the batch runs as several length-sorted passes."""

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
        device=TEST_DEVICE,
        trainable="all",
        physical_batches=physical_batches,
    )
    for after, start, total in zip(model.parameters(), before, clipped_sum, strict=True):
        torch.testing.assert_close(after.detach().cpu() - start, -lr * total / len(x))


def batched_gradients(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Each customer's gradient (of their summed loss, over the weights that learn), by autograd
    through ONE forward pass of the whole batch. Customers do not interact in the model, so
    this is each customer's own gradient; with dropout, it is the gradient under the masks that
    pass drew. Run from the same RNG state and on the same batch (same shapes, same order) as
    Opacus's forward, it sees the very masks Opacus saw: dropout draws its masks from torch's
    generator in the order of the forward, whatever hooks Opacus adds."""
    weights = [p for p in model.parameters() if p.requires_grad]
    losses = CustomerLoss("none")(model(x), y)
    grads = []
    for loss in losses:
        parts = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        grads.append(
            [torch.zeros_like(w) if g is None else g for g, w in zip(parts, weights, strict=True)]
        )
    return grads


def grad_norm(grad: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((g**2).sum() for g in grad))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_ghost_norms_match_brute_force_with_dropout(dropout: float) -> None:
    """Dropout masks are random, so the brute force must see Opacus's masks: both run the same
    batch from the same seed (see :func:`batched_gradients`). Without dropout the batched brute
    force equals the one-customer-at-a-time one, which makes it a fair stand-in; with dropout the
    norms differ from the dropout-free ones, so the masks really acted."""
    model, (x, y) = tiny_model("gated", dropout=dropout, layers=2), customers()
    torch.manual_seed(3)
    expected = torch.stack([grad_norm(g) for g in batched_gradients(model, x, y)])
    module = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean"
    )
    torch.manual_seed(3)
    CustomerLoss("none")(module(x), y).mean().backward()
    measured = module.get_norm_sample().double()
    module.to_standard_module()
    torch.testing.assert_close(measured, expected, rtol=1e-5, atol=1e-8)
    model.eval()  # dropout off
    one_at_a_time = brute_force_norms(model, x, y)
    if dropout:
        assert not torch.allclose(expected, one_at_a_time, rtol=1e-3)
    else:
        torch.testing.assert_close(expected, one_at_a_time, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    "case", ["dropout", "two layers", "merchant", "bias only", "text", "text merchant"]
)
def test_a_private_step_is_the_mean_clipped_gradient_in_every_setting(
    case: str,
) -> None:
    """One noise-free DP-SGD step (two length-sorted passes) against the brute-force sum of
    clipped per-customer gradients: with dropout (the brute force runs the same passes from the
    same seed, see :func:`batched_gradients`), with two transformer layers, on a merchant's part
    of the catalog (``CatalogView`` and ``targets_within``, as client/node.py trains), and with
    only the item biases learning (``trainable="bias"``), and with the text projection and the
    biases learning (``trainable="text"``, the default, also on a merchant's part): frozen
    weights stay exactly as they were."""
    if case == "dropout" and TEST_DEVICE != "cpu":
        pytest.skip("dropout masks come from the device's generator; the brute force runs on cpu")
    x, y = customers()
    model: torch.nn.Module = tiny_model(
        "gated", dropout=0.3 if case == "dropout" else 0.0, layers=2
    )
    if case in ("merchant", "text merchant"):
        columns = torch.arange(0, 40, 2)  # the merchant sells the even items only
        within = targets_within(y, columns, 40)
        assert ((y >= 0) & (within == -1)).any() and (within >= 0).any()  # some targets leave
        y, model = within, CatalogView(model, columns.numpy())
    trainable = {"bias only": "bias", "text": "text", "text merchant": "text"}.get(case, "all")
    select_trainable(model, trainable)
    clip, lr, passes = 0.05, 0.5, 2
    clipped_sum = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    model.train()
    torch.manual_seed(5)
    for part in length_buckets(x, y, passes):  # the passes train_private runs, in its order
        for grad in batched_gradients(model, *part):
            scale = min(1.0, clip / max(float(grad_norm(grad)), 1e-12))  # 0 if no target
            for total, g in zip(clipped_sum, grad, strict=True):
                total += g * scale
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.manual_seed(5)
    train_private(
        model,
        x,
        y,
        epochs=1,
        expected_batch=len(x),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        lr=lr,
        device=TEST_DEVICE,
        trainable=trainable,
        physical_batches=passes,
    )
    learning = [k for k, p in model.named_parameters() if p.requires_grad]
    if case == "bias only":
        assert learning == ["id_scores.bias"]
    for name, total in zip(learning, clipped_sum, strict=True):
        moved = model.get_parameter(name).detach().cpu() - before[name]
        torch.testing.assert_close(moved, -lr * total / len(x))
    for name, parameter in model.named_parameters():
        if name not in learning:
            assert torch.equal(parameter.detach().cpu(), before[name])


@pytest.mark.parametrize("crafted", [float("nan"), 1e200])
@pytest.mark.parametrize("physical_batches", [1, 3])
def test_a_customer_whose_gradient_is_not_finite_is_left_out_of_the_step(
    crafted: float, physical_batches: int
) -> None:
    """An operator's membership test: one product's history-side row set to NaN (or to a
    value that overflows) made the clipped sum NaN exactly when a customer who bought it was
    sampled. That customer now contributes nothing; the step is the one the other customers
    alone give, and the released weights stay finite."""
    x, y = customers()
    product = int(x[0][x[0] > 0][0])  # a product in the first customer's history
    holders = (x == product).any(1)
    assert 0 < int(holders.sum()) < len(x)
    released = []
    for rows in (torch.ones(len(x), dtype=torch.bool), ~holders):
        model = tiny_model()
        with torch.no_grad():
            model.id_in.weight[product] = crafted
        train_private(
            model,
            x[rows],
            y[rows],
            epochs=1,
            expected_batch=len(x),
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            lr=0.5,
            device=TEST_DEVICE,
            trainable="all",
            physical_batches=physical_batches,
        )
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state["id_in.weight"] = torch.cat(  # the crafted row is the server's, not a release
            [state["id_in.weight"][:product], state["id_in.weight"][product + 1 :]]
        )
        released.append(state)
    everyone, others = released
    for name, value in everyone.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, others[name])
