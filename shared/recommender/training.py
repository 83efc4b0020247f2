"""Training loops: plain (full-catalog softmax) and private (Opacus DP-SGD, one sample = one
customer). Both the centralized reference run and every federated node use these.

A training example is one customer: the model reads their history and predicts each next item
over the whole catalog; the customer's loss is the sum over their positions, so under DP a
customer influences exactly one clipped gradient per step.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import ndtr
from torch import nn

from shared.recommender.model import FusionRecommender, pad_histories
from shared.recommender.secure_random import SecureRandom
from shared.runs.progress import progress_bar

if TYPE_CHECKING:
    from shared.runs.config import RunConfig

PRV_DEFAULT_ERROR = 0.01  # Opacus PRVAccountant.get_epsilon's eps_error (absolute)
PRV_RELATIVE_ERROR = 0.005  # the error prv_epsilon keeps: half a percent of the epsilon...
PRV_SMALLEST_ERROR = 2.5e-4  # ...but no finer (about 1 s an evaluation at Beauty's plans)
PHYSICAL_BATCHES = 4  # passes a private step's Poisson batch is computed in (train_private)


def training_tensors(
    histories: list[np.ndarray], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (item index + 1, right-aligned) and next-item targets (-1 = no target)."""
    usable = [h for h in histories if len(h) >= 2]
    inputs = pad_histories([h[:-1] for h in usable], max_len)
    targets = pad_histories([h[1:] for h in usable], max_len) - 1
    return inputs, targets


SHORT_HISTORY = 3  # events: a median history this short gives at most two next-item pairs


def learns_reversed(config: RunConfig, histories: list[np.ndarray]) -> bool:
    """Whether training also learns every history backwards (``reverse-histories``): never
    under DP (a customer would be two samples); else ``on``, ``off``, or ``auto``: on when the
    median history that trains (two events or more) has at most :data:`SHORT_HISTORY` events.
    There a customer's few events, in an order that says little (review dates), teach
    next-item transitions poorly; read both ways they teach which products go together, what
    item-to-item neighbours count (docs/evaluation.md)."""
    if config.private:
        return False
    if config.reverse_histories != "auto":
        return config.reverse_histories == "on"
    lengths = [len(h) for h in histories if len(h) >= 2]
    return bool(lengths) and float(np.median(lengths)) <= SHORT_HISTORY


def with_reversed(histories: list[np.ndarray]) -> list[np.ndarray]:
    """``histories`` and, as further sequences, each one of two events or more reversed
    (never under DP: a customer would be two samples)."""
    return list(histories) + [np.asarray(h)[::-1].copy() for h in histories if len(h) >= 2]


def targets_within(targets: torch.Tensor, columns: torch.Tensor, num_items: int) -> torch.Tensor:
    """``targets`` as positions in ``columns`` (part of the catalog); -1 stays -1."""
    position = torch.full((num_items,), -1, dtype=torch.long)
    position[columns] = torch.arange(len(columns))
    return torch.where(targets >= 0, position[targets.clamp(min=0)], -1)


def trim(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding for every row of the batch."""
    filled = (inputs > 0).any(0).nonzero()
    start = int(filled.min()) if len(filled) else inputs.shape[1] - 1
    return inputs[:, start:].contiguous(), targets[:, start:].contiguous()


class CustomerLoss(nn.Module):
    """Cross-entropy summed over one customer's positions; ``reduction`` as Opacus expects."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_position = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1).clamp(min=0),
            reduction="none",
        ).view(targets.shape)
        per_customer = (per_position * (targets >= 0)).sum(1)
        if self.reduction == "none":
            return per_customer
        return per_customer.sum() if self.reduction == "sum" else per_customer.mean()


def train_epoch(
    model: FusionRecommender,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    device: str,
    proximal: Callable[[], torch.Tensor] | None = None,
    show_progress: bool = False,
    columns: torch.Tensor | None = None,
    passes: int = 1,
) -> float:
    """One non-private epoch (fast fused scoring) of ``passes`` shuffled passes over the
    data (:func:`passes_per_epoch`); returns the mean loss per position.

    ``columns`` restricts the softmax to part of the catalog (a merchant's own products);
    ``targets`` are then positions in ``columns``.
    """
    model.train()
    orders = [torch.randperm(len(inputs)) for _ in range(passes)]
    batches = [
        order[start : start + batch_size]
        for order in orders
        for start in range(0, len(inputs), batch_size)
    ]
    total, count = 0.0, 0
    for batch in progress_bar(batches, "training", disable=not show_progress):
        x, y = trim(inputs[batch], targets[batch])
        x, y = x.to(device), y.to(device)
        valid = y >= 0
        logits = model.scores(model.encode(x)[valid])
        if columns is not None:
            logits = logits[:, columns]
        loss = F.cross_entropy(logits, y[valid])
        if proximal is not None:
            loss = loss + proximal()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        positions = int(valid.sum())
        total, count = total + loss.item() * positions, count + positions
    return total / max(count, 1)


def passes_per_epoch(sequences: int, batch_size: int, epoch_steps: int) -> int:
    """Passes over ``sequences`` training sequences that make one epoch of ``fedrec train``:
    one, or on a small dataset as many as reach ``epoch_steps`` optimiser steps. An epoch of
    300 customers in batches of 128 is 3 steps: the epoch cap and the validation patience,
    counted in epochs, would stop the model after a few dozen steps, before it has learnt."""
    steps = max(1, math.ceil(sequences / batch_size))
    return max(1, math.ceil(epoch_steps / steps))


@dataclass
class PrivateRound:
    """What one private training session did (its accounting is the caller's)."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    loss: float


def new_accountant(state: dict | None = None):
    """Opacus's PRV accountant (its domain sizing cached: shared/recommender/prv_domain.py),
    restored from a saved ``state_dict`` (the node's whole history)."""
    from shared.recommender.prv_domain import prv_accountant_class

    accountant = prv_accountant_class()()
    if state:  # a deep copy: the caller's saved state must never change behind its back
        accountant.load_state_dict(copy.deepcopy(state))
        accountant.history = [tuple(entry) for entry in accountant.history]
    return accountant


def prv_epsilon(accountant, delta: float) -> float:
    """The PRV accountant's epsilon at ``delta``: the upper end of its error interval.

    Opacus's error ``eps_error`` is absolute (0.01 by default), 5% of a node's budget of 0.2
    (a merchant's share of 2 among ten): calibrated against it, a node would add several
    percent more noise than its budget needs, and the audit's PLD calibration (within 2%)
    would flag it. So where 0.01 is more than :data:`PRV_RELATIVE_ERROR` of the epsilon, it
    is recomputed with that relative error (finer grid, slower; never below
    :data:`PRV_SMALLEST_ERROR`). Opacus takes log(1 - q), log(0) for the releases that are not
    subsampled (q = 1, a private evaluation): numpy warns about the infinity, which the
    formula then handles correctly, so the warning is silenced here. It is computed over the
    history merged (:func:`shared.recommender.prv_domain.merged`): one entry per noise
    multiplier and sample rate, whatever the number of releases."""
    from shared.recommender.prv_domain import merged, prv_accountant_class

    history = merged(accountant.history)
    accountant = prv_accountant_class()()
    accountant.history = history
    with np.errstate(divide="ignore"):
        epsilon = float(accountant.get_epsilon(delta))
        finer = max(PRV_RELATIVE_ERROR * epsilon, PRV_SMALLEST_ERROR)
        if finer < PRV_DEFAULT_ERROR:
            epsilon = float(accountant.get_epsilon(delta, eps_error=finer))
    return epsilon


def steps_per_epoch(num_customers: int, expected_batch: int) -> tuple[int, float]:
    """Poisson sampling: rate q = batch / customers, and 1/q steps make one epoch."""
    sample_rate = min(1.0, expected_batch / max(num_customers, 1))
    return int(np.ceil(1.0 / sample_rate)), sample_rate


def train_private(
    model: FusionRecommender,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    expected_batch: int,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    device: str,
    trainable: str = "bias",
    show_progress: bool = False,
    physical_batches: int = PHYSICAL_BATCHES,
    population: int | None = None,
) -> PrivateRound:
    """DP-SGD (plain SGD) with Opacus ghost clipping and Poisson sampling of customers.

    Only the ``trainable`` part learns (see :data:`DP_TRAINABLE`): the fewer the weights, the
    less of the noise lands where there is no signal.

    Every one of the ``epochs x 1/q`` steps is the Poisson-subsampled Gaussian mechanism at
    ``noise_multiplier`` and rate q, also a step whose draw sampled no customer: it adds the
    noise to a zero clipped sum, divided by ``expected_batch`` as every step is. The caller
    accounts the steps (a node charges its accountant before it trains, client/node.py; the
    centralized run states :func:`planned_epsilon`).

    Each Poisson batch is run as ``physical_batches`` passes over customers of similar history
    length, each trimmed to its own longest history (:func:`length_buckets`). Opacus sums their
    clipped per-customer gradients and adds the noise once, at the end of the logical step
    (``signal_skip_step``, the mechanism of its ``BatchMemoryManager``). The result is the same
    as one pass, without the scores of padding positions.

    ``population``: the public customer figure that sets the sample rate (default: the exact
    count, ``len(inputs)``); a node passes its declared figure so that nothing it sends
    depends on its exact count.

    The Poisson sampling and the noise come from :class:`SecureRandom`, never from a seeded
    generator.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from shared.recommender.dp_optimizer import SecureDPOptimizer

    steps, sample_rate = steps_per_epoch(population or len(inputs), expected_batch)
    model.to(device).train()
    parameters = select_trainable(model, trainable)
    module = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=max_grad_norm, use_ghost_clipping=True, loss_reduction="mean"
    )
    optimizer = SecureDPOptimizer(
        torch.optim.SGD(parameters, lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(module, optimizer, CustomerLoss("mean"), "mean")
    sampling = SecureRandom()
    losses = []
    for _ in progress_bar(range(epochs * steps), "private training", disable=not show_progress):
        chosen = sampling.bernoulli(len(inputs), sample_rate)  # Poisson sampling
        if not chosen.any():  # the step is taken all the same: a zero clipped sum, the noise
            optimizer.step_without_samples()
            continue
        parts = length_buckets(inputs[chosen], targets[chosen], physical_batches)
        for index, (x, y) in enumerate(parts):
            loss, kept = clipped_backward(module, criterion, optimizer, x.to(device), y.to(device))
            optimizer.signal_skip_step(do_skip=index < len(parts) - 1)  # noise once, at the end
            if loss is None:  # no customer of this part could be computed on
                optimizer.step_without_samples()
                continue
            optimizer.step()
            positions = int((y[kept.cpu()] >= 0).sum())
            losses.append(float(loss.item()) / max(positions, 1) * int(kept.sum()))
    module.to_standard_module()
    return PrivateRound(
        steps=epochs * steps,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss=float(np.mean(losses)) if losses else float("nan"),
    )


def clipped_backward(
    module: nn.Module,
    criterion: Callable,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Backpropagate one part's clipped per-customer gradients (Opacus ghost clipping, added
    to the step's clipped sum at ``optimizer.step``). A customer whose gradient is not finite
    is left out: DP-SGD's clipping does not bound a NaN, and weights the server chose can make
    exactly the customers with some product in their history overflow. Leaving each such
    customer out depends on that customer alone, so every customer still moves the sum by at
    most ``max-grad-norm``. Returns the part's loss (None: no customer left) and which of its
    customers were kept."""
    kept = torch.ones(len(x), dtype=torch.bool, device=x.device)
    while kept.any():
        optimizer.zero_grad(set_to_none=True)  # keeps the step's clipped sum so far
        loss = criterion(module(x[kept]), y[kept])
        loss.backward()
        finite = torch.isfinite(module.per_sample_gradient_norms)
        if finite.all():
            return loss, kept
        kept[kept.clone()] = finite
    optimizer.zero_grad(set_to_none=True)
    return None, kept


def length_buckets(
    inputs: torch.Tensor, targets: torch.Tensor, parts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batch into up to ``parts`` groups of customers of similar history length, each
    trimmed (:func:`trim`), so short histories are not padded to the longest one."""
    lengths = (inputs > 0).sum(1)
    order = torch.argsort(lengths, stable=True)
    return [
        trim(inputs[group], targets[group]) for group in order.tensor_split(parts) if len(group)
    ]


DP_TRAINABLE = {  # what learns under DP: parameter names containing one of these
    # the candidate-side text projection (dim x 384, dense: every customer's gradient moves it)
    # and item popularity, on top of the public text model
    "text": ("query_to_text.", "id_scores.bias"),
    "bias": ("id_scores.bias",),  # item popularity on top of the public text model
    "id": ("id_in.", "id_scores.", "gate."),  # the collaborative part
    "all": ("",),
}


def select_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze every parameter outside ``DP_TRAINABLE[trainable]``; returns the trainable ones."""
    if trainable not in DP_TRAINABLE:
        raise ValueError(f"dp_train must be one of {sorted(DP_TRAINABLE)}, got {trainable!r}")
    keys = DP_TRAINABLE[trainable]
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(key in name for key in keys))
        if parameter.requires_grad:
            chosen.append(parameter)
    if not chosen:
        raise ValueError(f"dp_train={trainable!r} leaves nothing to train in this model variant")
    return chosen


def planned_epsilon(
    noise_multiplier: float,
    delta: float,
    sample_rate: float,
    steps: int,
    releases: tuple[tuple[float, int], ...] = (),
    more_steps: tuple[tuple[float, int], ...] = (),
) -> float:
    """PRV epsilon of ``steps`` DP-SGD steps at ``noise_multiplier`` and ``sample_rate``,
    composed with ``more_steps``: (sample rate, steps) of further DP-SGD steps at the same
    noise multiplier (a node's encoder rounds), and with ``releases``: (noise multiplier,
    count) Gaussian releases of sensitivity 1 (sample rate 1), e.g. private evaluations.
    Cached per process: a pure function of its arguments, and each call takes seconds (Opacus
    sizes the PRV domain with RDP at fractional orders); calibrations repeat the same plans."""
    return _planned_epsilon(
        float(noise_multiplier),
        float(delta),
        float(sample_rate),
        int(steps),
        tuple((float(q), int(n)) for q, n in releases),
        tuple((float(q), int(n)) for q, n in more_steps),
    )


@functools.lru_cache(maxsize=4096)
def _planned_epsilon(
    noise_multiplier: float,
    delta: float,
    sample_rate: float,
    steps: int,
    releases: tuple[tuple[float, int], ...],
    more_steps: tuple[tuple[float, int], ...],
) -> float:
    accountant = new_accountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    accountant.history += [(noise_multiplier, q, count) for q, count in more_steps if count]
    accountant.history += [(sigma, 1.0, count) for sigma, count in releases if count]
    return prv_epsilon(accountant, delta)


def spent_at_least(
    noise_multiplier: float, epsilon: float, sample_rate: float, steps: int
) -> float:
    """A lower bound on the delta at ``epsilon`` of ``steps`` Poisson subsampled Gaussian
    steps (microseconds: no accountant): the hockey-stick divergence of the event "some step's
    output is above tau" for a customer removed, P(S) - e^epsilon Q(S), the best of a grid of
    tau, each probability in closed form, rounded against itself by 1e-9. The direction Opacus's
    PRV accounts, so its epsilon is above ``epsilon`` wherever this is above delta."""
    tau = np.linspace(0.0, 1.0 + 12 * noise_multiplier, 400)
    absent = ndtr(-tau / noise_multiplier)  # one step's output above tau, without the customer
    present = (1 - sample_rate) * absent + sample_rate * ndtr((1 - tau) / noise_multiplier)
    with np.errstate(divide="ignore"):  # log1p(-1) at a sample rate of 1: P(S) is then 1
        p_event = -np.expm1(steps * np.log1p(-present))
        q_event = -np.expm1(steps * np.log1p(-absent))
        bound = p_event * (1 - 1e-9) - np.exp(epsilon + np.log(q_event)) * (1 + 1e-9)
    return float(np.max(bound))


def noise_floor(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """A noise multiplier at which ``steps`` DP-SGD steps alone spend more than
    ``target_epsilon`` at ``delta`` (:func:`spent_at_least`), as high as a search finds one
    (0: none). A calibration needs none below it: the PRV accountant's memory grows as the
    noise falls (at noise 0.0625 and sample rate 0.01 it asked for 36 GB an array), and a
    floor only prunes noise that could not meet the target, never the epsilon reported."""

    def too_little(sigma: float) -> bool:
        return spent_at_least(sigma, target_epsilon, sample_rate, steps) > delta

    low, high = 1e-4, 1e4
    if not too_little(low):
        return 0.0
    while high / low > 1.01:  # too_little(low) stays true
        middle = math.sqrt(low * high)
        low, high = (middle, high) if too_little(middle) else (low, middle)
    return low


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    releases: tuple[tuple[float, int], ...] = (),
    more_steps: tuple[tuple[float, int], ...] = (),
) -> float:
    """The smallest noise multiplier (to 0.1%) whose plan (:func:`planned_epsilon`) spends at
    most ``target_epsilon`` at ``delta`` by Opacus's PRV accountant, searched above
    :func:`noise_floor`."""
    releases = tuple((sigma, count) for sigma, count in releases if count)
    more_steps = tuple((q, count) for q, count in more_steps if count)

    def spent(sigma: float) -> float:
        return planned_epsilon(sigma, delta, sample_rate, steps, releases, more_steps)

    if spent(1e4) > target_epsilon:
        raise ValueError(
            f"target epsilon {target_epsilon:g} cannot be kept: the plan spends "
            f"{spent(1e4):.3g} even at noise multiplier 1e4 (planned releases: {releases}); "
            "raise it or plan fewer"
        )
    # below the floor no noise multiplier keeps the target, and PRV is never asked there
    low = noise_floor(target_epsilon, delta, sample_rate, steps)
    high = max(1.0, 2 * low)
    while (at_high := spent(high)) > target_epsilon:
        low, high = high, 2 * high
    return _narrowed(spent, target_epsilon, low, high, at_high)


def _narrowed(
    spent: Callable[[float], float], target: float, low: float, high: float, at_high: float
) -> float:
    """``high`` once the bracket is within 0.1% of it; throughout, ``high`` keeps the target
    (``spent(high) = at_high <= target``) and ``low`` does not. Each cycle takes the root of
    the line through both ends in log epsilon against log noise (nearly straight: it lands
    within a fraction of a percent), then steps past it of 0.09%, doubling, until the root
    lies between (or a bisection, when a step would leave the bracket), then a bisection if
    the cycle did not halve the bracket (so never much slower than bisection): 7 to 9 PRV
    evaluations in a calibration where bisection took 12 or 13. ``low`` may be the floor,
    whose epsilon is never computed: the first step bisects."""
    gaps = {"low": None, "high": math.log(at_high / target) if at_high > 0 else -math.inf}
    bounds = {"low": low, "high": high}

    def open_() -> bool:
        return bounds["high"] - bounds["low"] > 1e-3 * bounds["high"]

    def measure(sigma: float) -> str:
        epsilon = spent(sigma)
        end = "low" if epsilon > target else "high"
        bounds[end] = sigma
        gaps[end] = math.log(epsilon / target) if epsilon > 0 else -math.inf
        return end

    while open_():
        low, high, gap_low, gap_high = bounds["low"], bounds["high"], gaps["low"], gaps["high"]
        width = high - low
        if gap_low is None or not (math.isfinite(gap_low) and math.isfinite(gap_high)):
            measure((low + high) / 2)
            continue
        log_root = (math.log(low) * gap_high - math.log(high) * gap_low) / (gap_high - gap_low)
        guess = min(max(math.exp(log_root), low + 1e-4 * high), high - 1e-4 * high)
        moved, step = measure(guess), 9e-4 * bounds["high"]
        while open_():  # steps past the estimate, doubling, until the root is between
            past = guess - step if moved == "high" else guess + step
            if not bounds["low"] < past < bounds["high"]:
                measure((bounds["low"] + bounds["high"]) / 2)
                break
            if measure(past) != moved:
                break
            guess, step = past, 2 * step
        if open_() and bounds["high"] - bounds["low"] > width / 2:
            measure((bounds["low"] + bounds["high"]) / 2)
    return bounds["high"]
