"""What one node can shift (``shift-clip``, server/federation/aggregation.py:bound_shifts): a
merchant's products are its rows alone, so the row bound held each row's push, round after
round, but not a push of all of them together against every other merchant's products."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from server.federation.aggregation import NodeUpdate, bound_shifts
from server.federation.strategy import FedRecStrategy
from shared.runs.config import RunConfig

MERCHANTS, PRODUCTS, ROUNDS = 5, 10, 4
BIAS = "id_scores.bias"


def honest_step(merchant: int) -> torch.Tensor:
    """A merchant's honest bias change each round: its products move against each other
    (alternating signs, within the row bound, so that bound cuts none) and all together barely
    (its softmax ranks its own products only, which a common shift does not change)."""
    size = torch.linspace(0.030, 0.048, PRODUCTS) * (1.2 - merchant / 20)
    signs = torch.tensor([(-1.0) ** (i + merchant) for i in range(PRODUCTS)])
    return size * signs - 0.002 * (1 + merchant / 10)


def marketplace(shift_clip: float, promoter: bool) -> torch.Tensor:
    """The item biases after ``ROUNDS`` rounds of five merchants each selling ten products of
    its own, merchant 0 (the largest mover) setting every bias it sends 100 higher if
    ``promoter``."""
    strategy = FedRecStrategy(RunConfig(shift_clip=shift_clip))
    state = {BIAS: torch.zeros(MERCHANTS * PRODUCTS)}
    for _ in range(ROUNDS):
        updates = []
        for merchant in range(MERCHANTS):
            rows = np.arange(merchant * PRODUCTS, (merchant + 1) * PRODUCTS)
            step = 100.0 if promoter and merchant == 0 else honest_step(merchant)
            new = state[BIAS][rows] + step
            updates.append(NodeUpdate(f"m{merchant}", 10.0, {BIAS: new}, {BIAS: rows}))
        state, _ = strategy.apply(state, updates)
    return state[BIAS]


def top_share(biases: torch.Tensor) -> float:
    """Merchant 0's share of the ten best-scored products (scored by bias alone)."""
    return float((biases.argsort(descending=True)[:10] < PRODUCTS).float().mean())


def test_a_merchant_pushing_all_its_products_up_keeps_no_more_than_its_clean_share(
    caplog,
) -> None:
    """The promoter's rows are its alone: the row bound let each of them climb 1.5 times the
    table's typical movement every round, and its ten products took the whole top 10 (its
    clean share is 3 of 10); the shift bound holds its push of all of them together to 1.5
    times the median merchant's shift, which is small, and names it in the log."""
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        clean = marketplace(1.5, promoter=False)
    assert "shifted" not in caplog.text  # no honest merchant is held
    assert top_share(clean) == pytest.approx(0.3)
    assert top_share(marketplace(0.0, promoter=True)) == 1.0
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        bounded = marketplace(1.5, promoter=True)
    assert top_share(bounded) <= top_share(clean)
    assert "node m0 shifted its id_scores.bias rows together" in caplog.text
    assert "node m1" not in caplog.text
    # over the run its products moved together by at most 1.5 median shifts a round
    median_shift = float(honest_step(2).mean().abs())
    assert float(bounded[:PRODUCTS].mean()) <= ROUNDS * 1.5 * median_shift + 1e-6


def regional(shifts: list[float]) -> list[NodeUpdate]:
    """Nodes sending the same six rows of every item table, each moved by its ``shift`` plus
    the same pattern."""
    rows = np.arange(6)
    pattern = torch.linspace(-0.05, 0.05, 6)
    return [
        NodeUpdate(
            f"r{i}",
            10.0,
            {
                BIAS: pattern + shift,
                "id_scores.weight": (pattern + shift)[:, None].repeat(1, 2),
            },
            {BIAS: rows, "id_scores.weight": rows},
        )
        for i, shift in enumerate(shifts)
    ]


def state6() -> dict[str, torch.Tensor]:
    return {BIAS: torch.zeros(6), "id_scores.weight": torch.zeros(6, 2)}


def test_nodes_that_agree_on_a_common_shift_are_left_alone() -> None:
    """Regions that all lift the same products (a common shift every node makes) move as
    without the bound: it holds a node to the median node's shift, not to none."""
    updates = regional([0.10, 0.11, 0.12, 0.13, 0.14])
    before = {u.node: dict(u.arrays) for u in updates}
    assert bound_shifts(state6(), updates, 1.5) == []
    for update in updates:
        for name, value in update.arrays.items():
            assert torch.equal(value, before[update.node][name])


def test_a_lone_shift_is_held_to_the_bound_without_growing_any_row() -> None:
    """One node of five shifting its rows 20 times the others: its mean change comes down
    to exactly 1.5 times the median node's, by shrinking only the part of each row moving
    with the shift (no row moves more than it did, the rows keep their order), in the bias
    and in the score vectors alike."""
    updates = regional([0.10, 0.11, 0.12, 0.13, 2.0])
    sent = {name: value.clone() for name, value in updates[-1].arrays.items()}
    held = bound_shifts(state6(), updates, 1.5)
    assert [(node, name) for node, name, *_ in held] == [("r4", "id_scores.weight"), ("r4", BIAS)]
    for name, value in updates[-1].arrays.items():
        median = 0.12 if value.ndim == 1 else 0.12 * 2**0.5
        assert float(value.mean(0).norm()) == pytest.approx(1.5 * median, rel=1e-5)
        norms = value.norm(dim=-1) if value.ndim > 1 else value.abs()
        sent_norms = sent[name].norm(dim=-1) if value.ndim > 1 else sent[name].abs()
        assert torch.all(norms <= sent_norms + 1e-6)
    assert torch.equal(updates[-1].arrays[BIAS].argsort(), sent[BIAS].argsort())


def test_the_shift_bound_can_be_turned_off() -> None:
    updates = regional([0.10, 0.11, 0.12, 0.13, 2.0])
    assert bound_shifts(state6(), updates, 0.0) == []
    assert float(updates[-1].arrays[BIAS].mean()) == pytest.approx(2.0)
