"""Choosing among trained epochs when validation cannot tell them apart
(shared/recommender/selection.py, ``epoch-tolerance``)."""

from __future__ import annotations

import numpy as np

from shared.recommender.selection import EpochChoice, within_noise


def _customers(mean: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """2,000 customers' validation values: a shared base, shifted to ``mean``, plus noise."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).uniform(0.0, 0.2, 2000)
    values = base + rng.normal(0.0, noise, len(base))
    return values - values.mean() + mean


def test_a_lead_smaller_than_its_noise_is_a_tie_and_a_clear_lead_is_not() -> None:
    best, slightly, clearly = _customers(0.1003, 0.1), _customers(0.1), _customers(0.09, 0.1, 1)
    assert within_noise(best, slightly, 1.0)  # 0.0003 behind, a standard error of about 0.002
    assert not within_noise(best, clearly, 1.0)  # 0.01 behind: five standard errors
    assert not within_noise(best, slightly, 0.0)  # at 0 only an equal mean ties
    assert within_noise(best, best, 0.0)


def test_a_tie_keeps_the_earlier_epoch_and_a_clear_gain_the_later_one() -> None:
    copies = []
    choice = EpochChoice(tolerance=1.0)
    assert choice.offer(1, _customers(0.1000), lambda: copies.append(1) or "weights 1")
    assert choice.offer(2, _customers(0.1003, 0.1), lambda: copies.append(2) or "weights 2")
    assert (choice.kept.epoch, choice.kept.state, choice.best.epoch) == (1, "weights 1", 2)
    assert not choice.offer(3, _customers(0.0990, 0.1, 2), lambda: copies.append(3) or "3")
    assert copies == [1, 2, 3]  # a worse epoch within noise of the best is in the running
    assert choice.kept.epoch == 1  # and the earliest is kept
    assert not choice.offer(4, _customers(0.0500, 0.1, 4), lambda: copies.append(4) or "4")
    assert copies == [1, 2, 3]  # one outside the noise is never copied
    assert choice.offer(5, _customers(0.1200, 0.1, 3), lambda: "weights 5")
    assert choice.kept.epoch == choice.best.epoch == 5  # the old ones fell out of its noise
    assert [c.epoch for c in choice.running] == [5]


def test_at_tolerance_zero_the_best_epoch_is_kept() -> None:
    choice = EpochChoice(tolerance=0.0)
    choice.offer(1, _customers(0.1000), lambda: "weights 1")
    choice.offer(2, _customers(0.1003, 0.1), lambda: "weights 2")
    assert choice.kept.epoch == 2


def test_an_epoch_that_never_led_but_is_within_noise_of_the_best_is_kept() -> None:
    """Epoch 2 is below epoch 1 when it runs but within noise of epoch 3, the best; epoch 1 is
    a steady 0.01 below epoch 3, outside its noise: the earliest within noise is epoch 2 (only
    epochs that led were candidates at first, and epoch 3 was kept; found in review)."""
    first = np.full(4, 0.10)
    second = np.array([0.0, 0.2, 0.0, 0.19])
    third = np.full(4, 0.11)
    assert not within_noise(third, first, 1.0) and within_noise(third, second, 1.0)
    choice = EpochChoice(1.0)
    for epoch, values in enumerate((first, second, third), start=1):
        choice.offer(epoch, values, lambda: None)
    assert choice.kept.epoch == 2 and choice.best.epoch == 3
